"""grpc.health.v1 per service: Check and Watch through stock stubs."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import toml_spec
from corral_client import Client, CorralError

PROBE = 'interval = "200ms"\ntimeout = "100ms"\nfailure_threshold = 1\nrestart_on_failure = false\n'


def wait_health(client: Client, name: str, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        try:
            got = client.health(name)
        except CorralError as e:
            got = e.code.name
        if got == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name}: health {got}, expected {want}")


def test_check_per_service(client: Client, service: Callable[[str], str], testbin: str) -> None:
    ok, sick = service("py-ok"), service("py-sick")
    client.apply(toml_spec(ok, [testbin, "serve"], extra="[health]\nexec = [\"/bin/true\"]\n" + PROBE))
    client.apply(toml_spec(sick, [testbin, "serve"], extra="[health]\nexec = [\"/bin/false\"]\n" + PROBE))
    wait_health(client, ok, "serving")
    wait_health(client, sick, "not_serving")
    assert client.health("") == "serving"
    client.delete(ok)
    wait_health(client, ok, "NOT_FOUND")


def test_watch_follows_a_service(
    socket_path: str, client: Client, service: Callable[[str], str], testbin: str, tmp_path: Path
) -> None:
    name = service("py-hw")
    ok = tmp_path / "ok"
    ok.touch()
    # The probe sees the host's /tmp (no private /tmp): the test decides the health.
    client.apply(
        toml_spec(
            name,
            [testbin, "serve"],
            extra=f'[isolation]\nprivate_tmp = false\n[health]\nexec = ["/bin/sh", "-c", "test -e {ok}"]\n' + PROBE,
        )
    )
    wait_health(client, name, "serving")
    updates: "queue.Queue[int]" = queue.Queue()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=name))

        def read() -> None:
            try:
                for r in stream:
                    updates.put(r.status)
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        assert updates.get(timeout=10) == serving
        ok.unlink()
        assert updates.get(timeout=20) == not_serving
        ok.touch()
        assert updates.get(timeout=20) == serving
        stream.cancel()
