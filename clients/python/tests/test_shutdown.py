"""SIGTERM with 10 streams open (Watch, health Watch, Logs, each following): every stream
ends with UNAVAILABLE (a Watch told the index to resume at), the agent exits promptly, its
instances keep running, and a watch resumed at that index once the agent is back misses
nothing."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import toml_spec
from corral_client import Client, CorralError, enum_name, pb, pb_grpc


class OwnAgent:
    """A corrald of this test's own, on the spare cgroup parent."""

    def __init__(self, env: dict[str, Any], root: Path, args: Optional[list[str]] = None):
        self.env = env
        self.root = root
        self.args = args or []
        self.socket = root / "corral.sock"
        self.log = root / "corrald.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.env["corrald"],
                    "--state-dir", str(self.root / "state"),
                    "--socket", str(self.socket),
                    "--cgroup-parent", self.env["spare_cgroup"],
                    *self.args,
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if self.socket.exists():
                try:
                    with Client.unix(self.socket, timeout=2) as c:
                        c.list()
                    return
                except CorralError:
                    pass
            time.sleep(0.02)
        raise AssertionError("corrald did not serve within 30 s:\n" + self.log.read_text())

    def stop(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; the exit code and seconds until the process was gone."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - start
        self.proc = None
        return code, elapsed

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def own_agent(env: dict[str, Any], tmp_path: Path) -> Iterator[OwnAgent]:
    a = OwnAgent(env, tmp_path)
    a.start()
    try:
        yield a
    finally:
        a.kill()


class Reader:
    """Drains one server stream in a thread; keeps what came and how it ended."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.items: list[Any] = []
        self.error: Optional[grpc.RpcError] = None
        self.first = threading.Event()
        self.ended = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for item in self.stream:
                self.items.append(item)
                self.first.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first.set()
            self.ended.set()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_sigterm_ends_ten_streams_and_a_watch_resumes(own_agent: OwnAgent, testbin: str) -> None:
    name = "py-stop"
    client = Client.unix(own_agent.socket)
    client.apply(toml_spec(name, [testbin, "ticker", "50"]))
    pid = client.wait_ready(name).instances[0].pid

    # The resuming watch (one of the four Watch streams), from the first event.
    resumed: list[pb.Event] = []
    resumes: list[int] = []
    seen_after: threading.Event = threading.Event()

    def follow() -> None:
        for ev in client.watch(from_index=1, on_resume=lambda i, _e: resumes.append(i), reconnect_timeout=60):
            resumed.append(ev)
            if resumes and ev.service == name and enum_name(ev, "type") == "scaled":
                seen_after.set()
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()

    ch = grpc.insecure_channel(f"unix:{own_agent.socket}")
    stub, health = pb_grpc.AgentStub(ch), health_pb2_grpc.HealthStub(ch)
    watches = [Reader(stub.Watch(pb.WatchRequest(from_index=1, follow=True))) for _ in range(3)]
    healths = [Reader(health.Watch(health_pb2.HealthCheckRequest(service=s))) for s in ("", name, "corral.v1.Agent")]
    logs = [Reader(stub.Logs(pb.LogsRequest(service=name, follow=True))) for _ in range(3)]
    streams = watches + healths + logs
    for r in streams:
        assert r.first.wait(10), "every stream delivered something"
    deadline = time.monotonic() + 10
    while not resumed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resumed, "the resuming watch is open"

    code, elapsed = own_agent.stop(timeout=10)
    print(f"\ncorrald exited {elapsed * 1000:.0f} ms after SIGTERM with 10 streams open")
    assert code == 0
    log = own_agent.log.read_text()
    assert "API stopped: every call ended" in log, log

    for r in streams:
        assert r.ended.wait(5)
        assert r.error is not None and r.error.code() == grpc.StatusCode.UNAVAILABLE, r.error
        assert r.error.details().startswith("agent shutting down"), r.error.details()
    for r in watches:
        m = re.fullmatch(r"agent shutting down; resume at index (\d+)", r.error.details())
        assert m, r.error.details()
        assert int(m.group(1)) == r.items[-1].index + 1, "resume right after the last event received"
    ch.close()

    # Instances outlive the agent.
    assert alive(pid)

    # Back: the resuming watch carries on from where it was told, with nothing missed.
    own_agent.start()
    client.scale(name, 2)
    assert seen_after.wait(60), "the resumed watch saw the scale"
    follower.join(10)
    assert resumes, "the watch was resumed"
    indexes = [e.index for e in resumed]
    assert indexes == list(range(indexes[0], indexes[0] + len(indexes))), indexes
    assert any(e.index >= resumes[0] for e in resumed)

    client.delete(name)
    client.close()
    code, _ = own_agent.stop(timeout=10)
    assert code == 0
    assert not alive(pid)
