"""Rollouts through the client: restart, update and rollback, each waited for."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from conftest import FAST_ROLLOUT, toml_spec
from corral_client import Client, RolloutFailed, enum_name, pb


def test_restart_replaces_every_instance(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-restart")
    client.apply(toml_spec(name, [testbin, "serve"], replicas=2, extra=FAST_ROLLOUT))
    before = {i.pid for i in client.wait_ready(name).instances}
    r = client.restart(name)
    assert r.rollout_id.startswith(f"{name}-r")
    status = client.wait_rollout(r.rollout_id, timeout=60)
    assert enum_name(status, "kind") == "restart"
    assert status.replaced == 2
    # An old instance may still be listed, stopping, right after the rollout ends.
    after = {i.pid for i in client.wait_ready(name).instances if enum_name(i, "state") == "running"}
    assert len(after) == 2 and not before & after, "fresh processes"


def _only_revision(client: Client, name: str, revision: int, timeout: float = 30.0) -> pb.ServiceStatus:
    """The service's status once every listed instance is of ``revision``: a rollout ends when
    its last old instance is told to stop, which may still be listed, stopping, for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.get(name)
        revisions = {i.revision for i in s.instances}
        if revisions == {revision}:
            return s
        assert time.monotonic() < deadline, f"{name}: instances of revisions {revisions}"
        time.sleep(0.05)


def test_update_then_rollback(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-update")
    v1 = toml_spec(name, [testbin, "serve"], replicas=2, extra='env = { VERSION = "1" }\n' + FAST_ROLLOUT)
    v2 = v1.replace('VERSION = "1"', 'VERSION = "2"')
    client.apply(v1)
    client.wait_ready(name)
    r = client.apply(v2)
    assert r.replaces_instances and r.rollout_id
    done = client.wait_rollout(r.rollout_id, timeout=60)
    assert (done.from_revision, done.to_revision) == (1, 2)
    s = _only_revision(client, name, 2)
    assert s.revision == 2

    back = client.rollback(name)
    assert back.revision == 1
    client.wait_rollout(back.rollout_id, timeout=60)
    client.wait_ready(name)
    s = _only_revision(client, name, 1)
    assert s.spec.env["VERSION"] == "1"


def test_a_failing_rollout_raises_with_its_status(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-failing")
    good = toml_spec(name, [testbin, "serve"], extra=FAST_ROLLOUT)
    client.apply(good)
    client.wait_ready(name)
    bad = toml_spec(name, [testbin, "exit", "7"], extra=FAST_ROLLOUT)
    r = client.apply(bad)
    with pytest.raises(RolloutFailed) as e:
        client.wait_rollout(r.rollout_id, timeout=60)
    assert e.value.state == "failed"
    assert e.value.status.rollback_id, "auto_rollback started"
    # The automatic rollback brings the first revision back.
    back = client.wait_rollout(e.value.status.rollback_id, timeout=60)
    assert enum_name(back, "kind") == "auto_rollback"
    assert {i.revision for i in client.wait_ready(name).instances} == {1}
