"""A real `mlflow server` on 127.0.0.1 for the tests: a SQLite backend and an artifact root in a temporary
directory, optionally MLflow's basic authentication, started with a bounded wait on /health, SIGKILLed and
restarted on the same port and store, and always stopped (its whole process group, which only it is in).

The fixtures (tests/conftest.py) skip, with the server's own last words, where it cannot start (a machine
without the server's dependencies, e.g. Flask-WTF for basic auth).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 180.0  # generous: a cold start on two busy shared cores has taken 20 s
POLL_S = 0.2
ADMIN = "admin"
# The MLflow client's own HTTP retries, shrunk so that an outage outlasts them in seconds, not minutes
# (defaults: 7 retries, factor 2, jitter 1, timeout 120 s: about 250 s of backoff per call).
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class ServerDown(Exception):
    """The server did not come up (the message carries its log's tail)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class MlflowServer:
    """One server process group on a fixed port and store; `kill` + `start` is a restart on the same store."""

    root: Path
    password: str | None = None  # basic auth with user ADMIN when set
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0
    restarts: int = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self, password: str | None = None) -> dict[str, str]:
        """What a client needs in its environment: credentials (the given password, default the right one)."""
        env = dict(CLIENT_RETRIES)
        if self.password is not None:
            env.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=password or self.password)
        return env

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        return command + (["--app-name", "basic-auth"] if self.password is not None else [])

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NERN_"))}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes: a faster, lighter start
        if self.password is not None:
            ini = self.root / "basic_auth.ini"
            ini.write_text("[mlflow]\ndefault_permission = READ\n"
                           f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                           f"admin_username = {ADMIN}\nadmin_password = {self.password}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                           "auth_cache_ttl_seconds = 300\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="nern-tests-only")
        return env

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start (or restart) the server; returns the seconds until /health answered."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"server-{self.starts}.log", "wb")
        began = time.monotonic()
        self.proc = subprocess.Popen(self._command(), cwd=self.root, env=self._server_env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.restarts += self.starts > 0
        self.starts += 1
        while time.monotonic() - began < timeout_s:
            if health(self.uri):
                return time.monotonic() - began
            if self.proc.poll() is not None:
                break
            time.sleep(POLL_S)
        self.kill()
        raise ServerDown(f"mlflow server did not answer /health in {time.monotonic() - began:.0f} s:\n"
                         f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.root.glob("server-*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and its uvicorn worker), and wait until the port is
        closed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.proc = None
        deadline = time.monotonic() + 30
        while health(self.uri, 0.5) and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def stop(self) -> None:
        self.kill()
