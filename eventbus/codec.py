"""Events as record values: protobuf (the default) or protobuf's JSON mapping, and back.

A record's `ce_type` header names the message (its full protobuf name) and
`content-type` says which encoding carries it, so a reader needs nothing else.
"""

from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from eventbus import topics
from protos import events_pb2

PROTOBUF = "application/protobuf"
JSON = "application/json"
FORMATS = {"protobuf": PROTOBUF, "json": JSON}

MESSAGES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (events_pb2.InferenceEvent, events_pb2.FeedbackEvent, events_pb2.Signal,
                events_pb2.Alert, events_pb2.RolloutState, events_pb2.DeadLetter, events_pb2.Action)
}

TOPIC_MESSAGES: dict[str, type[Message]] = {
    topics.INFERENCE: events_pb2.InferenceEvent,
    topics.FEEDBACK: events_pb2.FeedbackEvent,
    topics.SIGNALS: events_pb2.Signal,
    topics.ALERTS: events_pb2.Alert,
    topics.ROLLOUT: events_pb2.RolloutState,
    topics.DEADLETTER: events_pb2.DeadLetter,
    topics.ACTIONS: events_pb2.Action,
}


class Undecodable(ValueError):
    """A record that is not a Vigil event; the message says why (for the dead-letter topic)."""


def encode(message: Message, content_type: str = PROTOBUF) -> bytes:
    if content_type == PROTOBUF:
        return message.SerializeToString()
    if content_type == JSON:
        return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None,
                                         always_print_fields_with_no_presence=True).encode()
    raise ValueError(f"content type {content_type!r} is not one of {', '.join(FORMATS.values())}")


def decode(value: bytes, attributes: dict[str, str], topic: str = "") -> Message:
    """The message of a record, from its value and its CloudEvents attributes
    (`cloudevents.attributes`). Without a ce_type header, the topic's message type is assumed."""
    type_name = attributes.get("type", "")
    cls = MESSAGES.get(type_name) if type_name else TOPIC_MESSAGES.get(topic)
    if cls is None:
        raise Undecodable(f"ce_type {type_name!r} is not a Vigil event" if type_name
                          else f"no ce_type header, and topic {topic!r} has no event type")
    content_type = attributes.get("content-type", PROTOBUF).split(";")[0].strip()
    if value is None:
        raise Undecodable("the record has no value")
    try:
        if content_type == PROTOBUF:
            return cls.FromString(value)
        if content_type == JSON:
            return json_format.Parse(value, cls(), ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise Undecodable(f"{type_name or cls.DESCRIPTOR.full_name} as {content_type}: {exc}") from None
    raise Undecodable(f"content-type {content_type!r} is neither {PROTOBUF} nor {JSON}")


def to_dict(message: Message) -> dict:
    """The message as protobuf's JSON mapping (every field present), as a dict."""
    return json.loads(encode(message, JSON))
