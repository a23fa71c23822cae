"""Shared fixtures: a real one-node Slurm cluster for the tests that submit jobs; real MLflow tracking servers
(plain, and with basic authentication) for the tests that log to one."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_server import MlflowServer, ServerDown

pytest_plugins = ["faults"]
REPO = Path(__file__).resolve().parents[1]
SLURM_UP = REPO / "workflow" / "scripts" / "slurm_up.sh"
SLURM_DOWN = REPO / "workflow" / "scripts" / "slurm_down.sh"
SLURM_UP_TIMEOUT_S = 300


def _slurm_running() -> bool:
    """A cluster someone else stood up is used as is and left running."""
    if shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "idle" in done.stdout


def _why_no_slurm() -> str | None:
    """Why this machine cannot stand up the cluster, or None when it can."""
    if os.environ.get("NERN_TEST_SLURM") == "0":
        return "NERN_TEST_SLURM=0"
    if os.geteuid() != 0:
        return "standing up Slurm needs root"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no apt-get to install slurm-wlm"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Yield the partition of a running local Slurm cluster, started (and at the end stopped) here if needed."""
    if _slurm_running():
        yield "debug"
        return
    reason = _why_no_slurm()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    try:
        up = subprocess.run(
            ["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=SLURM_UP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(["bash", str(SLURM_DOWN)], capture_output=True, timeout=120)
        pytest.fail(f"slurm_up.sh did not finish in {SLURM_UP_TIMEOUT_S} s: {exc.stdout!r:.2000}")
    if up.returncode != 0:
        subprocess.run(["bash", str(SLURM_DOWN)], capture_output=True, timeout=120)
        pytest.fail(f"slurm_up.sh failed ({up.returncode}):\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")
    try:
        yield "debug"
    finally:
        subprocess.run(["bash", str(SLURM_DOWN)], capture_output=True, timeout=120)


def _why_no_mlflow_server(auth: bool) -> str | None:
    """Why `mlflow server` cannot run here (a missing server dependency), or None."""
    try:
        import mlflow.server  # noqa: F401
    except ImportError as exc:
        return f"mlflow's server does not import ({exc})"
    if auth:
        try:
            import flask_wtf  # noqa: F401
        except ImportError:
            return "basic auth needs Flask-WTF (pip install 'mlflow[auth]'; setup.sh installs it)"
    return None


def _served(root: Path, password: str | None) -> Iterator[MlflowServer]:
    """A started server, stopped afterwards whatever happened; a skip naming the cause where it cannot start."""
    reason = _why_no_mlflow_server(password is not None)
    if reason:
        pytest.skip(f"no mlflow server: {reason}")
    server = MlflowServer(root, password)
    try:
        server.start()
    except ServerDown as exc:
        pytest.skip(f"no mlflow server: {str(exc)[-800:]}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 (a free port) with a SQLite store and an artifact root in a temporary
    directory; one per test module."""
    yield from _served(tmp_path_factory.mktemp("mlflow-server"), None)


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """As `mlflow_server`, with MLflow's basic authentication; its admin password (`.password`) is random, so
    a test can look for it in everything the pipeline wrote."""
    yield from _served(tmp_path_factory.mktemp("mlflow-auth-server"), "planted-" + secrets.token_hex(12))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the cluster carry the `slurm` marker, so `-m "not slurm"` deselects them; Slurm and
    torch.compile tests are also `slow`, so the fast lane `-m "not slow"` leaves them out."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        if item.get_closest_marker("slurm") or item.get_closest_marker("compile"):
            item.add_marker(pytest.mark.slow)
