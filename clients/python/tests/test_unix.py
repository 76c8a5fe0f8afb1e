"""The Unix socket with stock grpc-core channels and default options: the path is sent as
``:authority`` (percent-encoded), which the agent must accept."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral_client import Client, pb, pb_grpc


def test_a_default_unix_channel_is_served(socket_path: str) -> None:
    for target in (f"unix:{socket_path}", f"unix://{socket_path}"):
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AgentStub(ch)
            node = stub.Node(pb.NodeRequest(), timeout=10)
            assert node.agent_version, target
            # Several calls on one connection: later ones refer to the authority through
            # the client's HPACK dynamic table.
            for _ in range(5):
                stub.List(pb.ListRequest(), timeout=10)
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_the_client_connects_like_the_cli(socket_path: str) -> None:
    with Client.connect(f"unix://{socket_path}") as c:
        assert c.node().cgroup_version in ("v1", "v2")
    with Client.connect(f"unix:{socket_path}") as c:
        assert isinstance(c.list(), list)
