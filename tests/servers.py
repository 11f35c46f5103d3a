"""The one way tests run a server (MLflow, MONAI Label): on a free 127.0.0.1 port, in its own process group, waited
for until it answers, stopped with its workers at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server and its workers (their own process group), SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve(name: str, command: Callable[[int], list[str]], health: str, log: Path, cwd: Path, env: dict | None = None,
          timeout: float = 120.0, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``command(port)`` (it must listen on 127.0.0.1:port; a free port unless given) with its output in
    ``log``; yield ``(url, process)`` once ``GET url + health`` answers 200, stop it on exit. A server that exits or
    does not answer within ``timeout`` seconds raises ``RuntimeError`` with the end of its log."""
    import requests

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command(port), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} server exited: {Path(log).read_text(encoding='utf-8')[-3000:]}")
                try:
                    if requests.get(url + health, timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{name} server did not start: {Path(log).read_text(encoding='utf-8')[-3000:]}")
                time.sleep(1)
            yield url, proc
        finally:
            _stop(proc)


@contextlib.contextmanager
def serve_mlflow(folder: Path, port: int | None = None, log: str = "mlflow.log") -> Iterator[str]:
    """A real MLflow tracking + registry server on 127.0.0.1 (on ``port``, else a free one) with its sqlite store
    and artifacts in ``folder``; yields its URL."""
    folder = Path(folder)

    def command(port):
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]

    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    with serve("mlflow", command, "/health", folder / log, folder, env, port=port) as (url, _):
        yield url
