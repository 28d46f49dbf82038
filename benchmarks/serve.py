"""`lavit serve` under concurrent clients: captioning throughput and latency, batched vs
one request at a time, and image generation latency.

    python benchmarks/serve.py [--model DIR --vision-heads N] [--clients 1 4 16] [--requests 64]
                               [--max-tokens 36] [--size 256x256 --steps 25 --gen-repeats 3] [--quick]

The worker process loads the model once and serves it (uvicorn on a localhost port, in a
thread); client threads send the OpenAI requests over HTTP, each one after the other,
until `--requests` have been answered. Every client count runs twice: with the server's
batching (`--max-batch`, understanding requests that wait together share one forward) and
one request at a time (max batch 1); "mean batch" is requests per forward. The
default model is the official-tiny fixture (random weights: only speed means anything);
point `--model` at a real checkpoint for real numbers.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_CANDIDATES = [ROOT.parent / "shared" / "fixtures" / "official-tiny", Path("/work/shared/fixtures/official-tiny")]
QUICK = dict(clients=[1, 4], requests=8, max_tokens=4, size="16x16", steps=1, gen_repeats=1, image_tokens=8)


def fixture() -> Path:
    for candidate in [Path(os.environ["LAVIT_FIXTURE"])] if os.environ.get("LAVIT_FIXTURE") else FIXTURE_CANDIDATES:
        if (candidate / "checkpoint").is_dir():
            return candidate
    raise SystemExit("no --model given and the official-tiny fixture was not found (set LAVIT_FIXTURE)")


# ----------------------------------------------------------------------------- worker side
class LocalServer:
    """The app on a free localhost port, served by uvicorn in a thread."""

    def __init__(self, model, max_batch: int):
        import uvicorn

        from lavit_mlx.serve.app import ServeOptions, create_app

        self.app = create_app(model, ServeOptions(model_name="bench", max_queue=512, max_batch=max_batch))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def post(self, path: str, body: dict) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        try:
            connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {data[:300]!r}")
        return json.loads(data)

    def counts(self) -> dict:
        return self.app.state.worker.stats()


def caption_body(image_url: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}],
            "max_tokens": max_tokens}


def load(server: LocalServer, body: dict, clients: int, requests: int) -> dict:
    """`clients` threads answer `requests` captions in all; latencies, rate and batching."""
    latencies, lock, left = [], threading.Lock(), [requests]

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            start = time.perf_counter()
            server.post("/v1/chat/completions", body)
            with lock:
                latencies.append(time.perf_counter() - start)

    before = server.counts()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    after = server.counts()
    batched = after["batched_jobs"] - before["batched_jobs"]
    forwards = (after["batches"] - before["batches"]) + (after["completed"] - before["completed"] - batched)
    return {"rate": requests / seconds, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "mean_batch": requests / max(forwards, 1)}


def percentile(values, q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def work(args) -> dict:
    import lavit_mlx

    model = lavit_mlx.load(args.model, vision_heads=args.vision_heads)
    image = Path(args.image).read_bytes()
    body = caption_body("data:image/png;base64," + base64.b64encode(image).decode("ascii"), args.max_tokens)
    results = {"captions": {}, "generation": None}
    # One server, so one worker thread, for the whole run: MLX arrays belong to the thread
    # that made them. Batching is switched by the worker's max_batch.
    with LocalServer(model, args.max_batch) as server:
        worker = server.app.state.worker
        load(server, body, min(args.clients), min(args.clients))  # loads the components, warms the kernels
        for mode, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            worker.max_batch = max_batch
            for clients in args.clients:
                load(server, body, clients, clients)  # this client count's batch shapes once
                results["captions"][f"{mode}|{clients}"] = load(server, body, clients, args.requests)
        request = {"prompt": "a sculpture of a duck made of wool", "size": args.size, "steps": args.steps, "seed": 1}
        if args.image_tokens:
            request.update(max_new_tokens=args.image_tokens, min_new_tokens=min(20, args.image_tokens))
        server.post("/v1/images/generations", request)
        times = []
        for _ in range(args.gen_repeats):
            start = time.perf_counter()
            server.post("/v1/images/generations", request)
            times.append(time.perf_counter() - start)
        results["generation"] = {"p50": percentile(times, 50), "max": max(times)}
    return results


# ----------------------------------------------------------------------------- parent side
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the official-tiny fixture)")
    parser.add_argument("--vision-heads", type=int, help="as lavit --vision-heads (default: 2 for the fixture)")
    parser.add_argument("--image", help="image to caption (default: the fixture's input.png)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="captions per measurement")
    parser.add_argument("--max-tokens", type=int, default=36, help="caption length (the release's 36)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--gen-repeats", type=int, default=3)
    parser.add_argument("--image-tokens", type=int, help="image tokens the LLM may write (default: the release's 200)")
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, work)
    if args.model is None:
        args.model = str(fixture() / "checkpoint")
        args.vision_heads = args.vision_heads or 2
    args.image = args.image or str(fixture() / "input.png")

    with tempfile.TemporaryDirectory() as tmp:
        runs = common.run_rounds(__file__, [common.MLX], common.forward(args), Path(tmp), args.rounds)
    common.print_header(f"lavit serve: captions ({args.max_tokens} new tokens, {args.requests} requests per row) "
                        f"and {args.size} generations ({args.steps} steps) over HTTP on localhost, "
                        f"model {Path(args.model).name}", runs)
    rows = []
    for clients in args.clients:
        measured = {mode: common.best_by_key(runs["mlx"], "captions", better=lambda rs: max(rs, key=lambda r: r["rate"]))
                    [f"{mode}|{clients}"] for mode in ("batched", "one at a time")}
        batched, single = measured["batched"], measured["one at a time"]
        rows.append([clients, f"{batched['rate']:.2f}", f"{single['rate']:.2f}",
                     common.ratio(batched["rate"], single["rate"]), f"{batched['p50']:.2f}", f"{batched['p95']:.2f}",
                     f"{single['p50']:.2f}", f"{single['p95']:.2f}", f"{batched['mean_batch']:.1f}"])
    common.print_table(["clients", "batched captions/s", "one at a time captions/s", "batched / one at a time",
                        "batched p50 s", "batched p95 s", "one at a time p50 s", "one at a time p95 s", "mean batch"],
                       rows)
    generation = min((run.result["generation"] for run in runs["mlx"]), key=lambda g: g["p50"])
    common.print_table(["generation", "p50 s", "max s"],
                       [[f"{args.size}, {args.steps} steps, 1 image", f"{generation['p50']:.2f}",
                         f"{generation['max']:.2f}"]])


if __name__ == "__main__":
    main()
