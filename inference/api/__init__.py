"""The API: the serving pipeline and its fronts. `serving.Serving` takes a request
(`requests`: plain data, no protocol) and returns an outcome, or raises one of `errors`;
around it, the router and the model versions it routes to, the rollout follower that
sets their traffic, and the events each request leaves. The gRPC services (vigil.v1 in
`llm_service`, the Open Inference Protocol in `kserve`) and the HTTP front (OpenAI's API
in `http_front`) only translate messages to and from it; `server` puts the server together, from the plain settings of `options`.

May import `inference.runtime` and `inference.edge`.
"""
