"""Build hook: generate the corral.v1 stubs with grpcio-tools when the package is built.

The generated modules (``corral_client/v1/agent_pb2.py``, ``agent_pb2.pyi``,
``agent_pb2_grpc.py``) are never committed: they come from ``corral/v1/agent.proto``, found
in ``$CORRAL_PROTO_DIR``, in ``proto/`` next to this file, or in the corral checkout this
file sits in (``../../proto/proto``). The proto's file name stays ``corral/v1/agent.proto``
(as the agent's reflection reports it); the one absolute import protoc writes into
``agent_pb2_grpc.py`` is made relative so that the modules live inside ``corral_client``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO = "corral/v1/agent.proto"
GENERATED = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py")


def proto_root() -> Path:
    candidates = [os.environ.get("CORRAL_PROTO_DIR"), HERE / "proto", HERE.parent.parent / "proto" / "proto"]
    for c in candidates:
        if c and (Path(c) / PROTO).is_file():
            return Path(c)
    raise SystemExit(
        f"corral-client: {PROTO} not found; build from a corral checkout (clients/python) "
        "or set CORRAL_PROTO_DIR to the directory that holds corral/v1/agent.proto"
    )


def generate(out: Path) -> None:
    """Write the generated modules into ``out`` (the ``corral_client/v1`` package)."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"corral-client: protoc failed on {root / PROTO}")
        out.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(tmp) / "corral" / "v1" / name).read_text(encoding="utf-8")
            if name == "agent_pb2_grpc.py":
                text, n = re.subn(
                    r"^from corral\.v1 import agent_pb2 as ",
                    "from . import agent_pb2 as ",
                    text,
                    flags=re.M,
                )
                if n != 1:
                    raise SystemExit("corral-client: unexpected imports in the generated agent_pb2_grpc.py")
            (out / name).write_text(text, encoding="utf-8")


class BuildPyWithStubs(build_py):
    """``build_py`` that also generates the stubs (into the source tree for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate(HERE / "src" / "corral_client" / "v1")
        else:
            generate(Path(self.build_lib) / "corral_client" / "v1")


setup(cmdclass={"build_py": BuildPyWithStubs})
