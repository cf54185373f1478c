"""Who may call what on the inference server: the methods open to anyone, those any valid
key may call, and the admin methods. The key file and its store are eventbus/apikeys.py.
"""

from __future__ import annotations

from eventbus.apikeys import ApiKey, AuthError

# methods anyone may call, with or without a key: health checks and reflection
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive",
                          "/inference.GRPCInferenceService/ServerReady"})
# methods any valid key may call; every other method (load, unload, traffic, and any
# method added later) needs a key with `admin: true`
DATA_METHODS = frozenset({
    "/vigil.v1.LLM/Generate", "/vigil.v1.LLM/GenerateStream", "/vigil.v1.LLM/Classify",
    "/vigil.v1.LLM/Feedback", "/vigil.v1.LLM/ListVersions",
    "/inference.GRPCInferenceService/ModelReady", "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata", "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer", "/inference.GRPCInferenceService/ModelConfig",
    "/inference.GRPCInferenceService/ModelStatistics", "/inference.GRPCInferenceService/RepositoryIndex",
    # the HTTP front's OpenAI-compatible endpoints, by path (inference/api/http_front.py)
    "/v1/chat/completions", "/v1/completions", "/v1/models",
})


def is_open(method: str) -> bool:
    return method in OPEN_METHODS or method.startswith(OPEN_PREFIXES)


def needs_admin(method: str) -> bool:
    return not is_open(method) and method not in DATA_METHODS


def authorize(key: ApiKey, method: str) -> None:
    """AuthError (permission denied) where `method` needs an admin key and `key` is not one."""
    if needs_admin(method) and not key.admin:
        raise AuthError("permission_denied", "forbidden",
                        f"{method.rsplit('/', 1)[-1]}: API key {key.name!r} has no admin right")
