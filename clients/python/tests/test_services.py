"""A service's life through the client: apply (TOML and typed), list, get, scale, signal,
logs, delete, and the errors a scheduler meets."""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable

import grpc
import pytest

from conftest import toml_spec
from corral_client import Client, CorralError, enum_name, pb


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_apply_list_get_scale_delete(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-life")
    r = client.apply(toml_spec(name, [testbin, "serve"], replicas=2))
    assert enum_name(r, "outcome") == "created"
    assert r.revision == 1
    s = client.wait_ready(name)
    assert (s.desired, s.running, s.healthy) == (2, 2, 2)
    pids = [i.pid for i in s.instances]
    assert all(p > 0 and alive(p) for p in pids), pids
    assert name in [x.name for x in client.list()]

    # The same spec again changes nothing.
    assert enum_name(client.apply(toml_spec(name, [testbin, "serve"], replicas=2)), "outcome") == "unchanged"

    scaled = client.scale(name, 3)
    assert (scaled.previous, scaled.replicas) == (2, 3)
    s = client.wait_ready(name)
    assert len([i for i in s.instances if i.pid > 0]) == 3

    d = client.delete(name)
    assert d.stopped_instances == 3
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "instances stopped"
    with pytest.raises(CorralError) as e:
        client.get(name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_typed_spec_is_applied_like_toml(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-typed")
    spec = pb.ServiceSpec(
        name=name,
        command=[testbin, "serve"],
        replicas=1,
        env={"GREETING": "hi"},
        resources=pb.Resources(memory_bytes=64 << 20, pids=64),
    )
    dry = client.apply(spec, dry_run=True)
    assert enum_name(dry, "outcome") == "created"
    with pytest.raises(CorralError):
        client.get(name)  # a dry run applies nothing
    client.apply(spec)
    s = client.wait_ready(name)
    assert s.spec.command[:] == [testbin, "serve"]
    assert s.spec.env["GREETING"] == "hi"
    assert s.spec.resources.pids == 64


def test_invalid_specs_name_the_field(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-bad")
    with pytest.raises(CorralError) as e:
        client.apply(f'name = "{name}"\ncommand = ["/bin/true"]\n[resources]\nmemory = "12XB"\n')
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resources.memory" in e.value.message and "12XB" in e.value.message
    with pytest.raises(CorralError) as e:
        client.get("Not A Name")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith("name: ")


def test_an_undecodable_request_is_invalid_argument(socket_path: str) -> None:
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        # Field 1 (name) as a string that is not UTF-8, then a truncated varint.
        raw = ch.unary_unary("/corral.v1.Agent/Get")
        for body in (b"\x0a\x03\xff\xfe\xfd", b"\x0a\xff"):
            with pytest.raises(grpc.RpcError) as e:
                raw(body, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "Get" in e.value.details()


def test_signal_reaches_the_service_process(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-sig")
    client.apply(toml_spec(name, [testbin, "serve-signals"], extra='[restart]\nbackoff = "0s"\n'))
    s = client.wait_ready(name)
    inst = s.instances[0]
    # Its USR1 handler is in place once it prints "ready"; running comes before that.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(line.text.startswith("ready") for line in client.logs(instance=inst.id, tail=10)):
            break
        time.sleep(0.05)
    r = client.signal(inst.id, "usr1")
    assert r.signal == "SIGUSR1"
    assert r.pid == inst.pid
    # serve-signals exits 3 on SIGUSR1; the agent records it and starts it again.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        i = client.get(name).instances[0]
        if i.restarts >= 1 and i.last_exit.code == 3:
            break
        time.sleep(0.05)
    assert i.restarts >= 1 and i.last_exit.code == 3, i
    with pytest.raises(CorralError) as e:
        client.signal(inst.id, "SIGNOPE")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_logs_tail_and_follow(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-logs")
    client.apply(toml_spec(name, [testbin, "ticker", "20"]))
    client.wait_ready(name)
    deadline = time.monotonic() + 20
    lines: list[pb.LogLine] = []
    while len(lines) < 5 and time.monotonic() < deadline:
        lines = list(client.logs(service=name, tail=5))
        time.sleep(0.05)
    assert len(lines) == 5
    assert all(line.instance == f"{name}-0" for line in lines)
    assert any(line.text.startswith("tick=") and line.stream == "stdout" for line in lines)
    # Follow: new records arrive as they are written.
    last = lines[-1].time.ToNanoseconds()
    followed = list(itertools.islice(client.logs(instance=f"{name}-0", tail=0, follow=True, timeout=30), 10))
    assert len(followed) == 10
    assert all(line.time.ToNanoseconds() >= last for line in followed)


def test_not_found_and_the_node(client: Client) -> None:
    with pytest.raises(CorralError) as e:
        client.get("py-never-applied")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    node = client.node()
    assert node.cpus >= 1 and node.memory_total_bytes > 0
    assert node.kernel == os.uname().release
