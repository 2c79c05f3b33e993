"""Real server processes for the serving tests: started on a free port of 127.0.0.1, stopped by pid."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server process: its pid, its base URL, and an ``openai`` client for it."""

    process: subprocess.Popen
    port: int
    log: Path
    api_key: str = "unused"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key, max_retries=0, **options)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL its process group: it dies mid-answer, as a crashed server does (``stop`` lets it finish)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL of its process group if it lingers."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(argv: list[str], log: Path, env: dict | None = None, api_key: str = "unused") -> Server:
    """Start ``argv`` (its port placeholder ``{port}`` filled) in a new process group; not yet healthy."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in argv]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    return Server(process, port, log, api_key)


@contextlib.contextmanager
def running(servers: dict[str, Server]):
    """The started ``servers``, once each is healthy; every one stopped at the end."""
    try:
        for server in servers.values():
            server.wait_healthy()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def vlm_safety(*args: str) -> list[str]:
    """The ``vlm-safety`` command of this interpreter's environment."""
    return [sys.executable, "-c", "from vlm_safety_plugins.cli import cli; cli()", *args]


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(text: str, image=None, url: str | None = None) -> dict:
    if image is None and url is None:
        return {"role": "user", "content": text}
    image_part = {"type": "image_url", "image_url": {"url": url or data_uri(image)}}
    return {"role": "user", "content": [image_part, {"type": "text", "text": text}]}


def metric(server: Server, name: str, **labels) -> float:
    """One sample of the server's /metrics (0 when the series does not exist yet)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with urllib.request.urlopen(urllib.request.Request(f"{server.url}/metrics", headers=headers), timeout=5) as page:
        text = page.read().decode()
    wanted = name + ("{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
