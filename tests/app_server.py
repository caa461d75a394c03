"""Launch the real app (`python app.py`) in a subprocess on a free localhost port, for the app tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, home: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.home = home

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


def stop_training(home: Path) -> None:
    """Cancel training jobs the app started under `home` (they run in their own process group by design)."""
    from tuner import jobs

    for run_dir in sorted((home / "runs").glob("*/config.yaml")):
        jobs.cancel(run_dir.parent)


@contextmanager
def running_app(home: Path, log_path: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[AppServer]:
    """Start app.py with TUNER_HOME=home; yield once the page answers; stop it (and its group) after."""
    port = free_port()
    full_env = {**os.environ, "TUNER_HOME": str(home), "GRADIO_SERVER_PORT": str(port),
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    full_env.pop("SPACE_ID", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = AppServer(proc, url, log_path, home)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{server.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/gradio_api/info", timeout=5):  # noqa: S310
                    break
            except urllib.error.HTTPError:  # it answers (401 when a password is set): it is up
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {timeout} s:\n{server.log()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop_training(home)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def api_client(server: AppServer):
    """A gradio_client for the running app, as a script calling the page's API would make one."""
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=False)


def refused(client, *args, api_name: str) -> str:
    """Call an endpoint that must refuse; return the message the user sees."""
    import pytest
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)
