"""The generated gRPC stubs (cobalt/payments/v1, git-ignored) are made from the proto before the
package is built, so a wheel built from a clean clone carries them. Everything else is in
pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTO = Path("protos/cobalt/payments/v1/payments.proto")
STUB = ROOT / "cobalt/payments/v1/payments_pb2.py"


def generate_stubs() -> None:
    source = ROOT / PROTO
    if not source.exists() or (STUB.exists() and STUB.stat().st_mtime >= source.stat().st_mtime):
        return  # an sdist without the proto, or stubs already up to date
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", str(source)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc could not compile {PROTO}")
    for package in ("cobalt", "cobalt/payments", "cobalt/payments/v1"):
        (ROOT / package / "__init__.py").touch()


generate_stubs()
setup()
