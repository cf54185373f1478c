"""Prometheus metrics of a publisher, on the registry of the service that owns it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "vigil_"):
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.published = Counter(prefix + "events_published", "Records the broker acknowledged, "
                                 "straight or from the outbox", ("topic",), registry=r)
        self.replayed = Counter(prefix + "events_replayed", "Records delivered from the outbox",
                                ("topic",), registry=r)
        self.spilled = Counter(prefix + "events_spilled", "Records left in the on-disk outbox for "
                               "the broker, not sent from memory (broker down or slow, or the "
                               "memory copy full)", ("topic",), registry=r)
        self.unlogged = Counter(prefix + "events_unlogged", "Records the outbox could not take "
                                "(disk full, I/O error, size limit) while the broker kept up: sent "
                                "from memory only, so a crash before their acknowledgement loses them",
                                ("topic",), registry=r)
        self.failed = Counter(prefix + "events_failed", "Records lost, by reason: "
                              "closed, outbox_full, outbox_write (disk full or I/O error), encode, "
                              "rejected (too large for the broker)",
                              ("topic", "reason"), registry=r)
        self.corrupt = Counter(prefix + "outbox_corrupt_segments", "Outbox segments set aside "
                               "because a frame in them could not be read", registry=r)
        self.outbox_bytes = Gauge(prefix + "outbox_bytes", "Bytes in the outbox not yet delivered",
                                  registry=r)
        self.queued = Gauge(prefix + "events_queued", "Records kept in memory for sending (also in the "
                            "outbox), not yet acknowledged", registry=r)
        self.connected = Gauge(prefix + "events_broker_connected",
                               "1 while the publisher has a working producer; 0 from the moment a "
                               "send times out, or a connection breaks and no broker answers", registry=r)
        self.latency = Histogram(prefix + "event_publish_latency_seconds", "From publish() to the "
                                 "broker's acknowledgement (outbox time included)", ("topic",),
                                 buckets=PUBLISH_BUCKETS, registry=r)
