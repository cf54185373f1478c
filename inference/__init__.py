"""The inference server, in three layers:

- `runtime/`: the model and what runs it (loading, quantization, tokenizer, the
  continuous-batching engine, sampling, kernels). Knows nothing of requests' callers.
- `edge/`: what stands between a caller and the server (API keys and their limits,
  TLS, traces, request logs, metrics, the interceptors).
- `api/`: the serving pipeline (routing to model versions, one entry point per kind of
  request, one event per request) and its fronts, the gRPC services and the HTTP front
  (OpenAI's API), which translate messages to and from it; `api/server.py` puts the
  server together.

`cli.py` is `vigil serve` and `vigil fetch-demo`: their options, and the server they start.
"""
