"""LLM throughput: MLX (lavit_mlx) vs transformers, same random weights.

    python benchmarks/llm.py [--hidden 2048 --layers 16 --intermediate 5504 --heads 16]
                             [--prompt-tokens 128 --new-tokens 16 --image-tokens 16]
                             [--no-skinny-row] [--rounds 1] [--quick]

A LLaMA-shaped model with LaVIT's vocabulary (48386: 32000 text ids, [IMG], [/IMG],
16384 visual codes); the default shape (hidden 2048, 16 layers, MLP 5504, 16 heads)
has 1.0B parameters. Weights are random (normal, std 0.02) and saved once as a
transformers folder (config.json + model.safetensors); each framework then loads it
in its own process (`common.py`), so neither one's thread pool competes with the other's.

Measured, all float32:
- prefill tokens/s: one forward over a `--prompt-tokens` prompt;
- decode tokens/s: steady-state greedy decoding (lavit_mlx `stream_text`; for
  transformers a `use_cache=True` loop of single-token forwards, i.e. `generate`
  without its processors), timed from the first new token to the last;
- guided image-token generation (guidance 4.0, top-k 50 sampling): lavit_mlx's
  batched loop (both branches in one forward per step) against the release's
  two-pass method (a second forward with its own cache per step), steps/s;
- the memory-bandwidth bound on decoding: the machine's READ bandwidth / the weight
  bytes read per token (every weight but the embedding table, of which a token reads
  one row). Decoding only reads the weights, so the bandwidth is a roofline's read
  stream: a sum over a float32 array far larger than the caches (`--bandwidth-mib`),
  one slice per core, measured in each worker, the best kept;
- weight memory of the float32, 8-bit and 4-bit (group 64) models, and their decode speed;
- with `--no-skinny-row`, decoding again in an MLX process with lavit's skinny-GEMM
  kernel turned off (`LAVIT_NO_SKINNY_SGEMM=1`: every product goes to OpenBLAS).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

NUM_TEXT, CODEBOOK = 32000, 16384
VOCAB = NUM_TEXT + 2 + CODEBOOK
GUIDANCE = 4.0
NO_SKINNY = common.Worker("mlx-no-skinny", ("mlx",), (("LAVIT_NO_SKINNY_SGEMM", "1"),))
QUICK = dict(hidden=64, layers=2, intermediate=128, heads=4, prompt_tokens=8, decode_prompt_tokens=4, new_tokens=4,
             image_prompt_tokens=4, image_tokens=4, quantized_tokens=2, repeats=1, bandwidth_mib=64)


def llama_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def make_model_folder(args, folder: Path) -> int:
    """Random weights (normal, std 0.02; norms 1) as a transformers folder; returns the parameter count."""
    import numpy as np
    from safetensors.numpy import save_file

    config = llama_config(args)
    h, m, n = args.hidden, args.intermediate, args.layers
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    rng = np.random.default_rng(0)
    state = {
        k: np.ones(s, np.float32) if len(s) == 1 else rng.standard_normal(s, np.float32) * np.float32(0.02)
        for k, s in shapes.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return sum(v.size for v in state.values())


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes read per second: column sums of a float32 array larger than the caches.

    Each thread sums its own rows (numpy releases the GIL), with one thread and with
    one per usable core; the best is kept. The accumulator row stays in L1, so the
    time is that of streaming the array in from memory.
    """
    import numpy as np

    data = np.ones((nbytes // (4 * 4096), 4096), dtype=np.float32)  # written: its pages exist
    from lavit_mlx.cpu.runtime import usable_cores

    cores = usable_cores()
    best = 0.0
    for threads in sorted({1, cores}):
        parts = np.array_split(data, threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda part: part.sum(axis=0), parts))  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(lambda part: part.sum(axis=0), parts))
                best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def prompt_ids(length: int, seed: int = 0) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(3, NUM_TEXT, size=length).tolist()


# ----------------------------------------------------------------------------- MLX
def mlx_worker(args) -> dict:
    import mlx.core as mx

    from lavit_mlx.models.llm import load_language_model
    from lavit_mlx.image_tokens import ImageTokenDecoding, stream_image_tokens
    from lavit_mlx.sampling import TextDecoding, stream_text

    def timed_steps(generator):
        """(tokens, steady-state steps/s from the first yield to the last, total seconds)."""
        start = time.perf_counter()
        stamps, tokens = [], []
        for step in generator:
            stamps.append(time.perf_counter())
            tokens.append(step)
        return tokens, (len(stamps) - 1) / (stamps[-1] - stamps[0]), stamps[-1] - start

    def decode(lm, count):
        embeds = lm.embed(mx.array(prompt_ids(args.decode_prompt_tokens, seed=1)))
        config = TextDecoding(max_new_tokens=count + 1, min_new_tokens=count + 1)
        tokens, rate, _ = timed_steps(stream_text(lm, [embeds], config))
        return [t[0] for t in tokens], rate

    out = {"read_bandwidth": read_bandwidth(args.bandwidth_mib * 2**20)}
    lm = load_language_model(args.folder, dtype=mx.float32)
    out["weight_bytes"] = lm.weight_bytes()
    out["read_bytes_per_token"] = out["weight_bytes"] - lm.model.model.embed_tokens.weight.nbytes

    ids = mx.array([prompt_ids(args.prompt_tokens)])
    prefill = common.timed(lambda: mx.eval(lm(input_ids=ids, cache=lm.make_cache([0]))[:, -1]), max(args.repeats, 2))
    out["prefill"] = args.prompt_tokens / prefill.best

    decode(lm, 2)  # warm-up
    runs = [decode(lm, args.new_tokens) for _ in range(args.repeats)]
    out["greedy_tokens"], out["decode"] = runs[0][0], max(rate for _, rate in runs)
    if args.worker == NO_SKINNY.name:
        return out

    config = ImageTokenDecoding(guidance_scale=GUIDANCE, min_new_tokens=args.image_tokens,
                                max_new_tokens=args.image_tokens)
    prompt = [prompt_ids(args.image_prompt_tokens, seed=2)]
    for _ in range(args.repeats):  # alternate the two methods; keep each one's best
        for name, two_pass in (("guided_batched", False), ("guided_two_pass", True)):
            tokens, rate, total = timed_steps(stream_image_tokens(lm, prompt, config, seed=0, two_pass=two_pass))
            if rate > out.get(name, 0.0):
                out[name], out[name + "_total"] = rate, total
            out[name + "_tokens"] = [t[0] for t in tokens]
    lm = None  # frees the float32 model before the quantized ones load
    mx.clear_cache()

    for bits in (8, 4):
        lm = load_language_model(args.folder, dtype=mx.float32, quantize=bits)
        out[f"q{bits}_weight_bytes"] = lm.weight_bytes()
        out[f"q{bits}_skipped"] = lm.quantization.skipped
        decode(lm, 2)
        out[f"q{bits}_decode"] = decode(lm, args.quantized_tokens)[1]
        lm = None
        mx.clear_cache()
    return out


# ----------------------------------------------------------------------------- transformers
def torch_worker(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_grad_enabled(False)
    out = {"read_bandwidth": read_bandwidth(args.bandwidth_mib * 2**20)}
    model = LlamaForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(args.prompt_tokens)])
    prefill = common.timed(lambda: model(input_ids=ids, use_cache=True), max(args.repeats, 2))
    out["prefill"] = args.prompt_tokens / prefill.best

    def decode(count):
        embeds = model.model.embed_tokens(torch.tensor([prompt_ids(args.decode_prompt_tokens, seed=1)]))
        result = model(inputs_embeds=embeds, use_cache=True)
        tokens, stamps = [], []
        for _ in range(count + 1):
            token = result.logits[:, -1, :NUM_TEXT].argmax(-1, keepdim=True)  # visual ids suppressed
            tokens.append(int(token))
            stamps.append(time.perf_counter())
            result = model(input_ids=token, past_key_values=result.past_key_values, use_cache=True)
        return tokens, count / (stamps[-1] - stamps[0])

    decode(2)
    runs = [decode(args.new_tokens) for _ in range(args.repeats)]
    out["greedy_tokens"], out["decode"] = runs[0][0], max(rate for _, rate in runs)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--image-prompt-tokens", type=int, default=16)
    parser.add_argument("--image-tokens", type=int, default=16)
    parser.add_argument("--quantized-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each timing; the best is kept")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="size of the array whose summing measures the read bandwidth (far above the caches)")
    parser.add_argument("--no-skinny-row", action="store_true",
                        help="also decode in an MLX process without the skinny-GEMM kernel (LAVIT_NO_SKINNY_SGEMM=1)")
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, torch_worker if args.worker == "torch" else mlx_worker)

    workers = [common.MLX, common.TORCH] + ([NO_SKINNY] if args.no_skinny_row else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        params = make_model_folder(args, folder)
        args.folder = str(folder)
        runs = common.run_rounds(__file__, workers, common.forward(args, skip=["no_skinny_row"]), Path(tmp),
                                 args.rounds)

    ours, ref = runs["mlx"][0].result, runs["torch"][0].result
    bandwidth = max(run.result["read_bandwidth"] for worker_runs in runs.values() for run in worker_runs)
    read_per_token = ours["read_bytes_per_token"]
    bound = bandwidth / read_per_token
    mlx = {key: common.best(runs["mlx"], key) for key in ("prefill", "decode", "guided_batched", "guided_two_pass",
                                                           "q8_decode", "q4_decode")}
    torch_prefill, torch_decode = common.best(runs["torch"], "prefill"), common.best(runs["torch"], "decode")
    gib = 2**30

    common.print_header(f"LLM: LLaMA-shaped random model, hidden {args.hidden}, {args.layers} layers, MLP "
                        f"{args.intermediate}, {args.heads} heads, vocab {VOCAB}: {params / 1e9:.2f}B parameters, "
                        "float32", runs)
    print(f"read bandwidth {bandwidth / 1e9:.2f} GB/s (column sums of a {args.bandwidth_mib} MiB float32 array, "
          f"best over the workers); {read_per_token / 1e9:.3f} GB of weights read per token\n")
    rows = [
        [f"prefill, {args.prompt_tokens}-token prompt (tokens/s)", f"{mlx['prefill']:.1f}", f"{torch_prefill:.1f}",
         f"MLX / transformers {common.ratio(mlx['prefill'], torch_prefill)}"],
        ["decode, batch 1 (tokens/s)", f"{mlx['decode']:.3f}", f"{torch_decode:.3f}",
         f"MLX at {mlx['decode'] / bound:.0%} of the bound, transformers at {torch_decode / bound:.0%}; "
         f"MLX / transformers {common.ratio(mlx['decode'], torch_decode)}"],
        ["decode bound: read bandwidth / weight bytes per token (tokens/s)", f"{bound:.3f}", f"{bound:.3f}",
         f"{read_per_token / 1e9:.3f} GB per token at {bandwidth / 1e9:.2f} GB/s read"],
    ]
    if args.no_skinny_row:
        no_skinny = common.best(runs[NO_SKINNY.name], "decode")
        rows.append(["decode, batch 1, skinny-GEMM kernel off (LAVIT_NO_SKINNY_SGEMM=1) (tokens/s)",
                     f"{no_skinny:.3f}", None, f"{no_skinny / bound:.0%} of the bound; the kernel gives "
                     f"{common.ratio(mlx['decode'], no_skinny)}"])
    same = sum(a == b for a, b in zip(ours["greedy_tokens"], ref["greedy_tokens"]))
    rows.append(["greedy tokens equal to transformers'", f"{same}/{len(ref['greedy_tokens'])}", None,
                 "near-uniform random logits; a first divergence changes the rest"])
    speedup = mlx["guided_batched"] / mlx["guided_two_pass"]
    rows.append(["guided image tokens, batched: one forward per step (steps/s)", f"{mlx['guided_batched']:.3f}", None,
                 f"{args.image_tokens} tokens in {ours['guided_batched_total']:.1f} s with prefill"])
    same_guided = "yes" if ours["guided_batched_tokens"] == ours["guided_two_pass_tokens"] else "no"
    rows.append(["guided image tokens, two-pass as the release (steps/s)", f"{mlx['guided_two_pass']:.3f}", None,
                 f"{args.image_tokens} tokens in {ours['guided_two_pass_total']:.1f} s; batched is {speedup:.2f}x; "
                 f"same tokens: {same_guided}"])
    for bits in (8, 4):
        weight_bytes = ours[f"q{bits}_weight_bytes"]
        rows.append([f"{bits}-bit weights (GiB) / decode tokens/s", f"{weight_bytes / gib:.2f} / "
                     f"{mlx[f'q{bits}_decode']:.3f}", None, f"{weight_bytes / ours['weight_bytes']:.1%} of float32; "
                     f"{len(ours[f'q{bits}_skipped'])} layers left unquantized"])
    rows.append(["float32 weights (GiB)", f"{ours['weight_bytes'] / gib:.2f}", None, None])
    common.print_table(["measurement", "MLX", "transformers", "note"], rows, align="lrrl")
    print(f"targets: decode >= 90% of the bound: {'met' if mlx['decode'] >= 0.9 * bound else 'MISSED'}; "
          f"decode >= transformers: {'met' if mlx['decode'] >= torch_decode else 'MISSED'}; "
          f"guided batched >= 1.8x two-pass: {'met' if speedup >= 1.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
