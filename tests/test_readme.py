"""Every example of the README runs.

The bash blocks' `lavit` commands run in order in one scratch folder, as a user would type
them, on the bundled model. A few stand-ins are declared in SUBSTITUTIONS (and only those):
the 26 GB release is replaced by the official-tiny fixture, a full training budget by a toy
one, a 200-scene evaluation by a few scenes. The test fails when the README has a command
it did not run, so a new example cannot go untested. The Python blocks run too (the
OpenAI-client block against a `lavit serve` started from the README's own command).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shapes.test_build import TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'


def blocks(language: str):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str):
    """`lavit ...` commands of a bash block (comments cut, `&&` chains split, `.venv/bin/` dropped)."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        for part in line.split("&&"):
            part = part.strip().removeprefix(".venv/bin/")
            if part.startswith("lavit "):
                out.append(part)
    return out


def tiny_build() -> str:
    return " ".join(["--scenes 64 --steps-scale 0.01", *(f"--set {shlex.quote(v)}" for v in TINY)])


def substitutions(fixture: Path) -> list:
    """(pattern, replacement) applied to README commands: the declared stand-ins."""
    return [
        ("rain1011/LaVIT-7B-v2", str(fixture / "checkpoint")),
        ("~/models/", "models/"),
        ("lavit train shapes --out runs/shapes", f"lavit train shapes --out runs/shapes {tiny_build()}"),
        ("lavit_mlx/shapes/configs/", f"{ROOT}/lavit_mlx/shapes/configs/"),
        ("--set train.steps=300", "--set train.steps=2 --set train.warmup_steps=0 --set train.batch_size=4 "
                                  "--set train.eval_batches=1"),
        ("--steps 100", "--steps 2"),
        ("--scenes 200 --out eval-shapes", "--scenes 3 --prompts 2 --reconstructions 2 --out eval-shapes"),
        ("--limit 50", "--limit 3"),
    ]


def stand_in(command: str, fixture: Path) -> str:
    for pattern, replacement in substitutions(fixture):
        command = command.replace(pattern, replacement)
    if " convert " in f" {command} " and str(fixture) in command:
        command += " --vision-heads 2"  # official-tiny's heads (the release's 16 is known)
    return command


def run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    argv = [sys.executable, "-m", "lavit_cli.cli", *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, command
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(folder: Path) -> None:
    """The data files the README's examples name."""
    import json

    from lavit_mlx.shapes import write_manifest

    write_manifest(folder, seed=777, n=6, kinds=["caption"]).rename(folder / "captions.jsonl")
    write_manifest(folder / "q", seed=778, n=3, kinds=["vqa"])
    lines = [json.loads(line) for line in (folder / "q" / "manifest.jsonl").read_text().splitlines()]
    (folder / "questions.jsonl").write_text("".join(json.dumps({**line, "image": f"q/{line['image']}"}) + "\n"
                                                    for line in lines))
    captions = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    (folder / "new-style.jsonl").write_text("".join(json.dumps({**c, "text": f"yes, {c['text']}"}) + "\n"
                                                    for c in captions))


def test_the_quick_start_commands_are_the_ci_commands():
    install, tests = [b.strip() for b in blocks("bash")[:2]]
    assert tests == TEST_COMMAND and TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert commands(install) == [
        'lavit generate --prompt "a red circle at the top left and a blue square in the center" --out shapes.png',
        "lavit caption shapes.png"]


def test_every_readme_example_runs(tmp_path, official_tiny):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LAVIT_MODEL", None)
    write_data(tmp_path)
    bash = blocks("bash")
    ran = []
    for block in bash[:1] + bash[2:]:  # the second block is the test command: this suite
        for command in commands(block):
            if command.startswith("lavit serve"):
                continue  # below, with the client
            run(stand_in(command, official_tiny), tmp_path, env)
            ran.append(command)
    assert (tmp_path / "shapes.png").is_file() and (tmp_path / "my-model" / "config.json").is_file()

    python = blocks("python")
    assert len(python) == 2
    proc = subprocess.run([sys.executable, "-c", python[0]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 3

    serve = [c for b in bash for c in commands(b) if c.startswith("lavit serve")]
    assert serve == ["lavit serve --port 8080"]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lavit_cli.cli", "serve", "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "lavit serve did not start"
                time.sleep(0.5)
        client = python[1].replace("8080", str(port))
        proc = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    ran += serve

    every = [c for b in bash[:1] + bash[2:] for c in commands(b)]
    assert sorted(ran) == sorted(every)  # every README command ran (serve last, with its client)
