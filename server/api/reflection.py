"""Server reflection under both names tools ask for: `grpc.reflection.v1` (buf curl and grpcurl try it
first) and `grpc.reflection.v1alpha` (older tools).

grpcio-reflection serves v1alpha only. v1 is the same protocol, message for message and field for
field, under another package name, so the same servicer answers it: its descriptors are v1alpha's
with the package renamed, added to the default pool (reflection then describes v1 too), and its
method is registered with v1alpha's (byte-identical) message types.

The google.rpc error-detail messages are in the pool as well (imported here), so a tool that reads
an error's details through reflection decodes google.rpc.BadRequest field violations.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2  # noqa: F401 - puts google.rpc's details in the pool reflection reads
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptors() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    pool.Add(proto)


_add_v1_descriptors()


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Reflection (v1 and v1alpha) describing `service_names` and itself."""
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service, {"ServerReflectionInfo": handler}),))
