"""Pixel decoding speed: one UNet step and one VAE decode, MLX vs diffusers (PyTorch fp32).

    python benchmarks/pixel.py [--repeats 3] [--rounds 2] [--latent 32] [--context 256] [--vae-latent 32]

The UNet is SDXL-shaped (LaVIT's high-res decoder) at reduced depth so that a step
takes about a second on two CPU cores: block_out_channels (320, 640, 1280), one resnet
per block, one transformer layer per attention block, heads (5, 10, 20), linear
projections, cross-attention width 2048, text_time added embedding; batch 2 (the
conditional and unconditional guidance branches) on a 32x32 latent with 256 context
tokens (LaVIT's prompt length). The VAE is Stable Diffusion's full decoder
(block_out_channels (128, 256, 512, 512), two resnets per block), decoding one 32x32
latent to a 256x256 image. Weights are random, written once with `save_pretrained`
and read by each framework in its own process, so neither one's threads compete with
the other's. The largest relative difference between the two outputs is printed.

The second UNet row is the step as a sampling loop runs it with this package: the
cross-attention keys and values of the (fixed) conditioning are projected once by
`UNet2DConditionModel.prepare_context` and reused; diffusers projects them in every
step, so its column repeats its plain step time.
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

UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 1, 1), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
POOLED_DIM = 1280
TIMESTEP = 501


def make_inputs(args):
    import numpy as np

    rng = np.random.default_rng(0)
    return dict(
        latents=rng.standard_normal((2, 4, args.latent, args.latent)).astype(np.float32),
        context=rng.standard_normal((2, args.context, 2048)).astype(np.float32),
        pooled=rng.standard_normal((2, POOLED_DIM)).astype(np.float32),
        time_ids=np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (2, 1)),
        vae_latents=rng.standard_normal((1, 4, args.vae_latent, args.vae_latent)).astype(np.float32),
    )


def make_models(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(str(folder / "unet"))
    AutoencoderKL(**VAE_CONFIG).save_pretrained(str(folder / "vae"))


def timed(fn, repeats: int):
    """(best seconds, last output) after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def worker(args) -> None:
    import numpy as np

    folder = Path(args.models)
    x = make_inputs(args)
    if args.worker == "mlx":
        from lavit_mlx.runtime import ensure_fast_runtime

        ensure_fast_runtime()
        import mlx.core as mx

        from lavit_mlx.models.unet import load_unet
        from lavit_mlx.models.vae import load_vae

        unet, vae = load_unet(folder / "unet"), load_vae(folder / "vae")
        inputs = {k: mx.array(v) for k, v in x.items()}

        def unet_step():
            out = unet(inputs["latents"], TIMESTEP, inputs["context"], text_embeds=inputs["pooled"],
                       time_ids=inputs["time_ids"])
            mx.eval(out)
            return np.array(out)

        prepared = unet.prepare_context(inputs["context"])
        mx.eval(prepared.keys_values)

        def unet_step_prepared():  # the steady state of a sampling loop: context projected once
            out = unet(inputs["latents"], TIMESTEP, prepared, text_embeds=inputs["pooled"],
                       time_ids=inputs["time_ids"])
            mx.eval(out)
            return np.array(out)

        def vae_decode():
            out = vae.decode(inputs["vae_latents"])
            mx.eval(out)
            return np.array(out)
    else:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.set_grad_enabled(False)
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
        vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
        inputs = {k: torch.from_numpy(v) for k, v in x.items()}

        def unet_step():
            return unet(inputs["latents"], TIMESTEP, encoder_hidden_states=inputs["context"],
                        added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
                        ).sample.numpy()

        def vae_decode():
            return vae.decode(inputs["vae_latents"]).sample.numpy()

        unet_step_prepared = unet_step  # diffusers projects the context in every step

    result = {}
    for name, fn in (("unet", unet_step), ("unet_prepared", unet_step_prepared), ("vae", vae_decode)):
        seconds, out = timed(fn, args.repeats)
        np.save(Path(args.out) / f"{args.worker}_{name}.npy", out)
        result[name] = seconds
    (Path(args.out) / f"{args.worker}.json").write_text(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process (best kept)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per framework, alternating")
    parser.add_argument("--latent", type=int, default=32, help="UNet latent side (batch 2)")
    parser.add_argument("--context", type=int, default=256, help="context tokens")
    parser.add_argument("--vae-latent", type=int, default=32, help="VAE latent side (batch 1)")
    parser.add_argument("--only", choices=["mlx", "torch"], help="run one framework only")
    parser.add_argument("--fixture", default=str(ROOT.parent / "shared" / "fixtures" / "official-tiny"),
                        help="fixture whose checkpoint `lavit generate` runs on for the peak-memory line")
    parser.add_argument("--models", help="reuse a folder of saved models (written if absent)")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import numpy as np
    import torch

    from lavit_mlx.runtime import find_openblas

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        if not (models / "vae" / "config.json").is_file():
            make_models(models)
        results = {}
        frameworks = [args.only] if args.only else ["mlx", "torch"]
        # Alternate the frameworks over rounds and keep each one's best time, so that a
        # burst of other load on a shared machine does not decide the comparison.
        for _ in range(args.rounds):
            for name in frameworks:
                env = dict(os.environ)
                if name == "torch":  # torch brings its own BLAS; no preload, no malloc tuning
                    env.pop("LD_PRELOAD", None)
                cmd = [sys.executable, __file__, "--worker", name, "--models", str(models), "--out", tmp,
                       "--repeats", str(args.repeats), "--latent", str(args.latent),
                       "--context", str(args.context), "--vae-latent", str(args.vae_latent)]
                subprocess.run(cmd, check=True, env=env)
                measured = json.loads((Path(tmp) / f"{name}.json").read_text())
                best = results.setdefault(name, measured)
                results[name] = {k: min(v, best[k]) for k, v in measured.items()}
        outputs = {(f, c): np.load(Path(tmp) / f"{f}_{c}.npy") for f in frameworks
                   for c in ("unet", "unet_prepared", "vae")}

    blas = f"OpenBLAS ({find_openblas()})" if find_openblas() else "bundled reference BLAS"
    print(f"pixel decoding, float32, {os.cpu_count()} CPU threads; MLX with {blas}, "
          f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"UNet: SDXL-shaped (320, 640, 1280), 1 layer/block, batch 2, latent {args.latent}x{args.latent}, "
          f"{args.context} context tokens. VAE: SD decoder, latent {args.vae_latent}x{args.vae_latent} -> "
          f"{8 * args.vae_latent}x{8 * args.vae_latent} image.")
    print("| step | MLX s | diffusers s | MLX speed vs diffusers | max rel diff |")
    print("|---|---:|---:|---:|---:|")
    rows = (("unet", "UNet step (batch 2)"),
            ("unet_prepared", "UNet step, context projected once (sampling loop)"),
            ("vae", "VAE decode"))
    for component, label in rows:
        row = {f: results[f][component] for f in frameworks}
        mlx_s, torch_s = row.get("mlx"), row.get("torch")
        speed = f"{torch_s / mlx_s:.2f}x" if mlx_s and torch_s else "-"
        diff = "-"
        if len(frameworks) == 2:
            ours, ref = outputs[("mlx", component)], outputs[("torch", component)]
            diff = f"{np.abs(ours - ref).max() / np.abs(ref).max():.1e}"
        fmt = lambda s: f"{s:.3f}" if s else "-"  # noqa: E731
        print(f"| {label} | {fmt(mlx_s)} | {fmt(torch_s)} | {speed} | {diff} |")
    generate_memory(Path(args.fixture))


def generate_memory(fixture: Path) -> None:
    """Peak resident memory of `lavit generate` (all stages, default high-res decoder) on a fixture."""
    checkpoint = fixture / "checkpoint"
    if not checkpoint.is_dir():
        print(f"(no fixture at {fixture}: skipping the lavit generate memory line)")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure import peak_rss_of

    heads = json.loads((fixture / "expected.json").read_text()).get("config", {}).get("heads", 16)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lavit_cli.cli", "generate", "-p", "a red car", "-m", checkpoint,
               "--vision-heads", heads, "--width", 64, "--height", 64, "--steps", 5, "--seed", 0,
               "--out", Path(tmp) / "out.png"]
        rss, seconds = peak_rss_of(cmd)
    print(f"`lavit generate` on {checkpoint.name} of {fixture.name} (64x64, 5 steps): "
          f"peak resident memory {rss / 2**20:.0f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
