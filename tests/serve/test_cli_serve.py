"""`lavit serve`: options are checked before anything loads, a busy port is a clear exit,
and `lavit_mlx` (the CLI included) imports without FastAPI and uvicorn."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap


def test_options_are_checked_before_the_model_loads(cli, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = cli("serve", "--model", missing, "--api-key", " ")
    assert code == 1 and err.strip() == "error: --api-key is empty: give a key, or leave the option out for none"
    code, _, err = cli("serve", "--model", missing, "--port", "70000")
    assert code == 2 and "--port" in err and "65535" in err
    code, _, err = cli("serve", "--model", missing, "--max-batch", "0")
    assert code == 2 and "--max-batch" in err


def test_a_port_in_use_ends_the_command_with_the_reason(cli, official_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli("serve", "--model", official_checkpoint, "--vision-heads", "2", "--port", port, timeout=120)
    assert code != 0 and "address already in use" in err


def test_the_package_imports_without_the_server_packages():
    script = textwrap.dedent("""
        import sys
        sys.modules["fastapi"] = None  # as if the [serve] extra were not installed
        sys.modules["uvicorn"] = None
        import lavit_mlx, lavit_mlx.serve, lavit_mlx.understanding, lavit_mlx.generation
        from lavit_cli import cli
        from lavit_mlx.errors import MissingDependencyError
        try:
            lavit_mlx.serve.serve("unused")
        except MissingDependencyError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "lavit serve needs fastapi: pip install 'lavit-mlx[serve]'"
