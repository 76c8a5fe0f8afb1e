"""Watch: replay from an index, follow, filters, and resuming where a watch ended."""

from __future__ import annotations

import threading
from typing import Callable

import grpc
import pytest

from conftest import toml_spec
from corral_client import Client, CorralError, enum_name, pb


def test_replay_then_follow_in_order(client: Client, service: Callable[[str], str], testbin: str) -> None:
    start = client.node()  # connection warm
    del start
    name = service("py-watch")
    # Where the log is now: the last event's index + 1.
    backlog = list(client.watch(follow=False))
    begin = backlog[-1].index + 1 if backlog else 1
    got: list[pb.Event] = []
    done = threading.Event()

    def follow() -> None:
        for ev in client.watch(from_index=begin, service=name):
            got.append(ev)
            if enum_name(ev, "type") == "deleted":
                break
        done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    client.apply(toml_spec(name, [testbin, "serve"]))
    client.wait_ready(name)
    client.scale(name, 2)
    client.wait_ready(name)
    client.delete(name)
    assert done.wait(30), [enum_name(e, "type") for e in got]
    types = [enum_name(e, "type") for e in got]
    assert types[0] == "applied", types
    assert "instance_started" in types and "scaled" in types and types[-1] == "deleted", types
    assert all(e.service == name for e in got)
    indexes = [e.index for e in got]
    assert indexes == sorted(set(indexes)), "in order, each once"


def test_resume_from_an_index_misses_nothing(client: Client, service: Callable[[str], str], testbin: str) -> None:
    name = service("py-resume")
    client.apply(toml_spec(name, [testbin, "serve"]))
    client.wait_ready(name)
    everything = list(client.watch(follow=False))
    assert len(everything) >= 3
    # Stop after some events, then resume from the next index: together, the same events.
    first = []
    for ev in client.watch(from_index=everything[0].index, follow=False):
        first.append(ev)
        if len(first) == len(everything) // 2:
            break
    rest = list(client.watch(from_index=first[-1].index + 1, follow=False))
    assert [e.index for e in first + rest][: len(everything)] == [e.index for e in everything]


def test_an_index_not_yet_reached_is_out_of_range(client: Client) -> None:
    with pytest.raises(CorralError) as e:
        next(iter(client.watch(from_index=10**12)))
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE
