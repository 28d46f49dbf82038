"""The FastAPI application: OpenAI-compatible routes, LaVIT's own routes and the web page.

HTTP runs on the event loop; requests are checked on a thread pool (`inputs.py`), then
queued for the one MLX worker thread (`queue.py`). A request's coroutine receives its
job's events through a `Channel` and watches its connection: when the client goes, the
job is cancelled and the worker stops it at the next step. Every failure is answered
with OpenAI's error body; nothing a request does can stop the process.

Routes:
- POST /v1/chat/completions: one image (data URL) + optional question -> caption or answer;
  `stream: true` gives `chat.completion.chunk` server-sent events and `[DONE]`.
- POST /v1/images/generations: prompt (+ prompt images) -> PNGs as `b64_json`.
- GET /v1/models, GET /v1/models/{id}, GET /health.
- POST /v1/lavit/generate/stream: as images/generations, with `progress` events.
- POST /v1/lavit/overlay: the kept-token picture of an image.
- GET /: the page.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
import mlx.core as mx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..generation import Progress, save_png
from . import inputs, schemas
from .errors import APIError, from_validation, server_error
from .events import Channel, Pending, TextStream, sse
from .guard import Guard
from .queue import Job, Result, Worker
from .tasks import RUNNERS, Completion, TextUpdate

log = logging.getLogger("lavit.serve")
PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeOptions:
    """How the server runs (`lavit serve` options)."""

    model_name: str = "lavit"
    api_key: Optional[str] = None
    max_queue: int = 16  # waiting requests; more get a 429
    max_batch: int = 8  # understanding requests per forward
    batch_wait: float = 0.1  # most seconds a batch waits for requests still being checked
    time_limit: float = 600.0  # seconds per request, queueing included
    max_body_bytes: int = 64 * 2**20
    check_threads: int = 4  # threads that check requests and encode PNGs


# ----------------------------------------------------------------------------- the application
def create_app(model, options: ServeOptions) -> FastAPI:
    """The application serving `model` (a `LaVIT`); the worker starts with the app."""
    worker = Worker(model, RUNNERS, max_queue=options.max_queue, max_batch=options.max_batch,
                    batch_wait=options.batch_wait)
    page = PAGE.read_text(encoding="utf-8")
    name = options.model_name
    model_path = str(model.checkpoint.path)
    created = int(model.checkpoint.path.stat().st_mtime) if model.checkpoint.path.exists() else 0
    eos = model.token_ids.eos

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Requests are checked (images decoded) on a few threads, not anyio's 40: each thread
        # would keep its own malloc arena, and two cores gain nothing from more.
        anyio.to_thread.current_default_thread_limiter().total_tokens = options.check_threads
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="LaVIT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, api_key=options.api_key, max_body=options.max_body_bytes)

    def submit(kind: str, task: Any, batch_key, request: Request) -> Pending:
        channel = Channel(asyncio.get_running_loop())
        job = Job(kind, task, channel.deliver, options.time_limit, batch_key)
        worker.submit(job)  # raises the 429
        return Pending(worker, job, channel, request)

    # --------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(from_validation(exc.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        method, path = request.method, request.url.path
        known = {404: (f"no route {method} {path}", "not_found"),
                 405: (f"{path} does not take {method}", "method_not_allowed")}
        message, code = known.get(exc.status_code, (str(exc.detail), None))
        error = APIError(exc.status_code, message, code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse(server_error().body(), status_code=500)

    # --------------------------------------------------------------- page and status
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        memory = {"mlx_active_bytes": mx.get_active_memory(), "mlx_cache_bytes": mx.get_cache_memory()}
        return {"status": "ok", "model": name, "loaded": loaded(model), **worker.stats(), **memory}

    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [schemas.model_card(name, created)]}

    @api.get("/v1/models/{ident:path}")
    async def one_model(ident: str):
        inputs.check_model(ident, name)
        return schemas.model_card(name, created)

    # --------------------------------------------------------------- understanding
    @api.post("/v1/chat/completions")
    async def chat(body: schemas.ChatRequest, request: Request):
        inputs.check_model(body.model, name)
        with worker.arriving():
            task = await run_in_threadpool(inputs.understanding, model, body)
            pending = submit("understand", task, task.batch_key(), request)
        ident = schemas.completion_id()
        stream = TextStream(task.task, live=task.decoding.num_beams == 1)
        if not body.stream:
            try:
                completion = await pending.result()
            finally:
                pending.close()
            return schemas.chat_completion(ident, name, completion.answer.text, finish(completion, task),
                                           counts(completion), facts(completion, task))
        try:
            first = await pending.next()  # an error before any token still gets its status
        except BaseException:
            pending.close()
            raise
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(chat_events(pending, first, ident, task, stream, usage_chunk),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def finish(completion: Completion, task) -> str:
        ids = completion.answer.token_ids
        ended = bool(ids) and ids[-1] == eos
        return "length" if not ended and len(ids) >= task.decoding.max_new_tokens else "stop"

    def counts(completion: Completion) -> dict:
        return schemas.usage(completion.prompt_tokens, len(completion.answer.token_ids))

    def facts(completion: Completion, task) -> dict:
        return {"image_tokens": completion.image_tokens, "prompt": task.prompt, "raw": completion.answer.raw,
                "task": task.task}

    async def chat_events(pending: Pending, event, ident: str, task, stream: TextStream,
                          usage_chunk: bool) -> AsyncIterator[str]:
        try:
            yield sse(schemas.chat_chunk(ident, name, {"role": "assistant", "content": ""}))
            while True:
                if isinstance(event, TextUpdate):
                    delta = stream.update(event.text)
                    if delta:
                        yield sse(schemas.chat_chunk(ident, name, {"content": delta}))
                elif isinstance(event, Result):
                    completion = event.value
                    delta = stream.finish(completion.answer.text)
                    if delta:
                        yield sse(schemas.chat_chunk(ident, name, {"content": delta}))
                    yield sse(schemas.chat_chunk(ident, name, {}, finish(completion, task)))
                    if usage_chunk:
                        yield sse(schemas.chat_chunk(ident, name, None, counts=counts(completion)))
                    break
                event = await pending.next()
        except APIError as exc:
            yield sse(exc.body())
        finally:
            pending.close()
        yield sse("[DONE]")

    # --------------------------------------------------------------- generation
    def encode(done) -> list:
        """The images as PNGs with the CLI's metadata (`save_png`), base64."""
        pictures = []
        with tempfile.TemporaryDirectory(prefix="lavit-png-") as folder:
            for index, image in enumerate(done.images):
                path = Path(folder) / f"{index}.png"
                save_png(image, path, done.settings, index, model=model_path)
                pictures.append(base64.b64encode(path.read_bytes()).decode("ascii"))
        return pictures

    def image_facts(done) -> dict:
        s = done.settings
        return {"seeds": [s.image_seed(i) for i in range(len(done.images))], "width": s.width, "height": s.height,
                "steps": s.steps, "seconds": round(done.seconds, 3)}

    async def start_generation(body: schemas.ImageRequest, request: Request):
        inputs.check_model(body.model, name)
        folder = Path(tempfile.mkdtemp(prefix="lavit-serve-"))
        try:
            task = await run_in_threadpool(inputs.generation, model, body, folder)
            return submit("generate", task, None, request), folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @api.post("/v1/images/generations")
    async def images(body: schemas.ImageRequest, request: Request):
        pending, folder = await start_generation(body, request)
        try:
            done = await pending.result()
        finally:
            pending.close()
            shutil.rmtree(folder, ignore_errors=True)
        return schemas.images_response(await run_in_threadpool(encode, done), image_facts(done))

    @api.post("/v1/lavit/generate/stream")
    async def generate_stream(body: schemas.ImageRequest, request: Request):
        body.stream = False  # the progress stream is this route's own
        pending, folder = await start_generation(body, request)
        try:
            first = await pending.next()
        except BaseException:
            pending.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return StreamingResponse(generation_events(pending, first, folder), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def generation_events(pending: Pending, event, folder: Path) -> AsyncIterator[str]:
        try:
            while True:
                if isinstance(event, Progress):
                    yield sse({"stage": event.stage, "done": event.done, "total": event.total}, "progress")
                elif isinstance(event, Result):
                    done = event.value
                    pictures = await run_in_threadpool(encode, done)
                    yield sse(schemas.images_response(pictures, image_facts(done)), "done")
                    return
                event = await pending.next()
        except APIError as exc:
            yield sse(exc.body(), "error")
        finally:
            pending.close()
            shutil.rmtree(folder, ignore_errors=True)

    # --------------------------------------------------------------- the overlay
    @api.post("/v1/lavit/overlay")
    async def overlay(body: schemas.OverlayBody, request: Request):
        if model.config.vision is None or model.config.tokenizer is None:
            raise APIError(400, "this checkpoint has no visual tokenizer", param="model", code="model_not_capable")
        task = await run_in_threadpool(inputs.overlay, body)
        pending = submit("overlay", task, None, request)
        try:
            picture = await pending.result()
        finally:
            pending.close()
        png = await run_in_threadpool(png_bytes, picture.image)
        grid = picture.keep_mask.shape[0]
        return {"num_tokens": picture.num_tokens, "grid": grid, "width": picture.image.width,
                "height": picture.image.height, "b64_png": base64.b64encode(png).decode("ascii")}

    app.include_router(api)
    return app


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def loaded(model) -> list:
    """The built components, read while the worker may be adding one (no lock: a build can take minutes)."""
    for _ in range(10):
        try:
            return list(model.loaded)
        except RuntimeError:  # the module's dict changed size during the iteration
            continue
    return []
