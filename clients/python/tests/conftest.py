"""Fixtures: a real ``corrald`` described by the JSON file ``$CORRAL_TEST_ENV``.

``cargo test -p corral-e2e --test python_client`` (as root) starts the agent, with a Unix
socket and an mTLS listener, writes that file and runs this suite; the file holds:

- ``socket``: the agent's Unix socket
- ``tls``: ``port``, ``ca``, and ``admin`` / ``read`` / ``nobody`` certificate and key paths
- ``testbin``: ``corral-testbin``, the workload binary services run
- ``corrald``: the agent binary, and ``spare_cgroup``: a ``--cgroup-parent`` for an agent a
  test starts itself (the shutdown test)
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from corral_client import Client, CorralError


@pytest.fixture(scope="session")
def env() -> dict[str, Any]:
    path = os.environ.get("CORRAL_TEST_ENV")
    if not path:
        pytest.fail(
            "CORRAL_TEST_ENV is not set: run this suite through "
            "`cargo test -p corral-e2e --test python_client` (as root), which starts an agent for it"
        )
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def socket_path(env: dict[str, Any]) -> str:
    return env["socket"]


@pytest.fixture(scope="session")
def client(socket_path: str) -> Iterator[Client]:
    with Client.unix(socket_path) as c:
        yield c


@pytest.fixture(scope="session")
def testbin(env: dict[str, Any]) -> str:
    return env["testbin"]


@pytest.fixture
def service(client: Client) -> Iterator[Callable[[str], str]]:
    """Names for this test's services (``<prefix>-<random>``), deleted when it ends."""
    made: list[str] = []

    def name(prefix: str) -> str:
        n = f"{prefix}-{uuid.uuid4().hex[:6]}"
        made.append(n)
        return n

    yield name
    for n in made:
        try:
            client.delete(n)
        except CorralError:
            pass


def toml_spec(name: str, command: list[str], *, replicas: int = 1, extra: str = "") -> str:
    """A spec file's text."""
    cmd = ", ".join(json.dumps(c) for c in command)
    return f'name = "{name}"\ncommand = [{cmd}]\nreplicas = {replicas}\n{extra}'


FAST_ROLLOUT = '[rollout]\nmin_healthy = "100ms"\nhealthy_deadline = "30s"\n'
