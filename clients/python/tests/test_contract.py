"""What a scheduler builds on, checked from the outside with a stock grpcio client: refusals
at Apply that name the field (and the run-time reason in status when there is one), the
canonical spec in status, structured errors decoded from ``grpc-status-details-bin``,
optimistic concurrency with ``expected_revision``, and a List-then-Watch that loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Callable

import grpc
import pytest
from grpc_status import rpc_status

from conftest import toml_spec
from corral_client import Client, CorralError, enum_name, pb


def refused(call: Callable[[], object]) -> CorralError:
    with pytest.raises(CorralError) as e:
        call()
    return e.value


# -- defect 3: refused at Apply, naming the field ---------------------------------------------


def test_programs_that_cannot_run_are_refused_naming_the_field(
    client: Client, service: Callable[[str], str]
) -> None:
    name = service("py-noprog")
    e = refused(lambda: client.apply(toml_spec(name, ["no-such-program-anywhere"])))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.reason == "HOST_CANNOT_RUN"
    [(kind, subject, why)] = e.precondition_violations
    assert (kind, subject) == ("HOST", "command[0]")
    assert "not found in the service's PATH" in why
    # The same name is found once the spec's own PATH holds it.
    ok = client.apply(toml_spec(name, ["sh", "-c", "sleep 1000"], replicas=0), dry_run=True)
    assert enum_name(ok, "outcome") == "created"

    e = refused(
        lambda: client.apply(
            toml_spec(name, ["/bin/sleep", "1000"], extra='[health]\nexec = ["/nonexistent/check"]\n')
        )
    )
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [v[1] for v in e.precondition_violations] == ["health.exec[0]"]
    with pytest.raises(CorralError):
        client.get(name)  # nothing was applied


def test_too_few_pids_are_refused_with_the_minimum(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-pids")
    e = refused(lambda: client.apply(toml_spec(name, ["/bin/sleep", "1000"], extra="[resources]\npids = 1\n")))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, why)] = e.field_violations
    assert field == "resources.pids"
    assert "below 2" in why and "init" in why
    e = refused(
        lambda: client.apply(
            toml_spec(name, ["/bin/sleep", "1000"], extra='[resources]\npids = 3\n[health]\nexec = ["/bin/true"]\n')
        )
    )
    assert e.field_violations[0][0] == "resources.pids" and "below 4" in e.field_violations[0][1]


def test_a_fixed_port_in_use_is_refused(client: Client, service: Callable[[str], str], testbin: str) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    name = service("py-port")
    try:
        e = refused(lambda: client.apply(toml_spec(name, [testbin, "serve"], extra=f"[ports]\nadmin = {port}\n")))
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION
        [(_, subject, why)] = e.precondition_violations
        assert subject == "ports.admin"
        assert f"port {port} is already in use" in why
    finally:
        holder.close()
    # Free again: accepted, and the instance gets it.
    client.apply(toml_spec(name, [testbin, "serve"], extra=f"[ports]\nadmin = {port}\n"))
    s = client.wait_ready(name)
    assert s.instances[0].ports["admin"] == port
    # Its own instance holding the port does not refuse an update of the same service.
    r = client.apply(toml_spec(name, [testbin, "serve"], extra=f'env = {{ V = "2" }}\n[ports]\nadmin = {port}\n'))
    assert enum_name(r, "outcome") == "updated"


def test_a_failed_run_says_why_in_status(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-why")
    client.apply(
        toml_spec(
            name,
            ["/bin/sh", "-c", "echo starting; echo 'bind: Address already in use' >&2; exit 3"],
            extra='[restart]\nbackoff = "5s"\nbackoff_max = "5s"\n',
        )
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        i = client.get(name).instances[0]
        if i.HasField("last_exit"):
            break
        time.sleep(0.05)
    assert i.last_exit.code == 3, i
    assert "Address already in use" in i.last_exit.stderr_tail, i.last_exit
    assert "starting" not in i.last_exit.stderr_tail, "stderr only"


# -- defect 4: the canonical spec, signal names, long names -----------------------------------


def test_status_spec_is_canonical_and_applies_unchanged(
    client: Client, service: Callable[[str], str]
) -> None:
    name = service("py-canon")
    client.apply(toml_spec(name, ["/bin/sleep", "1000"], extra='[resources]\nmemory = "64MiB"\n'))
    s = client.wait_ready(name)
    spec = s.spec
    assert spec.resources.memory_bytes == 64 << 20
    assert spec.resources.nofile > 0, "the open-file limit instances get"
    assert spec.isolation.hostname == "{instance}"
    assert "CAP_KILL" in spec.isolation.capabilities.names, "root's default set"
    assert spec.restart.backoff_ms == 100 and spec.restart.backoff_max_ms == 30_000
    assert spec.stop.grace_ms == 10_000 and spec.stop.signal == "SIGTERM"
    assert spec.logs.max_size_bytes == 10 << 20
    assert (spec.rollout.min_healthy_ms, spec.rollout.healthy_deadline_ms) == (500, 60_000)
    # What status shows is the spec itself: applying it back changes nothing.
    again = client.apply(spec)
    assert enum_name(again, "outcome") == "unchanged", again.changes
    assert again.generation == s.generation


def test_a_signal_by_number_answers_its_name(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-signum")
    client.apply(toml_spec(name, [testbin, "serve"]))
    s = client.wait_ready(name)
    # SIGWINCH is ignored by default: the instance goes on.
    assert client.signal(s.instances[0].id, "28").signal == "SIGWINCH"
    assert client.signal(s.instances[0].id, "10").signal == "SIGUSR1"


def test_the_longest_name_gets_a_hostname_that_fits(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-l")
    name = (name + "x" * 63)[:63]
    try:
        client.apply(toml_spec(name, ["/bin/sh", "-c", "cat /proc/sys/kernel/hostname; exec sleep 1000"]))
        client.wait_ready(name)
        deadline = time.monotonic() + 20
        lines: list[pb.LogLine] = []
        while not lines and time.monotonic() < deadline:
            lines = list(client.logs(service=name))
            time.sleep(0.05)
        hostname = lines[0].text
        assert len(hostname) == 64 and hostname.endswith("-0"), hostname
        assert hostname[:-2] == name[:62]
    finally:
        client.delete(name)


# -- structured errors -------------------------------------------------------------------------


def test_errors_carry_standard_details(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-details")
    bad = f'name = "{name}"\ncommand = []\nreplicas = 5000\n[resources]\nmemory = "12XB"\n'
    with pytest.raises(grpc.RpcError) as raw:
        client.agent.Apply(pb.ApplyRequest(spec_toml=bad), timeout=10)
    # Decoded with grpcio-status alone, as any grpcio client would.
    status = rpc_status.from_call(raw.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    from google.rpc import error_details_pb2

    kinds = {d.type_url.rsplit("/", 1)[1] for d in status.details}
    assert {"google.rpc.BadRequest", "google.rpc.ErrorInfo"} <= kinds, kinds
    br = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(br.DESCRIPTOR)).Unpack(br)
    fields = [v.field for v in br.field_violations]
    assert sorted(fields) == ["command", "replicas", "resources.memory"], fields

    # A request field of its own.
    e = refused(lambda: client.get("Not A Name"))
    assert e.field_violations[0][0] == "name"
    # NOT_FOUND names the resource.
    e = refused(lambda: client.get("py-never-there"))
    assert (e.code, e.reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_NOT_FOUND")


def test_watch_errors_say_where_to_resume(client: Client) -> None:
    last = list(client.watch(follow=False))[-1].index
    e = refused(lambda: next(iter(client.watch(from_index=last + 1000, resume=False))))
    assert (e.code, e.reason) == (grpc.StatusCode.OUT_OF_RANGE, "INDEX_PAST_END")
    assert int(e.metadata["next_index"]) >= last + 1


# -- optimistic concurrency --------------------------------------------------------------------


def test_two_writers_one_wins_each_round(client: Client, socket_path: str, service: Callable[[str], str]) -> None:
    name = service("py-race")
    created = client.apply(toml_spec(name, ["/bin/sleep", "1000"], replicas=0), expected_revision=0)
    assert created.generation == 1
    # Creating again "only if absent" is refused with the current generation.
    e = refused(lambda: client.apply(toml_spec(name, ["/bin/sleep", "1000"], replicas=0), expected_revision=0))
    assert (e.code, e.reason, e.metadata["current_generation"]) == (grpc.StatusCode.ABORTED, "GENERATION_MISMATCH", "1")

    writers = [Client.unix(socket_path), Client.unix(socket_path)]
    try:
        for round_ in range(20):
            generation = client.get(name).generation
            barrier = threading.Barrier(2)
            results: list[object] = [None, None]

            # Each writer applies its own env value: both are real changes of the same
            # generation, so exactly one may win.
            def update(i: int) -> None:
                barrier.wait()
                try:
                    results[i] = writers[i].apply(
                        toml_spec(name, ["/bin/sleep", "1000"], replicas=0, extra=f'env = {{ W = "{round_}-{i}" }}\n'),
                        expected_revision=generation,
                    )
                except CorralError as err:
                    results[i] = err

            threads = [threading.Thread(target=update, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            wins = [r for r in results if isinstance(r, pb.ApplyResponse)]
            losses = [r for r in results if isinstance(r, CorralError)]
            assert len(wins) == 1 and len(losses) == 1, results
            assert wins[0].generation == generation + 1
            assert losses[0].code == grpc.StatusCode.ABORTED
            assert losses[0].metadata["current_generation"] == str(generation + 1)
        # Every accepted change counted: created, then one per round.
        assert client.get(name).generation == 21
    finally:
        for w in writers:
            w.close()

    # The other writes take it too: scale, restart, rollback, delete.
    g = client.get(name).generation
    assert refused(lambda: client.scale(name, 0, expected_revision=g - 1)).code == grpc.StatusCode.ABORTED
    assert client.scale(name, 0, expected_revision=g).generation == g, "no change, no new generation"
    assert refused(lambda: client.restart(name, expected_revision=g + 1)).code == grpc.StatusCode.ABORTED
    assert client.restart(name, expected_revision=g).generation == g + 1
    assert refused(lambda: client.delete(name, expected_revision=g)).code == grpc.StatusCode.ABORTED
    assert client.delete(name, expected_revision=g + 1).generation == g + 1


# -- List then Watch ---------------------------------------------------------------------------


def test_list_then_watch_loses_nothing_across_a_burst(
    client: Client, socket_path: str, service: Callable[[str], str]
) -> None:
    name = service("py-burst")
    spec = lambda n: toml_spec(name, ["/bin/sleep", "1000"], replicas=0, extra=f'env = {{ N = "{n}" }}\n')  # noqa: E731
    client.apply(spec(0))
    burst = 1000
    started = threading.Event()

    def writer() -> None:
        with Client.unix(socket_path) as w:
            started.set()
            for n in range(1, burst + 1):
                w.apply(spec(n))

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    started.wait(10)
    time.sleep(0.05)  # the burst under way while the snapshot is taken
    snap = client.snapshot()
    mine = next(s for s in snap.services if s.name == name)
    seen_revision = mine.revision
    revisions: list[int] = []
    bookmarks = 0
    assert seen_revision < burst + 1, "the snapshot was taken while the burst went on"
    for ev in client.watch(from_index=snap.event_index + 1, service=name, bookmark_interval=0.2):
        kind = enum_name(ev, "type")
        if kind == "bookmark":
            bookmarks += 1
            # Everything up to here was passed: with the writer done, a missing event
            # would never come.
            if not t.is_alive():
                break
            continue
        assert ev.index > snap.event_index
        if kind == "applied":
            revisions.append(ev.attributes["revision"].number)
            if revisions[-1] == burst + 1:
                break
    t.join(60)
    # Every revision after the snapshot's, once, in order: nothing lost, nothing repeated.
    assert revisions == list(range(seen_revision + 1, burst + 2)), (seen_revision, revisions[:5], revisions[-5:])


def test_bookmarks_carry_the_current_index(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-bookmark")
    client.apply(toml_spec(name, ["/bin/sleep", "1000"], replicas=0))
    last = list(client.watch(follow=False))[-1].index
    # A filter that matches nothing new: only bookmarks arrive, each at the log's end.
    stream = client.watch(from_index=last + 1, service=name, bookmark_interval=0.2)
    marks = []
    for ev in stream:
        assert enum_name(ev, "type") == "bookmark"
        marks.append(ev.index)
        if len(marks) == 2:
            break
    assert all(m >= last for m in marks), (last, marks)
    e = refused(lambda: next(iter(client.watch(from_index=last, bookmark_interval=0.005, resume=False))))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.field_violations[0][0] == "bookmark_interval_ms"


# -- labels, selectors, pages ------------------------------------------------------------------


def test_labels_select_services_in_list_and_watch(client: Client, service: Callable[[str], str]) -> None:
    tag = service("py-lbl")  # a value unique to this test
    names = {}
    for role, tier in (("web", "front"), ("api", "front"), ("db", "back")):
        n = service(f"py-{role}")
        names[role] = n
        labels = f'[labels]\nrun = "{tag}"\napp = "{role}"\ntier = "{tier}"\n'
        r = client.apply(toml_spec(n, ["/bin/sleep", "1000"], replicas=0, extra=labels))
        assert enum_name(r, "outcome") == "created"
    got = lambda sel: sorted(s.name for s in client.list(f"run={tag},{sel}"))  # noqa: E731
    assert got("tier=front") == sorted([names["web"], names["api"]])
    assert got("tier!=front") == [names["db"]]
    assert got("app in (web,db)") == sorted([names["web"], names["db"]])
    assert got("app notin (web,db)") == [names["api"]]
    assert got("tier,!missing") == sorted(names.values())
    assert client.get(names["web"]).spec.labels["app"] == "web"

    # Pages: by name, each once, a token to go on.
    first = client.snapshot(f"run={tag}", page_size=2)
    assert len(first.services) == 2 and first.next_page_token
    second = client.snapshot(f"run={tag}", page_size=2, page_token=first.next_page_token)
    assert len(second.services) == 1 and not second.next_page_token
    paged = [s.name for s in first.services] + [s.name for s in second.services]
    assert paged == sorted(names.values())

    # A bad selector is refused naming it.
    e = refused(lambda: client.list("tier in (front"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.field_violations[0][0] == "selector" and "not closed" in e.field_violations[0][1]

    # Relabeling is in place: same revision, a new generation, no instance replaced.
    before = client.get(names["api"])
    r = client.apply(
        toml_spec(
            names["api"],
            ["/bin/sleep", "1000"],
            replicas=0,
            extra=f'[labels]\nrun = "{tag}"\napp = "api"\ntier = "back"\n',
        )
    )
    assert enum_name(r, "outcome") == "labeled" and r.revision == before.revision
    assert r.generation == before.generation + 1
    assert got("tier=back") == sorted([names["api"], names["db"]])

    # Watch with a selector: only the events of matching services.
    start = client.snapshot().event_index + 1
    for role in ("web", "db"):
        client.apply(
            toml_spec(names[role], ["/bin/sleep", "1000"], replicas=0, extra=f'env = {{ X = "1" }}\n[labels]\nrun = "{tag}"\napp = "{role}"\ntier = "{"front" if role == "web" else "back"}"\n')
        )
    seen = []
    for ev in client.watch(from_index=start, selector=f"run={tag},tier=front", follow=False):
        seen.append(ev.service)
    assert seen and set(seen) == {names["web"]}, seen


def test_bad_labels_are_refused_naming_the_key(client: Client, service: Callable[[str], str]) -> None:
    name = service("py-badlbl")
    e = refused(
        lambda: client.apply(
            toml_spec(name, ["/bin/true"], extra='[labels]\n"-bad" = "x"\nok = "no spaces allowed"\n')
        )
    )
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = sorted(f for f, _ in e.field_violations)
    assert fields == ["labels.-bad", "labels.ok"], e.field_violations


# -- capacity and identity ---------------------------------------------------------------------


def test_capacity_admission_and_node_identity(env: dict, tmp_path) -> None:  # type: ignore[type-arg]
    import os

    from test_shutdown import OwnAgent

    agent = OwnAgent(env, tmp_path, ["--reserve", "cpu=0.5,memory=512MiB"])
    agent.start()
    try:
        with Client.unix(agent.socket) as c:
            node = c.node()
            assert 1 <= node.capacity.cpu <= len(os.sched_getaffinity(0))
            assert node.capacity.cpu == node.cpus
            assert node.capacity.memory_bytes == node.memory_total_bytes
            assert node.allocatable.cpu == pytest.approx(node.capacity.cpu - 0.5)
            assert node.allocatable.memory_bytes == node.capacity.memory_bytes - (512 << 20)
            assert (node.committed.cpu, node.committed.memory_bytes) == (0, 0)
            assert (node.overcommit_cpu, node.overcommit_memory) == (1.0, 1.0)
            boot = open("/proc/sys/kernel/random/boot_id").read().strip()
            assert node.boot_id == boot
            node_id = node.node_id
            assert len(node_id) == 36

            alloc = node.allocatable.cpu
            # Half of what may be committed, twice: the third such instance is refused.
            half = round(alloc / 2, 3)
            spec = lambda n, r: toml_spec(n, ["/bin/sleep", "1000"], replicas=r, extra=f"[resources]\ncpu = {half}\n")  # noqa: E731
            c.apply(spec("cap-a", 1))
            c.apply(spec("cap-b", 0))  # no instance, nothing committed
            assert c.node().committed.cpu == pytest.approx(half)
            c.scale("cap-b", 1)
            e = refused(lambda: c.scale("cap-b", 2))
            assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXCEEDED")
            assert float(e.metadata["cpu_requested"]) == pytest.approx(2 * half)
            assert float(e.metadata["cpu_committed"]) == pytest.approx(half)
            assert float(e.metadata["cpu_allocatable"]) == pytest.approx(alloc)
            assert [v[1] for v in e.precondition_violations] == ["resources.cpu"]
            e = refused(lambda: c.apply(spec("cap-c", 1)))
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A service without limits commits nothing and is never refused.
            c.apply(toml_spec("cap-free", ["/bin/sleep", "1000"], replicas=0))
            # Memory: more than allocatable in one service.
            too_much = node.allocatable.memory_bytes + (1 << 20)
            e = refused(
                lambda: c.apply(
                    toml_spec("cap-mem", ["/bin/sleep", "1000"], extra=f"[resources]\nmemory = {too_much}\n")
                )
            )
            assert e.reason == "CAPACITY_EXCEEDED" and "memory_requested" in e.metadata
            for n in ("cap-a", "cap-b", "cap-free"):
                c.delete(n)
        agent.stop(timeout=10)

        # Again, with overcommit: the same request fits; the node keeps its id.
        agent.args = ["--reserve", "cpu=0.5,memory=512MiB", "--overcommit", "cpu=4.0,memory=1.0"]
        agent.start()
        with Client.unix(agent.socket) as c:
            node = c.node()
            assert node.node_id == node_id, "persisted in the state directory"
            assert node.overcommit_cpu == 4.0
            c.apply(spec("cap-a", 0))
            c.scale("cap-a", 3)
            assert c.node().committed.cpu == pytest.approx(3 * half)
            c.delete("cap-a")
        agent.stop(timeout=10)
    finally:
        agent.kill()


def test_usage_reports_cpu_throttling_and_memory_pressure(
    client: Client, service: Callable[[str], str], testbin: str
) -> None:
    name = service("py-throttle")
    client.apply(toml_spec(name, [testbin, "hog-cpu"], extra="[resources]\ncpu = 0.1\n"))
    client.wait_ready(name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        u = client.get(name).instances[0].usage
        if u.nr_throttled > 0 and u.throttled_usec > 0:
            break
        time.sleep(0.2)
    assert u.nr_throttled > 0 and u.throttled_usec > 0, u
    # Per-cgroup memory pressure exists on cgroup v2 only.
    v2 = client.node().cgroup_version == "v2"
    assert u.HasField("memory_pressure") == v2, (client.node().cgroup_version, u)


# -- batch ----------------------------------------------------------------------------------------


def test_a_batch_applies_all_or_nothing(client: Client, service: Callable[[str], str], env: dict) -> None:  # type: ignore[type-arg]
    a, b = service("py-ba"), service("py-bb")
    sleep = ["/bin/sleep", "1000"]
    # The second spec cannot run here: neither is applied.
    e = refused(lambda: client.apply_batch([toml_spec(a, sleep, replicas=0), toml_spec(b, ["no-such-program-anywhere"])]))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    for n in (a, b):
        assert refused(lambda: client.get(n)).code == grpc.StatusCode.NOT_FOUND
    # A field error names the request it is in.
    e = refused(lambda: client.apply_batch([toml_spec(a, sleep), f'name = "{b}"\ncommand = []\n']))
    assert [f for f, _ in e.field_violations] == ["requests[1].command"]
    # Both, in order, each with its outcome.
    rs = client.apply_batch([toml_spec(a, sleep, replicas=0), toml_spec(b, sleep, replicas=0)])
    assert [(r.name, enum_name(r, "outcome"), r.generation) for r in rs] == [(a, "created", 1), (b, "created", 1)]
    # Expected generations guard each one; one stale refuses the batch.
    e = refused(
        lambda: client.apply_batch(
            [toml_spec(a, sleep, replicas=1), toml_spec(b, sleep, replicas=1)], expected_revisions=[1, 5]
        )
    )
    assert (e.code, e.reason) == (grpc.StatusCode.ABORTED, "GENERATION_MISMATCH")
    assert (client.get(a).desired, client.get(b).desired) == (0, 0)
    # The read role may ask for a dry run of a batch, and it changes nothing.
    from test_tls import tls_client

    with tls_client(env, "read") as read:
        dry = read.apply_batch([toml_spec(a, sleep, replicas=2)], dry_run=True)
        assert enum_name(dry[0], "outcome") == "scaled"
        assert refused(lambda: read.apply_batch([toml_spec(a, sleep, replicas=2)])).code == grpc.StatusCode.PERMISSION_DENIED
    assert client.get(a).desired == 0


# -- identity: every run of an instance has its own id ------------------------------------------


def test_each_run_has_an_incarnation_id_in_status_events_and_logs(
    client: Client, service: Callable[[str], str]
) -> None:
    name = service("py-inc")
    client.apply(toml_spec(name, ["/bin/sh", "-c", "echo up; exec sleep 1000"]))
    first = client.wait_ready(name).instances[0]
    assert first.incarnation != 0
    # Running is not yet having printed: the first run's line is logged before it is killed.
    deadline = time.monotonic() + 20
    while not any(line.text == "up" for line in client.logs(name)):
        assert time.monotonic() < deadline, "the first run never printed"
        time.sleep(0.05)
    # The service's process replaced by the restart policy: a new run, a new id.
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now = client.get(name).instances[0]
        if enum_name(now, "state") == "running" and now.pid > 0 and now.pid != first.pid:
            break
        assert time.monotonic() < deadline, f"not restarted: {now}"
        time.sleep(0.2)
    assert now.incarnation not in (0, first.incarnation)
    # Events and log lines carry the same field.
    started = [
        e.incarnation
        for e in client.watch(instance=first.id, follow=False)
        if enum_name(e, "type") == "instance_started"
    ]
    assert started == [first.incarnation, now.incarnation]
    deadline = time.monotonic() + 20
    while True:
        ups = [line.incarnation for line in client.logs(name) if line.text == "up"]
        if len(ups) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ups == [first.incarnation, now.incarnation]
