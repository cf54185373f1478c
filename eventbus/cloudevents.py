"""CloudEvents 1.0 over Kafka, binary content mode: the event's attributes travel as
`ce_` headers, its data is the record value, and `content-type` says how it is encoded.
https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md
"""

from __future__ import annotations

import datetime

SPECVERSION = "1.0"


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def headers(event_id: str, event_type: str, source: str, time_s: float,
            content_type: str) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", SPECVERSION.encode()),
        ("ce_id", event_id.encode()),
        ("ce_type", event_type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", rfc3339(time_s).encode()),
        ("content-type", content_type.encode()),
    ]


def attributes(record_headers) -> dict[str, str]:
    """The CloudEvents attributes (without the ce_ prefix) and content-type of a record."""
    out = {}
    for key, value in record_headers or ():
        if key.startswith("ce_") or key == "content-type":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
            out[key.removeprefix("ce_")] = text
    return out
