"""The edge: what stands between a caller and the server. API keys and their per-key
limits, TLS, request bytes that do not parse, request traces and log lines, and the
server's Prometheus metrics.

May import `inference.runtime`; never `inference.api`.
"""
