"""Domain errors → gRPC status with a readable message and google.rpc.BadRequest details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain.errors import DomainError


def to_status(err: DomainError) -> grpc.Status:
    code = getattr(code_pb2, err.code)
    details = []
    if err.field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in err.field_violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return rpc_status.to_status(status_pb2.Status(code=code, message=err.message, details=details))
