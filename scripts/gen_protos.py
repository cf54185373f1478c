#!/usr/bin/env python3
"""Generate the Python modules for protos/*.proto.

Runs grpc_tools.protoc from the repository root with ``-I .`` so that the
generated modules import as ``from protos import llm_pb2`` and the *_pb2_grpc
modules import their *_pb2 the same way. Writes ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` next to the sources (they are committed).

protos/grpc_service.proto declares the same symbols (package ``inference``) as
tritonclient's own grpc_service.proto, and protobuf refuses to hold both in
the default descriptor pool. So its generated module is post-processed to
build its descriptors in a private pool (``grpc_service_pb2.POOL``); both can
then be imported in one process (a server test with tritonclient as the
client, say). The wire format is unaffected. protos/reflection.py builds a
pool holding every Vigil service for gRPC server reflection.

The modules must load under the protobuf runtimes that consumers of the events still pin
(5.27 and later, 6, 7), and generated code demands a runtime at least as new as the
protoc that made it. So protoc is the one of protobuf 5.27 (grpcio-tools 1.66.2), run in a
tool environment of its own, ``.venvs/protoc`` (made on first use; its protobuf 5 is also
what the tests decode events with, beside ``.venvs/protobuf6``).

    python scripts/gen_protos.py              # regenerate in place
    python scripts/gen_protos.py --out DIR    # write the tree under DIR instead
    python scripts/gen_protos.py --envs-only  # make the tool environments, generate nothing
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVS = REPO / ".venvs"
# environment -> what it holds: the protoc, and the oldest protobuf majors the modules serve
TOOL_ENVS = {"protoc": "grpcio-tools==1.66.2", "protobuf6": "protobuf>=6,<7"}

PROTOC = """
import pathlib, sys
import grpc_tools
from grpc_tools import protoc
well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
repo, out, *protos = sys.argv[1:]
sys.exit(protoc.main(["grpc_tools.protoc", "-I", repo, "-I", str(well_known), "--python_out=" + out,
                      "--pyi_out=" + out, "--grpc_python_out=" + out, *protos]))
"""


def proto_files(repo: Path = REPO) -> list[str]:
    """The .proto sources, relative to the repository root, sorted."""
    return sorted(p.relative_to(repo).as_posix() for p in (repo / "protos").glob("*.proto"))


# Sources whose generated module gets a private descriptor pool (see above).
PRIVATE_POOL = {"protos/grpc_service.proto"}

_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL_LINES = (
    "# Private pool (added by scripts/gen_protos.py): tritonclient registers the\n"
    "# same 'inference.*' symbols in the default pool.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def use_private_pool(pb2_path: Path) -> None:
    """Rewrite a generated *_pb2.py to add its file to a private pool."""
    text = pb2_path.read_text()
    if text.count(_DEFAULT_POOL_LINE) != 1:
        raise SystemExit(f"{pb2_path}: unexpected protoc output; cannot switch to a private pool")
    pb2_path.write_text(text.replace(_DEFAULT_POOL_LINE, _PRIVATE_POOL_LINES))


def tool_python(name: str) -> Path:
    """The Python of tool environment `name` (see TOOL_ENVS), made on first use."""
    python = ENVS / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ENVS / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TOOL_ENVS[name]],
                       check=True)
    return python


def generate(out_dir: Path, repo: Path = REPO) -> list[Path]:
    """Run protoc over protos/*.proto; return the files written under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files(repo)
    if not protos:
        raise SystemExit("no .proto files under protos/")
    rc = subprocess.run([str(tool_python("protoc")), "-c", PROTOC, str(repo), str(out_dir),
                         *(str(repo / p) for p in protos)]).returncode
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")
    for proto in protos:
        if proto in PRIVATE_POOL:
            use_private_pool(out_dir / (proto.removesuffix(".proto") + "_pb2.py"))
    return sorted(
        p
        for stem in (Path(p).stem for p in protos)
        for p in (out_dir / "protos").glob(f"{stem}_pb2*")
        if p.suffix in (".py", ".pyi")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    ap.add_argument("--envs-only", action="store_true", help="make the tool environments, generate nothing")
    ns = ap.parse_args(argv)
    if ns.envs_only:
        for name in TOOL_ENVS:
            print(tool_python(name))
        return 0
    for path in generate(ns.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
