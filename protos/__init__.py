"""Vigil's protobuf sources and their generated Python modules.

- grpc_service.proto: the Open Inference Protocol (KServe v2), wire-compatible
  with Triton's (``inference.GRPCInferenceService``).
- llm.proto: the native LLM service (``vigil.v1.LLM``).

Regenerate with ``python scripts/gen_protos.py``; generated files are committed.
"""
