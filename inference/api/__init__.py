"""The API: the serving pipeline and its fronts. The router and the model versions it
routes to, the rollout follower that sets the traffic, the serving layer that runs each
request and records its event, and the gRPC services (vigil.v1 and the Open Inference
Protocol); `server.py` puts the server together.

May import `inference.runtime` and `inference.edge`.
"""
