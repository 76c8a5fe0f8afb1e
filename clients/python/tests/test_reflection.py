"""Server reflection: v1alpha through grpcio-reflection's own client, and v1."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_v1alpha_with_grpcio_reflection(socket_path: str) -> None:
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "corral.v1.Agent" in services and "grpc.health.v1.Health" in services, services
        pool = DescriptorPool(db)
        agent = pool.FindServiceByName("corral.v1.Agent")
        methods = {m.name: m for m in agent.methods}
        assert {"Apply", "Watch", "Logs", "GetRollout"} <= set(methods)
        assert methods["Watch"].output_type.full_name == "corral.v1.Event"
        assert "command" in pool.FindMessageTypeByName("corral.v1.ServiceSpec").fields_by_name


def test_v1_answers_the_same(socket_path: str) -> None:
    # v1 and v1alpha messages are the same on the wire.
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = [s.name for s in replies[0].list_services_response.service]
        assert "corral.v1.Agent" in names, names
