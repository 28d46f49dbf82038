"""LLM throughput: MLX (lavit_mlx) vs transformers, same random weights, one run.

    python benchmarks/llm.py [--hidden 2048 --layers 16 --intermediate 5504 --heads 16]
                             [--prompt-tokens 128 --new-tokens 16 --image-tokens 16]

A LLaMA-shaped model with LaVIT's vocabulary (48386: 32000 text ids, [IMG], [/IMG],
16384 visual codes); the default shape (hidden 2048, 16 layers, MLP 5504, 16 heads)
has 1.0B parameters. Weights are random (normal, std 0.02) and saved once as a
transformers folder (config.json + model.safetensors); each framework then loads it
in its own process, so neither one's thread pool competes with the other's.

Measured, all float32:
- prefill tokens/s: one forward over a `--prompt-tokens` prompt;
- decode tokens/s: steady-state greedy decoding (lavit_mlx `stream_text`; for
  transformers a `use_cache=True` loop of single-token forwards, i.e. `generate`
  without its processors), timed from the first new token to the last;
- guided image-token generation (guidance 4.0, top-k 50 sampling): lavit_mlx's
  batched loop (both branches in one forward per step) against the release's
  two-pass method (a second forward with its own cache per step), steps/s;
- the memory-bandwidth bound: weight bytes read per token (every weight but the
  embedding table, of which a token reads one row) / the machine's copy bandwidth
  (numpy copy of a 1 GiB array: bytes copied per second);
- weight memory of the float32, 8-bit and 4-bit (group 64) models, and their decode speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_TEXT, CODEBOOK = 32000, 16384
VOCAB = NUM_TEXT + 2 + CODEBOOK
COPY_BYTES = 2**30
GUIDANCE = 4.0


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
    import torch
    from safetensors.torch import save_file

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
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return sum(v.numel() for v in state.values())


def copy_bandwidth() -> float:
    """Bytes copied per second by numpy (best of 5 copies of 1 GiB)."""
    import numpy as np

    src = np.ones(COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best


def prompt_ids(length: int, seed: int = 0) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(3, NUM_TEXT, size=length).tolist()


# ----------------------------------------------------------------------------- MLX
def mlx_worker(args) -> dict:
    from lavit_mlx.runtime import ensure_fast_runtime

    ensure_fast_runtime()
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

    out = {}
    lm = load_language_model(args.folder, dtype=mx.float32)
    out["weight_bytes"] = lm.weight_bytes()
    out["read_bytes_per_token"] = out["weight_bytes"] - lm.model.model.embed_tokens.weight.nbytes

    ids = mx.array([prompt_ids(args.prompt_tokens)])
    best = float("inf")
    for _ in range(2):
        cache = lm.make_cache([0])
        start = time.perf_counter()
        mx.eval(lm(input_ids=ids, cache=cache)[:, -1])
        best = min(best, time.perf_counter() - start)
    out["prefill"] = args.prompt_tokens / best

    decode(lm, 2)  # warm-up
    runs = [decode(lm, args.new_tokens) for _ in range(args.repeats)]
    out["greedy_tokens"], out["decode"] = runs[0][0], max(rate for _, rate in runs)

    config = ImageTokenDecoding(guidance_scale=GUIDANCE, min_new_tokens=args.image_tokens,
                                max_new_tokens=args.image_tokens)
    prompt = [prompt_ids(args.image_prompt_tokens, seed=2)]
    for _ in range(args.repeats):  # alternate the two methods; keep each one's best
        for name, two_pass in (("guided_batched", False), ("guided_two_pass", True)):
            tokens, rate, total = timed_steps(stream_image_tokens(lm, prompt, config, seed=0, two_pass=two_pass))
            if rate > out.get(name, 0.0):
                out[name], out[name + "_total"] = rate, total
            out[name + "_tokens"] = [t[0] for t in tokens]
    del lm, cache
    mx.clear_cache()

    for bits in (8, 4):
        lm = load_language_model(args.folder, dtype=mx.float32, quantize=bits)
        out[f"q{bits}_weight_bytes"] = lm.weight_bytes()
        out[f"q{bits}_skipped"] = lm.quantization.skipped
        decode(lm, 2)
        out[f"q{bits}_decode"] = decode(lm, args.quantized_tokens)[1]
        del lm
        mx.clear_cache()
    return out


# ----------------------------------------------------------------------------- transformers
def torch_worker(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_grad_enabled(False)
    model = LlamaForCausalLM.from_pretrained(args.folder, torch_dtype=torch.float32).eval()
    out = {}
    ids = torch.tensor([prompt_ids(args.prompt_tokens)])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        best = min(best, time.perf_counter() - start)
    out["prefill"] = args.prompt_tokens / best

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
    out["threads"] = torch.get_num_threads()
    out["version"] = torch.__version__
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
    parser.add_argument("--mlx-preload", default="",
                        help="a library to preload in the MLX process before OpenBLAS (e.g. a cblas_sgemm interposer)")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = mlx_worker(args) if args.worker == "mlx" else torch_worker(args)
        Path(args.out).write_text(json.dumps(result))
        return

    from lavit_mlx.runtime import _REEXEC_FLAG as REEXEC_FLAG
    from lavit_mlx.runtime import fast_runtime_env, find_openblas

    bandwidth = copy_bandwidth()
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("worker", "folder", "out", "mlx_preload")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        params = make_model_folder(args, folder)
        for name in ("mlx", "torch"):
            out = Path(tmp) / f"{name}.json"
            env = dict(os.environ)
            if name == "torch":  # torch brings its own BLAS; no preload, no malloc tuning
                env.pop("LD_PRELOAD", None)
            elif args.mlx_preload:
                env.update(fast_runtime_env() or {})
                env["LD_PRELOAD"] = ":".join(p for p in (args.mlx_preload, find_openblas()) if p)
                env[REEXEC_FLAG] = "1"
            cmd = [sys.executable, __file__, "--worker", name, "--folder", str(folder), "--out", str(out), *forwarded]
            subprocess.run(cmd, check=True, env=env)
            results[name] = json.loads(out.read_text())

    bandwidth = max(bandwidth, copy_bandwidth())  # the machine is shared: keep the better of two
    ours, ref = results["mlx"], results["torch"]
    bound = bandwidth / ours["read_bytes_per_token"]
    gib = 2**30
    blas = f"OpenBLAS ({find_openblas()})" if find_openblas() else "bundled reference BLAS"
    if args.mlx_preload:
        blas = f"{args.mlx_preload} preloaded before {blas}"
    print(f"\nLLaMA-shaped random model: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
          f"{args.heads} heads, vocab {VOCAB}: {params / 1e9:.2f}B parameters, float32. "
          f"MLX with {blas}; transformers on torch {ref['version']} ({ref['threads']} threads). "
          f"Copy bandwidth {bandwidth / 1e9:.2f} GB/s; {ours['read_bytes_per_token'] / 1e9:.2f} GB of weights "
          f"read per token.\n")
    print("| measurement | MLX | transformers | note |")
    print("|---|---:|---:|---|")
    print(f"| prefill, {args.prompt_tokens}-token prompt (tokens/s) | {ours['prefill']:.1f} | {ref['prefill']:.1f} | "
          f"MLX / transformers {ours['prefill'] / ref['prefill']:.2f}x |")
    print(f"| decode, batch 1 (tokens/s) | {ours['decode']:.3f} | {ref['decode']:.3f} | "
          f"bandwidth bound {bound:.3f}: MLX at {ours['decode'] / bound:.0%}, transformers at "
          f"{ref['decode'] / bound:.0%}; MLX / transformers {ours['decode'] / ref['decode']:.2f}x |")
    same = sum(a == b for a, b in zip(ours["greedy_tokens"], ref["greedy_tokens"]))
    print(f"| greedy tokens equal to transformers' | {same}/{len(ref['greedy_tokens'])} | | near-uniform random "
          f"logits; a first divergence changes the rest |")
    speedup = ours["guided_batched"] / ours["guided_two_pass"]
    print(f"| guided image tokens, batched: one forward per step (steps/s) | {ours['guided_batched']:.3f} | | "
          f"{args.image_tokens} tokens in {ours['guided_batched_total']:.1f} s with prefill |")
    print(f"| guided image tokens, two-pass as the release (steps/s) | {ours['guided_two_pass']:.3f} | | "
          f"{args.image_tokens} tokens in {ours['guided_two_pass_total']:.1f} s; batched is {speedup:.2f}x; "
          f"same tokens: {'yes' if ours['guided_batched_tokens'] == ours['guided_two_pass_tokens'] else 'no'} |")
    for bits in (8, 4):
        skipped = ours[f"q{bits}_skipped"]
        print(f"| {bits}-bit weights (GiB) / decode tokens/s | {ours[f'q{bits}_weight_bytes'] / gib:.2f} / "
              f"{ours[f'q{bits}_decode']:.3f} | | {ours[f'q{bits}_weight_bytes'] / ours['weight_bytes']:.1%} of "
              f"float32; {len(skipped)} layers left unquantized |")
    print(f"| float32 weights (GiB) | {ours['weight_bytes'] / gib:.2f} | | |")
    print(f"\ntargets: decode >= 90% of the bound: {'met' if ours['decode'] >= 0.9 * bound else 'MISSED'}; "
          f"decode >= transformers: {'met' if ours['decode'] >= ref['decode'] else 'MISSED'}; "
          f"guided batched >= 1.8x two-pass: {'met' if speedup >= 1.8 else 'MISSED'}")


if __name__ == "__main__":
    main()
