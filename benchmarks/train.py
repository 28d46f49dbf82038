"""Training throughput: the MLX trainers (`lavit train`) vs the PyTorch ones (`lavit_train`)
per stage on the same YAML and data, and LoRA vs QLoRA on a ~1B LLaMA shape.

    python benchmarks/train.py [--stages tokenizer,llm,pixel] [--steps 16] [--width 64] [--threads N]
                               [--lora-hidden 2048 --lora-layers 16 --lora-heads 32 --lora-intermediate 5504]
                               [--lora-tokens 256] [--lora-steps 2] [--lora-warmup 1] [--no-lora] [--rounds 1]
                               [--streams N] [--profile] [--quick]

Stages. The parent writes small starting points once (`lavit_train.tiny.write_training_fixture`:
EVA + tokenizer + high-res VQ decoder, a diffusers VAE, a text tokenizer, random pictures),
converts the vision side to an MLX folder (`lavit_convert`; both trainers read it, as in
tests/train_torch/test_mlx_parity.py) and writes one run config per stage. For each stage one
worker process runs the MLX trainer (`lavit_mlx.training.loop.train`) and another the PyTorch
trainer (`lavit_train.loop.train`, float32 on the CPU) on that config, `--steps` steps of
`--batch-size` samples. Both loops log `samples_per_s` every step in `log.jsonl`; the table has
the median over the steps after the first `WARMUP` (MLX compiles its step on the first),
steps/s = that / the batch size, the worker's peak RSS, and the MLX / PyTorch ratio (target:
>= 1.0x). To see where the time goes, each worker also times its stage's data iterator
(`next(batches)`: decoding, augmenting, tokenizing on the host) apart from the step, and the
stage's set-up (building the model, caches, the tokenizer's k-means initialisation); the
PyTorch worker times its frozen modules (forward hooks): the MLX llm and pixel stages run the
frozen encoders (EVA, tokenizer, VAE) once over the data at set-up and train on the cache,
the PyTorch ones run them in every step, so a second ratio compares MLX with PyTorch's step
less that time. Both trainers' final evaluation is skipped (it is not training). Both sides
use `--threads` threads: torch.set_num_threads, and OPENBLAS_NUM_THREADS / OMP_NUM_THREADS for
the MLX process' OpenBLAS (default: $OMP_NUM_THREADS if set, else the usable cores). On a
machine busy with other jobs give `--threads 1`: there two OpenMP threads per process spin
against the other load, and the numbers measure that load rather than the trainers.

Where the time goes (`--profile`, Linux perf): each stage worker samples its own threads over
the steps after the warm-up (`cpu_profile.py`) and the parent prints CPU ms per step by kind of
work (gemm, waiting BLAS/OpenMP threads, compiled and other elementwise ops, copies,
reductions, malloc and the kernel, Python) for both sides, with the cores busy. `--streams N`
sets the MLX stages' `train.streams` (batch parts on their own streams; PyTorch ignores it).

LoRA vs QLoRA. An mlx-lm LLaMA (random weights, nothing downloaded; the default shape,
hidden 2048, 16 layers, 32 heads, MLP 5504, vocab 32000, untied head, has 0.94B parameters),
frozen, with rank-`--lora-rank` adapters on every linear of every block
(`lavit_mlx.training.lora.apply_lora`, i.e. mlx-lm's `linear_to_lora_layers`); QLoRA is the
same with the model quantized to 4 bits first (`nn.quantize`, group 64: every linear, the
embedding and the head, as `--quantize 4` does), layer by layer as the lazy random init
materialises, so a QLoRA process never holds more than one full-precision matrix. AdamW on
the adapters, one compiled step (as the trainers), next-token cross-entropy at batch
`--lora-batch` x `--lora-tokens`; tokens/s: the median of `--lora-steps` steps after
`--lora-warmup` untimed ones.
Memory: MLX's peak (`mx.get_peak_memory`, from the start of training: weights, adapters,
optimizer state, activations) and the process' peak RSS; the QLoRA / LoRA ratio of MLX's
peak has a target of <= 40%. Float32 on the CPU (MLX's float16/bfloat16 CPU kernels are
slow); on a Metal GPU bfloat16 (`--lora-dtype`), the dtype of released weights. On the CPU
the QLoRA worker is the long part: MLX's CPU `quantized_matmul` (no BLAS behind it) ran at
about 1 GFLOP/s where float32 matmuls ran at 30-60, so at the default shape a QLoRA step (about
a TFLOP) takes a quarter of an hour or so there (each step's time is printed on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import cpu_profile

STAGES = ("tokenizer", "llm", "pixel")
QUICK = dict(steps=5, width=32, image_size=28, patch=7, batch_size=2, lora_hidden=64, lora_layers=2,
             lora_heads=4, lora_intermediate=128, lora_vocab=512, lora_tokens=32, lora_steps=2, lora_warmup=1)
WARMUP = 2  # logged steps left out of the medians (the first compiles)
HEADS = 4
CACHED = ("llm", "pixel")  # MLX stages that run their frozen encoders once over the data, at set-up
MLX_TARGET, QLORA_TARGET = 1.0, 0.40


# ----------------------------------------------------------------------------- the stages' configs
def stage_config(stage: str, fixture: dict, mlx_init: Path, args) -> dict:
    """The run config of `stage` (JSON is YAML): the same file for both trainers."""
    data = {"train": str(fixture["data"]), "image_size": args.image_size, "shuffle_buffer": 16,
            "lines_per_shard": 8}
    train = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-3, "warmup_steps": 1,
             "log_every": 1, "save_every": 0, "streams": args.streams}  # MLX only (PyTorch ignores it)
    init = str(mlx_init)
    model = {
        "tokenizer": {"init": init, **fixture["model"]},
        "llm": {"init": init, "text_tokenizer": str(fixture["text"]), "max_length": 128, "vision_heads": HEADS,
                "llm": {"hidden_size": 2 * args.width, "intermediate_size": 4 * args.width,
                        "num_hidden_layers": 2, "num_attention_heads": 4}},
        "pixel": {"init": init, "vae": str(Path(fixture["pixel"]) / "vae"), "unet": fixture["unet"]},  # diffusers vae/
    }[stage]
    if stage == "pixel":
        data = {**data, "image_size": 32}  # the VAE's pictures (EVA reads its own size)
    return {"stage": stage, "out": "unused", "model": model, "data": data, "train": train,
            **({"loss": {"init_batches": 1}} if stage == "tokenizer" else {})}


def timed_data(stage, clock=None, recording=None) -> list:
    """Wrap `stage.batches` (both loops call it once): each `next` is timed. Returns a list that
    gets, per batch, (seconds waiting for it, `clock()` when it was asked for). A `recording`
    (`cpu_profile.Recording`) starts when the first measured batch is asked for."""
    times: list = []
    original = stage.batches

    def batches():
        source = iter(original())
        while True:
            if recording is not None and len(times) == WARMUP:
                recording.start()
            start = time.perf_counter()
            mark = clock() if clock else 0.0
            try:
                batch = next(source)
            except StopIteration:
                return
            times.append((time.perf_counter() - start, mark))
            yield batch

    stage.batches = batches
    return times


def frozen_clock(modules):
    """Forward hooks on the frozen modules (and their direct children: `vae.encode` calls its
    encoder, not `forward`) adding up the time spent in them; returns a function reading the
    total so far. Nested calls count once."""
    total, depth, started = [0.0], [0], [0.0]

    def before(*_):
        if depth[0] == 0:
            started[0] = time.perf_counter()
        depth[0] += 1

    def after(*_):
        depth[0] -= 1
        if depth[0] == 0:
            total[0] += time.perf_counter() - started[0]

    for module in modules:
        for part in (module, *module.children()):
            part.register_forward_pre_hook(before)
            part.register_forward_hook(after)
    return lambda: total[0]


def stage_result(args, run: Path, data_seconds: list, setup: float, total: float, end_mark: float = 0.0) -> dict:
    """Medians over the steps after the warm-up: the loop's samples/s (its log), the data wait,
    the time in frozen modules (the clock's marks between one batch and the next)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "samples_per_s" in r and r.get("split") is None]
    measured = [r for r in steps if r["step"] > WARMUP] or steps
    rate = statistics.median(r["samples_per_s"] for r in measured) if measured else 0.0
    data = [seconds for seconds, _ in data_seconds[WARMUP:args.steps] or data_seconds]
    marks = [mark for _, mark in data_seconds] + [end_mark]
    frozen = [b - a for a, b in zip(marks[WARMUP:-1], marks[WARMUP + 1:])]
    return {"samples_per_s": rate, "steps_per_s": rate / args.batch_size, "measured_steps": len(measured),
            "data_s_per_step": statistics.median(data) if data else 0.0,
            "frozen_s_per_step": statistics.median(frozen) if frozen else 0.0,
            "setup_s": setup, "train_s": total, "last_loss": steps[-1]["loss"] if steps else None}


def mlx_stage(args) -> dict:
    import mlx.core as mx

    from lavit_mlx.training.config import load_run_config
    from lavit_mlx.training.loop import World, train
    from lavit_mlx.training.stages import build_stage

    stage_name = args.worker.rsplit("-", 1)[0]
    run = Path(args.out) / "run"
    config = load_run_config(stage_name, Path(args.fixture) / f"{stage_name}.json", [f"out={run}"])
    start = time.perf_counter()
    stage = build_stage(config, World.init())
    setup = time.perf_counter() - start
    stage.evaluate = dict  # the final evaluation is not training (the pixel stage's decodes pictures)
    recording = profile_recording(args)
    data_seconds = timed_data(stage, recording=recording)
    start = time.perf_counter()
    train(stage, config, resume=False)
    total = time.perf_counter() - start
    result = stage_result(args, run, data_seconds, setup, total)
    result["mlx_peak_memory"] = mx.get_peak_memory()
    return with_profile(result, recording, args)


def torch_stage(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lavit_train.distributed import World
    from lavit_train.loop import Launch, train
    from lavit_train.sections import load_run_config
    from lavit_train.stages import build_stage

    stage_name = args.worker.rsplit("-", 1)[0]
    run = Path(args.out) / "run"
    config = load_run_config(stage_name, Path(args.fixture) / f"{stage_name}.json", [f"out={run}"])
    world = World.init("cpu")
    try:
        start = time.perf_counter()
        stage = build_stage(config, world, Launch(tensorboard=False, resume=False, vision_heads=HEADS))
        setup = time.perf_counter() - start
        stage.evaluate = lambda model: {}  # as on the MLX side
        clock = frozen_clock(stage.frozen())
        recording = profile_recording(args)
        data_seconds = timed_data(stage, clock, recording)
        start = time.perf_counter()
        train(stage, config)
        total = time.perf_counter() - start
    finally:
        world.close()
    result = stage_result(args, run, data_seconds, setup, total, clock())
    result["threads"] = torch.get_num_threads()
    return with_profile(result, recording, args)


def profile_recording(args):
    return cpu_profile.Recording(Path(args.out) / "perf.data") if args.profile else None


def with_profile(result: dict, recording, args) -> dict:
    """The result with the recording's CPU seconds by kind of work (steps after the warm-up)."""
    if recording is not None:
        recording.stop()
        result["profile"] = {**cpu_profile.categories(recording.path), "steps": args.steps - WARMUP,
                             "wall_seconds": recording.seconds}
    return result


# ----------------------------------------------------------------------------- LoRA / QLoRA
def lora_args(args):
    from mlx_lm.models.llama import ModelArgs

    return ModelArgs(model_type="llama", hidden_size=args.lora_hidden, num_hidden_layers=args.lora_layers,
                     intermediate_size=args.lora_intermediate, num_attention_heads=args.lora_heads,
                     num_key_value_heads=args.lora_heads, rms_norm_eps=1e-5, vocab_size=args.lora_vocab,
                     max_position_embeddings=4096, tie_word_embeddings=False)


def parameter_count(args) -> int:
    h, m, n, v = args.lora_hidden, args.lora_intermediate, args.lora_layers, args.lora_vocab
    return n * (4 * h * h + 3 * h * m + 2 * h) + 2 * v * h + h


def lora_worker(args) -> dict:
    """A few LoRA (or, in the qlora worker, QLoRA) optimizer steps; tokens/s and peak memory."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model

    from lavit_mlx.training.lora import LoRASection, apply_lora, trainable_count

    quantized = args.worker == "qlora"
    dtype = getattr(mx, args.lora_dtype) if args.lora_dtype else (
        mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    mx.random.seed(0)
    model = Model(lora_args(args))  # random init, lazy: nothing is computed yet
    if dtype != mx.float32:
        model.set_dtype(dtype)
    if quantized:  # one layer at a time, so that one full-precision matrix at most exists at once
        names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))]
        for name in names:
            nn.quantize(model, group_size=64, bits=4, class_predicate=lambda path, _, name=name: path == name)
            mx.eval(dict(model.named_modules())[name].parameters())
    mx.eval(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    apply_lora(model, LoRASection(rank=args.lora_rank, visual_rows=False), None)
    mx.eval(model.parameters())
    trainable = trainable_count(model)

    def loss_fn(model, inputs, targets):
        logits = model(inputs).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="mean")

    optimizer = optim.AdamW(learning_rate=1e-4)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets):
        loss, grads = loss_and_grad(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    model.train()
    tokens = mx.random.randint(3, args.lora_vocab, (args.lora_batch, args.lora_tokens + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mx.eval(inputs, targets)
    mx.clear_cache()
    mx.reset_peak_memory()
    times, losses = [], []
    for number in range(args.lora_warmup + args.lora_steps):  # the first compiles, allocates AdamW's state
        start = time.perf_counter()
        loss = step(inputs, targets)
        mx.eval(state, loss)
        if number >= args.lora_warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
        print(f"{args.worker} step {number + 1}: {time.perf_counter() - start:.1f} s, loss {losses[-1]:.3f}",
              file=sys.stderr, flush=True)
    seconds = statistics.median(times)
    return {"tokens_per_s": args.lora_batch * args.lora_tokens / seconds, "step_s": seconds,
            "mlx_peak_memory": mx.get_peak_memory(), "weight_bytes": weight_bytes, "trainable": trainable,
            "losses": losses, "dtype": str(dtype).split(".")[-1],
            "device": "CPU" if mx.default_device() == mx.cpu else "GPU"}


def work(args) -> dict:
    if args.worker in ("lora", "qlora"):
        return lora_worker(args)
    return mlx_stage(args) if args.worker.endswith("-mlx") else torch_stage(args)


# ----------------------------------------------------------------------------- parent
def write_fixture(args, folder: Path, stages) -> None:
    """The starting points, their MLX conversion and one run config per stage in `folder`."""
    from lavit_convert.to_mlx import ConvertOptions, convert_to_mlx
    from lavit_train.tiny import write_training_fixture

    fixture = write_training_fixture(folder, width=args.width, heads=HEADS, image_size=args.image_size,
                                     patch=args.patch)
    mlx_init = folder / "mlx"
    convert_to_mlx(fixture["release"], mlx_init,
                   ConvertOptions(components=["eva", "tokenizer", "highres_decoder"], vision_heads=HEADS))
    for stage in stages:
        (folder / f"{stage}.json").write_text(json.dumps(stage_config(stage, fixture, mlx_init, args)))


def size(n: float) -> str:
    return f"{n / common.GIB:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def stage_rows(stages, runs) -> list:
    rows = []
    for stage in stages:
        mlx, ref = runs[f"{stage}-mlx"], runs[f"{stage}-torch"]
        mlx_rate, ref_rate = common.best(mlx, "samples_per_s"), common.best(ref, "samples_per_s")
        mlx_steps, ref_steps = common.best(mlx, "steps_per_s"), common.best(ref, "steps_per_s")
        mlx_data, ref_data = (common.best(r, "data_s_per_step", min) for r in (mlx, ref))
        mlx_setup, ref_setup = (common.best(r, "setup_s", min) for r in (mlx, ref))
        frozen = common.best(ref, "frozen_s_per_step", min)
        # PyTorch's step without its frozen encoders (the MLX stages run them once, at set-up)
        rest = 1 / ref_steps - frozen if ref_steps else 0.0
        rows.append([
            stage, f"{mlx_steps:.2f}", f"{ref_steps:.2f}", f"{mlx_rate:.2f}", f"{ref_rate:.2f}",
            common.ratio(mlx_rate, ref_rate),
            f"{frozen * 1e3:.0f}",
            common.ratio(mlx_steps, 1 / rest if rest > 0 else None) if stage in CACHED else "- (both run EVA)",
            f"{mlx_data * 1e3:.0f} / {ref_data * 1e3:.0f}", f"{mlx_setup:.1f} / {ref_setup:.1f}",
            f"{max(r.peak_rss for r in mlx) / common.GIB:.2f} / {max(r.peak_rss for r in ref) / common.GIB:.2f}",
        ])
    return rows


def memory_estimate(args, bits) -> int:
    """`lavit_mlx.training.lora.qlora_memory` of the fine-tuning measured (its training total)."""
    from lavit_mlx.config import LLMConfig
    from lavit_mlx.training.lora import qlora_memory

    llm = LLMConfig(hidden_size=args.lora_hidden, intermediate_size=args.lora_intermediate,
                    num_hidden_layers=args.lora_layers, num_attention_heads=args.lora_heads,
                    num_key_value_heads=args.lora_heads, vocab_size=args.lora_vocab)
    float_bytes = 4 if args.lora_dtype in (None, "float32") else 2  # None: float32 on the CPU
    return qlora_memory(llm, bits=bits, rank=args.lora_rank, batch=args.lora_batch, sequence=args.lora_tokens,
                        activation_bytes=float_bytes, float_bytes=float_bytes).training


def profile_report(stages, runs, args) -> None:
    """Per stage: CPU ms per step by kind of work on each side, wall ms per step, cores busy."""
    for stage in stages:
        sides = {side: runs[f"{stage}-{side}"][0].result for side in ("mlx", "torch")}
        profiles = {side: result.get("profile") for side, result in sides.items()}
        if not all(profiles.values()):
            continue
        per_step = {side: {kind: 1000 * s / profiles[side]["steps"] for kind, s in profiles[side]["kinds"].items()}
                    for side in sides}
        wall = {side: 1000 * profiles[side]["wall_seconds"] / profiles[side]["steps"] for side in sides}
        rows = [[kind, f"{per_step['mlx'][kind]:.1f}", f"{per_step['torch'][kind]:.1f}"]
                for kind in cpu_profile.KINDS if per_step["mlx"][kind] + per_step["torch"][kind] >= 0.05]
        cpu = {side: sum(per_step[side].values()) for side in sides}
        rows.append(["all CPU time", f"{cpu['mlx']:.1f}", f"{cpu['torch']:.1f}"])
        rows.append(["wall time per step (recording / steps)", f"{wall['mlx']:.1f}", f"{wall['torch']:.1f}"])
        rows.append(["cores busy (CPU / wall)", *(f"{cpu[s] / wall[s]:.2f}" if wall[s] else "-" for s in sides)])
        print(f"Where the time goes, {stage} stage: CPU ms per training step by kind of work "
              f"(perf, {cpu_profile.FREQUENCY} Hz cpu-clock samples over the steps after the warm-up)")
        common.print_table(["kind of work", "MLX ms/step", "PyTorch ms/step"], rows)
        for side in sides:
            top = "; ".join(f"{symbol} ({kind}) {1000 * s / profiles[side]['steps']:.1f}"
                            for kind, symbol, s in profiles[side]["top"][:5])
            print(f"top symbols, {common.LABELS[side]}: {top}")
        print()


def lora_report(args, runs) -> None:
    lora, qlora = (runs[name][0].result for name in ("lora", "qlora"))
    peak = {name: common.best(runs[name], "mlx_peak_memory", min) for name in ("lora", "qlora")}
    rss = {name: min(r.peak_rss for r in runs[name]) for name in ("lora", "qlora")}
    rate = {name: common.best(runs[name], "tokens_per_s") for name in ("lora", "qlora")}
    estimate = {"lora": memory_estimate(args, None), "qlora": memory_estimate(args, 4)}
    rows = []
    for name, label, result in (("lora", "LoRA", lora), ("qlora", "QLoRA, 4-bit base (group 64)", qlora)):
        rows.append([label, f"{rate[name]:.1f}", size(peak[name]), size(estimate[name]), size(rss[name]),
                     size(result["weight_bytes"]), f"{result['trainable'] / 1e6:.2f} M",
                     f"{result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"])
    memory_ratio = peak["qlora"] / peak["lora"]
    rows.append(["QLoRA / LoRA", common.ratio(rate["qlora"], rate["lora"]), f"{memory_ratio:.0%}",
                 f"{estimate['qlora'] / estimate['lora']:.0%}", f"{rss['qlora'] / rss['lora']:.0%}",
                 f"{qlora['weight_bytes'] / lora['weight_bytes']:.0%}", None, None])
    print(f"LoRA rank {args.lora_rank} on every linear of every block, AdamW, batch {args.lora_batch} x "
          f"{args.lora_tokens} tokens, {lora['dtype']} on the {lora['device']}, median of {args.lora_steps} steps "
          f"after {args.lora_warmup} warm-up; MLX peak = mx.get_peak_memory() over training; estimate = "
          "lavit_mlx.training.lora.qlora_memory's training total\n")
    common.print_table(["fine-tuning", "tokens/s", "MLX peak memory", "estimate", "peak RSS", "weights",
                        "trainable", "loss first -> last"], rows)
    print(f"target: QLoRA peak memory <= {QLORA_TARGET:.0%} of LoRA's: "
          f"{'met' if memory_ratio <= QLORA_TARGET else 'MISSED'} ({memory_ratio:.0%})")


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=16, help=f"steps per stage run (the first {WARMUP} not counted)")
    parser.add_argument("--width", type=int, default=64, help="EVA / tokenizer / decoder width of the stages")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of each framework (default: $OMP_NUM_THREADS, else the usable cores)")
    parser.add_argument("--no-lora", action="store_true", help="skip LoRA vs QLoRA")
    parser.add_argument("--lora-hidden", type=int, default=2048)
    parser.add_argument("--lora-layers", type=int, default=16)
    parser.add_argument("--lora-heads", type=int, default=32)
    parser.add_argument("--lora-intermediate", type=int, default=5504)
    parser.add_argument("--lora-vocab", type=int, default=32000)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-batch", type=int, default=1)
    parser.add_argument("--lora-tokens", type=int, default=256)
    parser.add_argument("--lora-steps", type=int, default=2, help="timed optimizer steps (after the warm-up ones)")
    parser.add_argument("--lora-warmup", type=int, default=1, help="untimed first optimizer steps (the first compiles)")
    parser.add_argument("--lora-dtype", help="float32 | float16 | bfloat16 (default: float32 on the CPU, "
                                             "bfloat16 on a GPU)")
    parser.add_argument("--streams", type=int, default=1,
                        help="the MLX stages' train.streams: batch parts run side by side on their own streams "
                             "(0: one per core; default 1, whole batches)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample each stage worker's steps after the warm-up with Linux perf and print "
                             "its CPU time per step by kind of work (gemm, elementwise, waiting threads, ...)")
    parser.add_argument("--fixture", help=argparse.SUPPRESS)
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if not args.threads:
        from lavit_mlx.cpu.runtime import usable_cores

        args.threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or usable_cores()
    if args.worker:
        return common.serve(args, work)
    if args.steps <= WARMUP or args.lora_steps < 1 or args.lora_warmup < 0:
        parser.error(f"--steps must be above {WARMUP}, --lora-steps at least 1, --lora-warmup at least 0")
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (choose from {', '.join(STAGES)})")
    if args.streams < 0:
        parser.error(f"--streams {args.streams}: expected 0 (one per core) or more")
    if args.profile and cpu_profile.unavailable():
        parser.error(cpu_profile.unavailable())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    threads = tuple((k, str(args.threads)) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    workers = [common.Worker(f"{stage}-{side}", (side,), threads) for stage in stages for side in ("mlx", "torch")]
    if not args.no_lora:
        workers += [common.Worker("lora", ("mlx",), threads), common.Worker("qlora", ("mlx",), threads)]
    with tempfile.TemporaryDirectory() as tmp:
        if stages:
            write_fixture(args, Path(tmp) / "fixture", stages)
            args.fixture = str(Path(tmp) / "fixture")
        runs = common.run_rounds(__file__, workers, common.forward(args, skip=["no_lora"]), Path(tmp), args.rounds)

    title = (f"Training throughput, MLX vs PyTorch (float32, {args.threads} thread{'s' if args.threads > 1 else ''} "
             f"each): stages at EVA width {args.width}, {args.image_size}px images, batch {args.batch_size}, "
             f"MLX train.streams {args.streams}, "
             f"{args.steps} steps (median after {WARMUP})")
    if not args.no_lora:
        title += (f"; LoRA vs QLoRA on a {billions(parameter_count(args))} LLaMA (hidden {args.lora_hidden}, "
                  f"{args.lora_layers} layers, {args.lora_heads} heads, MLP {args.lora_intermediate}, vocab "
                  f"{args.lora_vocab})")
    common.print_header(title, runs)
    print()
    if stages:
        rows = stage_rows(stages, runs)
        common.print_table(["stage", "MLX steps/s", "PyTorch steps/s", "MLX samples/s", "PyTorch samples/s",
                            "MLX / PyTorch", "PyTorch frozen encoders ms/step", "MLX / PyTorch less frozen",
                            "data ms/step (MLX / PyTorch)", "set-up s (MLX / PyTorch)",
                            "peak RSS GiB (MLX / PyTorch)"], rows)
        slower = [row[0] for row in rows if row[5] == "-" or float(row[5].rstrip("x")) < MLX_TARGET]
        print("PyTorch frozen encoders: the time its step spends in the frozen modules (EVA; in llm and pixel also "
              "the tokenizer, in pixel the VAE). The MLX llm and pixel stages run those once over the data at set-up "
              "(cached), PyTorch's every step; 'less frozen' compares MLX with PyTorch's step minus that time")
        print(f"target: MLX >= {MLX_TARGET:.1f}x PyTorch in every stage: "
              f"{'met' if not slower else 'MISSED (' + ', '.join(slower) + ')'}\n")
        if args.profile:
            profile_report(stages, runs, args)
    if not args.no_lora:
        lora_report(args, runs)


if __name__ == "__main__":
    main()
