"""mTLS over TCP: the client certificate's OU is the caller's role."""

from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest

from conftest import toml_spec
from corral_client import Client, CorralError, Tls, enum_name


def tls_client(env: dict[str, Any], who: str) -> Client:
    t = env["tls"]
    return Client.mtls(f"localhost:{t['port']}", Tls(ca=t["ca"], cert=t[who]["cert"], key=t[who]["key"]))


def test_roles(env: dict[str, Any], service: Callable[[str], str], testbin: str) -> None:
    name = service("py-tls")
    spec = toml_spec(name, [testbin, "serve"])
    with tls_client(env, "read") as read:
        assert isinstance(read.list(), list)
        assert read.node().agent_version
        with pytest.raises(CorralError) as e:
            read.apply(spec)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "Apply needs role admin" in e.value.message
        # A dry run is a read: it answers, and changes nothing.
        before = read.snapshot().event_index
        dry = read.apply(spec, dry_run=True)
        assert enum_name(dry, "outcome") == "created" and dry.generation == 1
        with pytest.raises(CorralError) as e:
            read.get(name)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert not list(read.watch(from_index=before + 1, service=name, follow=False)), "no event"
    with tls_client(env, "admin") as admin:
        assert admin.apply(spec).revision == 1
        admin.wait_ready(name)
        assert admin.health(name) == "serving"
    with tls_client(env, "read") as read:
        # A dry run of an update says what would change, and changes nothing.
        s = read.get(name)
        before = read.snapshot().event_index
        dry = read.apply(spec.replace("replicas = 1", "replicas = 2"), dry_run=True)
        assert enum_name(dry, "outcome") == "scaled" and dry.generation == s.generation + 1
        after = read.get(name)
        assert (after.generation, after.desired, after.spec.replicas) == (s.generation, 1, 1)
        changes = [
            enum_name(ev, "type")
            for ev in read.watch(from_index=before + 1, service=name, follow=False)
            if enum_name(ev, "type") in ("applied", "scaled")
        ]
        assert changes == [], changes
    with tls_client(env, "nobody") as nobody:
        with pytest.raises(CorralError) as e:
            nobody.list()
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_a_wrong_ca_is_refused_at_the_handshake(env: dict[str, Any]) -> None:
    t = env["tls"]
    # The agent's own certificate is no CA for it: the client refuses the server.
    bad = Tls(ca=t["admin"]["cert"], cert=t["admin"]["cert"], key=t["admin"]["key"])
    with Client.mtls(f"localhost:{t['port']}", bad, timeout=5) as c:
        with pytest.raises(CorralError) as e:
            c.list()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
