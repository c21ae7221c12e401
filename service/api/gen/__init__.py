"""Generated protobuf/gRPC modules of ``proto/emrestore/v1/emrestore.proto``.

Regenerate with ``python -m service.api.codegen`` (needs grpcio-tools); do not edit by hand.
"""

from . import emrestore_pb2, emrestore_pb2_grpc

__all__ = ["emrestore_pb2", "emrestore_pb2_grpc"]
