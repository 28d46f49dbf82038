"""One `lavit serve` process on the official-tiny fixture for the server's tests, and helpers.

The server is a subprocess started with the CLI (so the command is tested too) on a free
localhost port, with an API key and a small queue; every module of this folder shares it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

API_KEY = "test-key-123"
QUEUE_SIZE = 8
MAX_BATCH = 8
STARTUP_TIMEOUT = 120


@dataclass
class Server:
    host: str
    port: int
    pid: int
    log: Path
    model: str = "checkpoint"  # the fixture folder's name

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body=None, key: str | None = API_KEY, headers=None,
                timeout: float = 120):
        """(status, headers, parsed JSON or text) of one raw HTTP request."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        text = data.decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, response.headers, parsed  # headers: case-insensitive

    def health(self) -> dict:
        return self.request("GET", "/health", key=None)[2]

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def wait_idle(self, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while True:
            stats = self.health()
            if stats["queued"] == 0 and stats["running"] == 0:
                return stats
            if time.monotonic() > end:
                raise AssertionError(f"the server is still busy after {timeout} s: {stats}")
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(official_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("LAVIT_API_KEY", None)
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lavit_cli.cli", "serve", "--model", str(official_checkpoint), "--vision-heads", "2",
             "--port", str(port), "--api-key", API_KEY, "--queue-size", str(QUEUE_SIZE),
             "--max-batch", str(MAX_BATCH)],
            stdout=handle, stderr=subprocess.STDOUT, env=env)
    running = Server("127.0.0.1", port, proc.pid, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"lavit serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if running.health()["status"] == "ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"lavit serve did not answer within {STARTUP_TIMEOUT} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield running
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    problems = [line for line in log.read_text().splitlines() if "Traceback" in line]
    assert not problems, f"the server logged a traceback:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def input_png(official_tiny) -> Path:
    return official_tiny / "input.png"


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode("ascii")


def image_message(url: str, question: str | None = None) -> list:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)
