"""aiokafka's idempotent producer against brokers that want InitProducerId v3 or later.

aiokafka 0.14 asks for a producer id with InitProducerId v0, which carries no
producer_id/producer_epoch. Tansu (the embedded broker) only hands out an id when the
request says producer_id=-1, epoch=-1, which v3 added, and answers v0 with
UNKNOWN_SERVER_ERROR. Offering v3 beside v0 lets the version negotiation pick v3
wherever the broker supports it (Tansu, Apache Kafka 2.5 and later); a new producer's
v3 request means exactly what v0 means.
"""

from __future__ import annotations

from aiokafka.producer import sender
from aiokafka.protocol import transaction
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields


class InitProducerIdResponse_v3(Response):
    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest_v3(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = InitProducerIdResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest(Request[transaction.InitProducerIdRequest_v0 | InitProducerIdRequest_v3]):
    API_KEY = 22

    def __init__(self, transactional_id: str | None, transaction_timeout_ms: int):
        self.transactional_id = transactional_id
        self.transaction_timeout_ms = transaction_timeout_ms

    def build(self, request_struct_class):
        if request_struct_class is InitProducerIdRequest_v3:
            return InitProducerIdRequest_v3(self.transactional_id, self.transaction_timeout_ms, -1, -1, {})
        return request_struct_class(self.transactional_id, self.transaction_timeout_ms)


def install() -> None:
    """Make aiokafka's sender use the request above (idempotent; process-wide)."""
    sender.InitProducerIdRequest = InitProducerIdRequest
