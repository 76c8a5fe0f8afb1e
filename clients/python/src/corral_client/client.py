"""A thin typed layer over the generated corral.v1 stubs, for schedulers.

:class:`Client` connects over the agent's Unix socket (a stock ``unix:`` channel, default
options) or over TCP with mutual TLS, and wraps each RPC in a method that returns the
generated message and raises :class:`CorralError` (the gRPC code, message and any
``google.rpc.Status`` details) instead of ``grpc.RpcError``. On top of the RPCs it adds what
every scheduler writes anyway: :meth:`Client.watch` resumes a Watch where it ended (the agent
stopping, a watcher cut off for falling behind), :meth:`Client.wait_rollout` follows a rollout
to its end, :meth:`Client.wait_ready` waits until a service runs and is healthy.

Fields the agent reports as names (rollout state, health, event type) are read through
:func:`enum_name`, which gives the same lower-case name whether the field is a string or an
enum in the proto, so code written against this module keeps working as the proto gains types.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .v1 import agent_pb2 as pb
from .v1 import agent_pb2_grpc as pb_grpc

DEFAULT_SOCKET = "/run/corral/corral.sock"
"""Where ``corrald`` serves its API by default."""

_RESUME = re.compile(r"resume (?:at|from) index (\d+)")


def enum_name(message: Message, field_name: str) -> str:
    """The lower-case name of ``message.field_name``: the string as it is, or an enum value's
    name without its type prefix (``ROLLOUT_STATE_SUCCEEDED`` -> ``succeeded``)."""
    value = getattr(message, field_name)
    fd = message.DESCRIPTOR.fields_by_name[field_name]
    if fd.enum_type is None:
        return str(value)
    number = fd.enum_type.values_by_number.get(value)
    if number is None:
        return str(value)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", fd.enum_type.name).upper() + "_"
    name = number.name
    return (name[len(prefix):] if name.startswith(prefix) else name).lower()


class CorralError(Exception):
    """A call the agent refused or could not answer.

    ``code`` is the gRPC status code and ``message`` the agent's message, which names the
    field, the value and the reason. ``details`` are the ``google.rpc.Status`` details the
    agent attached (``BadRequest``, ``ErrorInfo``, ...), as ``google.protobuf.Any``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Any] = ()):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = list(details)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "CorralError":
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", _status_details(err))

    def _unpacked(self, kind: str) -> list[Any]:
        try:
            from google.rpc import error_details_pb2
        except ImportError:  # pragma: no cover - googleapis-common-protos comes with grpcio-status
            return []
        cls = getattr(error_details_pb2, kind)
        out = []
        for detail in self.details:
            msg = cls()
            if hasattr(detail, "Is") and detail.Is(msg.DESCRIPTOR):
                detail.Unpack(msg)
                out.append(msg)
        return out

    @property
    def error_info(self) -> Any:
        """The ``google.rpc.ErrorInfo`` detail, or ``None``."""
        found = self._unpacked("ErrorInfo")
        return found[0] if found else None

    @property
    def reason(self) -> str:
        """``ErrorInfo.reason`` (``GENERATION_MISMATCH``, ``INDEX_PAST_END``, ...; see the
        README's list), or ``""``."""
        info = self.error_info
        return info.reason if info is not None else ""

    @property
    def metadata(self) -> dict[str, str]:
        """``ErrorInfo.metadata`` (``current_generation``, ``resume_index``, ...)."""
        info = self.error_info
        return dict(info.metadata) if info is not None else {}

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """``google.rpc.BadRequest``: ``(field, description)`` for each field in error."""
        return [(v.field, v.description) for b in self._unpacked("BadRequest") for v in b.field_violations]

    @property
    def precondition_violations(self) -> list[tuple[str, str, str]]:
        """``google.rpc.PreconditionFailure``: ``(type, subject, description)`` for each."""
        return [
            (v.type, v.subject, v.description)
            for p in self._unpacked("PreconditionFailure")
            for v in p.violations
        ]

    @property
    def resume_index(self) -> Optional[int]:
        """For a Watch that ended (the agent stopping, a watcher cut off): the index to
        resume from, from an ``ErrorInfo`` detail's ``resume_index`` when there is one,
        else from the message."""
        for detail in self.details:
            info = _error_info(detail)
            if info is not None and "resume_index" in info.metadata:
                try:
                    return int(info.metadata["resume_index"])
                except ValueError:
                    pass
        m = _RESUME.search(self.message)
        return int(m.group(1)) if m else None


def _status_details(err: grpc.RpcError) -> list[Any]:
    try:
        from grpc_status import rpc_status
    except ImportError:  # pragma: no cover - grpcio-status is a dependency
        return []
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        return []
    return list(status.details) if status is not None else []


def _error_info(detail: Any) -> Any:
    try:
        from google.rpc import error_details_pb2
    except ImportError:  # pragma: no cover
        return None
    info = error_details_pb2.ErrorInfo()
    if hasattr(detail, "Is") and detail.Is(info.DESCRIPTOR):
        detail.Unpack(info)
        return info
    return None


class RolloutFailed(Exception):
    """A rollout ended in another state than ``succeeded``; ``status`` is its last status."""

    def __init__(self, status: Any):
        state = enum_name(status, "state")
        super().__init__(f"rollout {status.id} {state}: {status.reason or 'no reason given'}")
        self.status = status
        self.state = state


@dataclass(frozen=True)
class Tls:
    """Mutual TLS to the agent's ``--listen`` address: the CA that signed the agent's
    certificate, and this client's certificate and key (its subject's OU is its role)."""

    ca: Union[str, Path, bytes]
    cert: Union[str, Path, bytes]
    key: Union[str, Path, bytes]
    #: The name the agent's certificate is checked against; default: the host of the target.
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )


def _pem(v: Union[str, Path, bytes]) -> bytes:
    return v if isinstance(v, bytes) else Path(v).read_bytes()


@dataclass
class Client:
    """The agent's API over one channel. Use :meth:`unix`, :meth:`mtls` or :meth:`connect`
    to make one; close it (or use it as a context manager) when done."""

    channel: grpc.Channel
    #: Seconds a unary call may take; ``None`` waits as long as it takes.
    timeout: Optional[float] = 30.0
    agent: pb_grpc.AgentStub = field(init=False)
    health_stub: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.agent = pb_grpc.AgentStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    # -- connecting -----------------------------------------------------------------------

    @classmethod
    def unix(cls, path: Union[str, Path] = DEFAULT_SOCKET, **kw: Any) -> "Client":
        """The agent's Unix socket, through a stock ``unix:`` channel with default options."""
        return cls(grpc.insecure_channel(f"unix:{os.fspath(path)}"), **kw)

    @classmethod
    def mtls(cls, target: str, tls: Tls, **kw: Any) -> "Client":
        """The agent's TLS listener at ``target`` (``host:port``)."""
        options = []
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return cls(grpc.secure_channel(target, tls.credentials(), options=options), **kw)

    @classmethod
    def connect(cls, addr: Optional[str] = None, tls: Optional[Tls] = None, **kw: Any) -> "Client":
        """The agent at ``addr`` as the CLI takes it (``unix:///path``, ``unix:/path``,
        ``https://host:port``; default ``$CORRAL_ADDR``, else the default socket)."""
        addr = addr or os.environ.get("CORRAL_ADDR") or f"unix://{DEFAULT_SOCKET}"
        if addr.startswith("unix://"):
            return cls.unix(addr[len("unix://"):], **kw)
        if addr.startswith("unix:"):
            return cls.unix(addr[len("unix:"):], **kw)
        if addr.startswith("https://"):
            if tls is None:
                raise ValueError(f"{addr}: an https:// address needs tls=Tls(ca, cert, key)")
            return cls.mtls(addr[len("https://"):], tls, **kw)
        raise ValueError(f"{addr!r} is not an agent address: use unix:///path or https://host:port")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------

    def _call(self, method: Callable[..., Any], request: Message, timeout: Optional[float] = None) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise CorralError.from_rpc_error(e) from None

    def apply(
        self,
        spec: Union[str, pb.ServiceSpec],
        *,
        dry_run: bool = False,
        force: bool = False,
        expected_revision: Optional[int] = None,
    ) -> pb.ApplyResponse:
        """Create or update a service from TOML text (a spec file's content) or a typed
        :class:`ServiceSpec`. With ``expected_revision``, only while the service's
        generation is that (0: only if it does not exist); else ``CorralError`` ABORTED."""
        if isinstance(spec, str):
            request = pb.ApplyRequest(spec_toml=spec, dry_run=dry_run, force=force)
        else:
            request = pb.ApplyRequest(spec=spec, dry_run=dry_run, force=force)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        return self._call(self.agent.Apply, request)

    def apply_batch(
        self,
        specs: Sequence[Union[str, pb.ServiceSpec]],
        *,
        dry_run: bool = False,
        force: bool = False,
        expected_revisions: Optional[Sequence[Optional[int]]] = None,
    ) -> list[pb.ApplyResponse]:
        """Apply several specs (one per service) all or nothing: every one is checked before
        any is saved; a refusal of one refuses all, and a save that fails undoes the saves
        before it. ``expected_revisions``, when given, has one entry per spec (``None``: no
        expectation)."""
        requests = []
        for i, spec in enumerate(specs):
            r = pb.ApplyRequest(spec_toml=spec, force=force) if isinstance(spec, str) else pb.ApplyRequest(spec=spec, force=force)
            if expected_revisions is not None and expected_revisions[i] is not None:
                r.expected_revision = expected_revisions[i]
            requests.append(r)
        reply = self._call(self.agent.ApplyBatch, pb.ApplyBatchRequest(requests=requests, dry_run=dry_run))
        return list(reply.results)

    def apply_file(self, path: Union[str, Path], **kw: Any) -> pb.ApplyResponse:
        return self.apply(Path(path).read_text(encoding="utf-8"), **kw)

    def get(self, name: str) -> pb.ServiceStatus:
        return self._call(self.agent.Get, pb.GetRequest(name=name))

    def list(self, selector: str = "") -> list[pb.ServiceStatus]:
        """Every service (whose labels match ``selector``, e.g. ``"app=web,tier!=db"``),
        page after page."""
        out: list[pb.ServiceStatus] = []
        token = ""
        while True:
            page = self.snapshot(selector, page_token=token)
            out.extend(page.services)
            token = page.next_page_token
            if not token:
                return out

    def snapshot(self, selector: str = "", *, page_size: int = 0, page_token: str = "") -> pb.ListResponse:
        """One page of services' statuses (by name; ``page_size`` 0: up to 1000) and
        ``event_index``, the last event they reflect: a :meth:`watch` from
        ``event_index + 1`` misses nothing and repeats nothing. ``next_page_token`` is
        empty on the last page."""
        request = pb.ListRequest(selector=selector, page_size=page_size, page_token=page_token)
        return self._call(self.agent.List, request)

    def delete(self, name: str, *, expected_revision: Optional[int] = None) -> pb.DeleteResponse:
        request = pb.DeleteRequest(name=name)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        return self._call(self.agent.Delete, request)

    def scale(self, name: str, replicas: int, *, expected_revision: Optional[int] = None) -> pb.ScaleResponse:
        request = pb.ScaleRequest(name=name, replicas=replicas)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        return self._call(self.agent.Scale, request)

    def restart(
        self, name: str, *, force: bool = False, expected_revision: Optional[int] = None
    ) -> pb.RolloutResponse:
        request = pb.RestartRequest(name=name, force=force)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        return self._call(self.agent.Restart, request)

    def rollback(
        self,
        name: str,
        revision: Optional[int] = None,
        *,
        force: bool = False,
        expected_revision: Optional[int] = None,
    ) -> pb.RolloutResponse:
        request = pb.RollbackRequest(name=name, force=force)
        if revision is not None:
            request.revision = revision
        if expected_revision is not None:
            request.expected_revision = expected_revision
        return self._call(self.agent.Rollback, request)

    def rollout(self, rollout_id: str) -> pb.RolloutStatus:
        return self._call(self.agent.GetRollout, pb.GetRolloutRequest(id=rollout_id))

    def signal(self, instance: str, signal: Union[str, int]) -> pb.SignalResponse:
        return self._call(self.agent.Signal, pb.SignalRequest(instance=instance, signal=str(signal)))

    def node(self) -> pb.NodeInfo:
        return self._call(self.agent.Node, pb.NodeRequest())

    def health(self, service: str = "") -> str:
        """``grpc.health.v1`` Check: ``serving`` or ``not_serving`` for the agent ("") or a
        service by name."""
        r = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return enum_name(r, "status")

    def logs(
        self,
        service: str = "",
        instance: str = "",
        *,
        tail: Optional[int] = None,
        follow: bool = False,
        timeout: Optional[float] = None,
    ) -> Iterator[pb.LogLine]:
        """A service's (or one instance's) log records; with ``follow``, new ones as they
        are written until the caller stops iterating or the agent stops."""
        request = pb.LogsRequest(service=service, instance=instance, follow=follow)
        if tail is not None:
            request.tail = tail
        stream = self.agent.Logs(request, timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise CorralError.from_rpc_error(e) from None
        finally:
            stream.cancel()

    # -- watching -------------------------------------------------------------------------

    def watch(
        self,
        from_index: int = 0,
        *,
        service: str = "",
        instance: str = "",
        selector: str = "",
        follow: bool = True,
        resume: bool = True,
        reconnect_timeout: float = 60.0,
        on_resume: Optional[Callable[[int, CorralError], None]] = None,
        bookmark_interval: float = 0.0,
    ) -> Iterator[pb.Event]:
        """The node's events from ``from_index`` (0: the oldest kept), in order, each once.

        With ``resume``, a watch the agent ends with where to resume (it is stopping:
        ``UNAVAILABLE``; the watcher fell behind: ``RESOURCE_EXHAUSTED``), or whose
        connection drops, is called again from the next index, waiting up to
        ``reconnect_timeout`` seconds for the agent to be back; ``on_resume(index, error)``
        is told each time. ``OUT_OF_RANGE`` (the index is no longer kept) is raised: the
        caller must List again.

        ``selector`` keeps the events of services whose labels match (as the service is
        labeled when the event is sent).

        With ``bookmark_interval`` (seconds, at least 0.1) and ``follow``, the agent also sends
        ``EVENT_TYPE_BOOKMARK`` events when nothing else was sent for that long: their
        ``index`` is the last one the watch has passed (sent or filtered out), and a resume
        starts after it. They are yielded like the others: skip them by type.
        """
        next_index = from_index
        backoff = 0.1
        while True:
            request = pb.WatchRequest(
                from_index=next_index,
                service=service,
                instance=instance,
                selector=selector,
                follow=follow,
                bookmark_interval_ms=int(bookmark_interval * 1000),
            )
            stream = self.agent.Watch(request, wait_for_ready=True, timeout=None if follow else self.timeout)
            try:
                for event in stream:
                    next_index = event.index + 1
                    backoff = 0.1
                    yield event
                return
            except grpc.RpcError as e:
                err = CorralError.from_rpc_error(e)
                # UNAVAILABLE: the agent is stopping or the connection dropped.
                # RESOURCE_EXHAUSTED only with a resume index: this watcher fell behind (not
                # the cap on open streams, which calling again would only hit again).
                resumable = err.code == grpc.StatusCode.UNAVAILABLE or (
                    err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.resume_index is not None
                )
                if not (resume and resumable):
                    raise err from None
                if err.resume_index is not None:
                    next_index = err.resume_index
                if on_resume is not None:
                    on_resume(next_index, err)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wait_ready(reconnect_timeout, err)
            finally:
                stream.cancel()

    def _wait_ready(self, timeout: float, cause: CorralError) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise cause from None

    # -- waiting --------------------------------------------------------------------------

    def wait_rollout(self, rollout_id: str, *, timeout: float = 300.0, interval: float = 0.2) -> pb.RolloutStatus:
        """Follow a rollout (as Apply, Restart and Rollback return its id) until it ends.
        Returns its status when it succeeded; raises :class:`RolloutFailed` otherwise (a
        failed rollout's automatic rollback is in ``status.rollback_id``)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.rollout(rollout_id)
            state = enum_name(status, "state")
            if state == "succeeded":
                return status
            if state not in ("running", "unspecified", ""):
                raise RolloutFailed(status)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {rollout_id} still {state} after {timeout}s")
            time.sleep(interval)

    def wait_ready(self, name: str, *, timeout: float = 60.0, interval: float = 0.2) -> pb.ServiceStatus:
        """Wait until every desired instance of ``name`` runs (its service process started,
        its PID known) and is healthy."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.get(name)
            started = [i for i in s.instances if enum_name(i, "state") == "running" and i.pid > 0]
            if s.running == s.desired == len(started) and s.healthy == s.desired:
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name}: {s.running}/{s.desired} running, {s.healthy} healthy after {timeout}s"
                )
            time.sleep(interval)
