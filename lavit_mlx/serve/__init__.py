"""`lavit serve`: an OpenAI-compatible HTTP server for LaVIT's understanding and generation.

One model in memory, one MLX worker thread fed by a bounded queue, understanding
requests batched into one forward, a web page at `/`. FastAPI and uvicorn are the
optional `[serve]` extra: they are imported only when a server is made, so `lavit_mlx`
imports without them. See `app.py` for the routes, `queue.py` for the worker.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Optional

from ..errors import LaVITError, MissingDependencyError


def check_options(host: str, port: int, api_key: Optional[str], max_queue: int, max_batch: int,
                  time_limit: float) -> None:
    """One-line errors for options that cannot work, before anything is loaded."""
    if not 1 <= port <= 65535:
        raise LaVITError(f"--port {port}: expected 1 to 65535")
    if not host.strip():
        raise LaVITError("--host is empty")
    if api_key is not None and not api_key.strip():
        raise LaVITError("--api-key is empty: give a key, or leave the option out for none")
    if max_queue < 1:
        raise LaVITError(f"--queue-size {max_queue}: expected at least 1")
    if max_batch < 1:
        raise LaVITError(f"--max-batch {max_batch}: expected at least 1")
    if not time_limit > 0:
        raise LaVITError(f"--timeout {time_limit}: expected a number of seconds > 0")


def _needs_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"lavit serve needs {exc.name}: pip install 'lavit-mlx[serve]'") from None


def serve(model_path: Path, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          vision_heads: Optional[int] = None, quantize: Optional[int] = None, max_queue: int = 16,
          max_batch: int = 8, time_limit: float = 600.0, model_name: Optional[str] = None,
          announce=print) -> None:
    """Load the model once and serve it until interrupted.

    Args:
        model_path: a checkpoint folder (released layout or MLX folder).
        host, port: where to listen (localhost by default).
        api_key: when set, every route but /health and the page needs `Authorization: Bearer KEY`.
        vision_heads, quantize: as `lavit_mlx.load`.
        max_queue: requests that may wait; more are answered 429 with Retry-After.
        max_batch: understanding requests decoded in one forward.
        time_limit: seconds a request may take, waiting included (then 504).
        model_name: the id in /v1/models. Default: the checkpoint folder's name.
        announce: called with one line before the server starts listening.
    """
    check_options(host, port, api_key, max_queue, max_batch, time_limit)
    _needs_server_packages()
    import uvicorn

    from ..lavit import load
    from .app import ServeOptions, create_app

    model = load(model_path, vision_heads=vision_heads, quantize=quantize)
    from ..zoo import BUNDLED_NAME, is_bundled

    name = model_name or (BUNDLED_NAME if is_bundled(model_path) else Path(model_path).resolve().name)
    options = ServeOptions(model_name=name, api_key=api_key, max_queue=max_queue, max_batch=max_batch,
                           time_limit=time_limit)
    app = create_app(model, options)
    if not logging.getLogger("lavit.serve").handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    announce(f"serving {name} ({model.checkpoint.describe()}) at http://{_url_host(host)}:{port}/ "
             "(OpenAI API under /v1, a page at /; Ctrl-C to stop)")
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                  timeout_graceful_shutdown=5)).run()


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
