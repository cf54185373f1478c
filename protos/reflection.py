"""A descriptor pool for gRPC server reflection over Vigil's services.

grpc_service_pb2 lives in a private descriptor pool (see scripts/gen_protos.py),
so grpc_reflection's default pool cannot describe it. Use::

    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection, reflection_pb2
    from protos.reflection import SERVICE_NAMES, reflection_pool

    names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(
        names, server, pool=reflection_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR))
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from protos import grpc_service_pb2, llm_pb2

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name
SERVICE_NAMES: tuple[str, ...] = (INFERENCE_SERVICE, LLM_SERVICE)


def reflection_pool(*extra: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A new pool holding Vigil's .proto files, the extra ones, and their imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        pool.AddSerializedFile(fd.serialized_pb)
        added.add(fd.name)

    for fd in (grpc_service_pb2.DESCRIPTOR, llm_pb2.DESCRIPTOR, *extra):
        add(fd)
    return pool
