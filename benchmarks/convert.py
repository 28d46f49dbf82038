"""Peak memory of `lavit convert` on a synthetic multi-GB checkpoint.

    python benchmarks/convert.py [--hidden 3072] [--layers 16] [--shards 4] [--quick]

Writes a random LLaMA-shaped `language_model/` in the released layout (bfloat16 pickles
in several shards, vocab 48386) plus the small vision files, converts it with
`lavit convert --components llm` (float16, and 4-bit), each conversion a worker process
of its own (`common.py`) that runs the CLI's `main`, and reports the peak resident
memory of that process next to the checkpoint and largest-shard sizes. The header
describes the conversion processes (they hold both MLX and torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import common

CONVERSIONS = {"float16": [], "4-bit": ["--quantize", "4"]}
QUICK = dict(hidden=128, layers=2, shards=2)


def write_llm(folder: Path, hidden: int, layers: int, shards: int, vocab: int = 48386) -> tuple:
    import torch

    folder.mkdir(parents=True)
    intermediate = int(hidden * 8 / 3) // 256 * 256
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    keys = list(shapes)
    per_shard = -(-len(keys) // shards)
    weight_map, sizes = {}, []
    generator = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: (torch.randn(shapes[k], generator=generator) * 0.02).to(torch.bfloat16)
                for k in keys[s * per_shard:(s + 1) * per_shard]}
        torch.save(part, folder / name)
        sizes.append((folder / name).stat().st_size)
        weight_map.update({k: name for k in part})
        del part
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128,
              "rms_norm_eps": 1e-5, "vocab_size": vocab, "max_position_embeddings": 2048, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    return sum(sizes), max(sizes)


def work(args) -> dict:
    """One `lavit convert` run in this process; the conversion's own seconds."""
    import time

    from lavit_cli.cli import main as lavit

    converted = Path(args.out) / "converted"
    start = time.perf_counter()
    try:
        lavit(["convert", args.source, str(converted), "--components", "llm", *CONVERSIONS[args.worker]])
    except SystemExit as exc:  # the CLI always exits
        if exc.code:
            raise
    seconds = time.perf_counter() - start
    shutil.rmtree(converted)  # GBs at full size; the peak is already reached
    return {"seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, work)

    import torch

    workers = [common.Worker(name, ("mlx", "torch")) for name in CONVERSIONS]
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # multi-GB: not a small /tmp
        src = Path(tmp) / "release"
        total, largest = write_llm(src / "language_model", args.hidden, args.layers, args.shards)
        (src / "visual_tokenizer").mkdir()
        torch.save({"quantize.embedding.weight": torch.randn(16384, 32)}, src / "visual_tokenizer" / "tokenizer_encoder.bin")
        args.source = str(src)
        runs = common.run_rounds(__file__, workers, common.forward(args), Path(tmp), args.rounds)

    gib = 2**30
    common.print_header(f"conversion: `lavit convert --components llm` of a synthetic {total / gib:.2f} GiB bfloat16 "
                        f"LLaMA (hidden {args.hidden}, {args.layers} layers) in {args.shards} shards, largest "
                        f"{largest / gib:.2f} GiB", runs)
    rows = [[name, f"{max(r.peak_rss for r in worker_runs) / gib:.2f} GiB",
             f"{common.best(worker_runs, 'seconds', better=min):.1f}"] for name, worker_runs in runs.items()]
    common.print_table(["conversion", "peak RSS", "seconds"], rows)


if __name__ == "__main__":
    main()
