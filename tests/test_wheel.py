"""A wheel built from a clean copy of the repository (`git archive HEAD`: no generated stubs, no venv)
carries the generated gRPC stubs and the migrations, and its three console scripts run from a
fresh virtual environment. Only the local toolchain is used: no network, no build isolation."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def run(*args: str | Path, cwd: Path | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:  # noqa: ANN001
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to archive")
    clean = tmp_path_factory.mktemp("clean")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(clean)], input=archive, check=True)
    assert not (clean / "cobalt").exists(), "the stubs are generated, never committed"
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", dist, clean)
    (built,) = dist.glob("cobalt_payments-*.whl")
    return built


def test_the_wheel_carries_the_stubs_migrations_and_scripts(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for stub in ("cobalt/payments/v1/payments_pb2.py", "cobalt/payments/v1/payments_pb2_grpc.py",
                 "cobalt/payments/v1/payments_pb2.pyi", "cobalt/__init__.py", "cobalt/payments/v1/__init__.py"):
        assert stub in names, stub
    assert any(n.startswith("server/ledger/migrations/versions/0001") for n in names)
    assert "server/ledger/migrations/script.py.mako" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names), "the wheel is the service, not its tests"
    for script in ("payments-server = server.__main__:main", "payments-admin = clients.admin_cli:main",
                   "payments-webhook-bridge = webhook_bridge.__main__:main"):
        assert script in entry_points


def test_its_console_scripts_run_from_a_fresh_environment(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # the dependencies come from this environment's site-packages (a path, not a site: this
    # project's own editable install there is not seen); the project itself only from the wheel
    fresh_site = next((venv / "lib").glob("python*/site-packages"))
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    where = run(venv / "bin" / "python", "-c", "import cobalt.payments.v1.payments_pb2 as m, server; "
                "print(m.__file__); print(server.__file__)", cwd=tmp_path).stdout.split()
    assert all(path.startswith(str(fresh_site)) for path in where), where
    version = run(venv / "bin" / "payments-server", "--version", cwd=tmp_path).stdout
    assert version.startswith("payments-server 0.")
    assert "migrate" in run(venv / "bin" / "payments-server", "--help", cwd=tmp_path).stdout
    assert "events" in run(venv / "bin" / "payments-admin", "--help", cwd=tmp_path).stdout
    assert run(venv / "bin" / "payments-webhook-bridge", "--version", cwd=tmp_path).stdout.startswith(
        "payments-webhook-bridge 0.")
    # the server reaches its settings check with the packaged stubs imported
    refused = subprocess.run([str(venv / "bin" / "payments-server")], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={"PATH": "/usr/bin:/bin", "PAYMENTS_DB_THREADS": "0"})
    assert refused.returncode == 2 and "PAYMENTS_DB_THREADS=0: must be at least 1" in refused.stdout
