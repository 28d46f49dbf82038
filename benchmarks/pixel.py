"""Pixel decoding speed: one UNet step and one VAE decode, MLX vs diffusers (PyTorch fp32).

    python benchmarks/pixel.py [--repeats 3] [--rounds 2] [--latent 32] [--context 256] [--vae-latent 32]
                               [--only mlx|torch] [--models DIR] [--fixture DIR] [--quick]

The UNet is SDXL-shaped (LaVIT's high-res decoder) at reduced depth so that a step
takes about a second on two CPU cores: block_out_channels (320, 640, 1280), one resnet
per block, one transformer layer per attention block, heads (5, 10, 20), linear
projections, cross-attention width 2048, text_time added embedding; batch 2 (the
conditional and unconditional guidance branches) on a 32x32 latent with 256 context
tokens (LaVIT's prompt length). The VAE is Stable Diffusion's full decoder
(block_out_channels (128, 256, 512, 512), two resnets per block), decoding one 32x32
latent to a 256x256 image. Weights are random, written once with `save_pretrained`
and read by each framework in its own process (`common.py`), so neither one's threads
compete with the other's. The largest relative difference between the two outputs is
printed.

Two UNet rows, both like for like:
- the plain step: each framework projects the context into every cross-attention's
  keys and values inside the step;
- the step as a sampling loop runs it: the conditioning is fixed over the steps, so its
  keys and values are projected once and reused. MLX does it with
  `UNet2DConditionModel.prepare_context`; diffusers has no such option, so this
  benchmark wraps each cross-attention's `to_k`/`to_v` in `ProjectedOnce`, which
  returns its previous output while the context is the same tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]

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
# --quick: the same block types at the smallest widths GroupNorm(32) allows.
QUICK_UNET_CONFIG = dict(UNET_CONFIG, sample_size=8, block_out_channels=(32, 64, 64), attention_head_dim=(1, 2, 2),
                         cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
QUICK_VAE_CONFIG = dict(VAE_CONFIG, layers_per_block=1, block_out_channels=(32, 32, 32, 32))
QUICK = dict(repeats=1, rounds=1, latent=8, context=8, vae_latent=8)
TIMESTEP = 501
COMPONENTS = ("unet", "unet_prepared", "vae")


def make_inputs(args, unet_config: dict):
    """Latents, context, pooled embedding and time ids of the sizes the saved UNet takes."""
    import numpy as np

    rng = np.random.default_rng(0)
    time_ids = 6  # SDXL: original size, crop, target size
    pooled = unet_config["projection_class_embeddings_input_dim"] - time_ids * unet_config["addition_time_embed_dim"]
    return dict(
        latents=rng.standard_normal((2, 4, args.latent, args.latent)).astype(np.float32),
        context=rng.standard_normal((2, args.context, unet_config["cross_attention_dim"])).astype(np.float32),
        pooled=rng.standard_normal((2, pooled)).astype(np.float32),
        time_ids=np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (2, 1)),
        vae_latents=rng.standard_normal((1, 4, args.vae_latent, args.vae_latent)).astype(np.float32),
    )


def make_models(folder: Path, quick: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**(QUICK_UNET_CONFIG if quick else UNET_CONFIG)).save_pretrained(str(folder / "unet"))
    AutoencoderKL(**(QUICK_VAE_CONFIG if quick else VAE_CONFIG)).save_pretrained(str(folder / "vae"))


def mlx_steps(folder: Path, x: dict) -> dict:
    """{component: a call that runs it to completion and returns the output as numpy}."""
    import mlx.core as mx
    import numpy as np

    from lavit_mlx.models.unet import load_unet
    from lavit_mlx.models.vae import load_vae

    unet, vae = load_unet(folder / "unet"), load_vae(folder / "vae")
    inputs = {k: mx.array(v) for k, v in x.items()}

    def step(context):
        out = unet(inputs["latents"], TIMESTEP, context, text_embeds=inputs["pooled"], time_ids=inputs["time_ids"])
        mx.eval(out)
        return np.array(out)

    prepared = unet.prepare_context(inputs["context"])
    mx.eval(prepared.keys_values)

    def vae_decode():
        out = vae.decode(inputs["vae_latents"])
        mx.eval(out)
        return np.array(out)

    return {"unet": lambda: step(inputs["context"]), "unet_prepared": lambda: step(prepared), "vae": vae_decode}


def torch_steps(folder: Path, x: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    inputs = {k: torch.from_numpy(v) for k, v in x.items()}
    projections: list = []

    def step():
        return unet(inputs["latents"], TIMESTEP, encoder_hidden_states=inputs["context"],
                    added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}).sample.numpy()

    def prepared_step():
        if not projections:  # from here on the UNet reuses the context's keys and values
            projections.extend(project_context_once(unet))
            step()  # projects them (the warm-up call)
        out = step()
        if not all(p.reused for p in projections):
            raise RuntimeError("diffusers did not reuse the projected context (a ProjectedOnce never hit)")
        return out

    return {"unet": step, "unet_prepared": prepared_step, "vae": lambda: vae.decode(inputs["vae_latents"]).sample.numpy()}


def project_context_once(unet) -> list:
    """Wrap every cross-attention's to_k / to_v of a diffusers UNet in `ProjectedOnce`."""
    import torch
    from diffusers.models.attention_processor import Attention

    class ProjectedOnce(torch.nn.Module):
        """A key/value projection that returns its last output while the context is the same tensor."""

        def __init__(self, projection):
            super().__init__()
            self.projection, self.context, self.projected, self.reused = projection, None, None, 0

        def forward(self, context):
            if context is self.context:
                self.reused += 1
            else:
                self.context, self.projected = context, self.projection(context)
            return self.projected

    wrapped = []
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.to_k, module.to_v = ProjectedOnce(module.to_k), ProjectedOnce(module.to_v)
            wrapped += [module.to_k, module.to_v]
    if not wrapped:
        raise RuntimeError("no cross-attention found in the diffusers UNet")
    return wrapped


def work(args) -> dict:
    """Best seconds per component; the outputs are saved next to the result for the comparison."""
    import numpy as np

    folder = Path(args.models)
    x = make_inputs(args, json.loads((folder / "unet" / "config.json").read_text()))
    steps = (mlx_steps if args.worker == "mlx" else torch_steps)(folder, x)
    seconds = {}
    for component in COMPONENTS:  # in this order: the plain step runs before diffusers' wrapping
        timing = common.timed(steps[component], args.repeats)
        np.save(Path(args.out) / f"{component}.npy", timing.output)
        seconds[component] = timing.best
    return {"seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process (best kept)")
    parser.add_argument("--latent", type=int, default=32, help="UNet latent side (batch 2)")
    parser.add_argument("--context", type=int, default=256, help="context tokens")
    parser.add_argument("--vae-latent", type=int, default=32, help="VAE latent side (batch 1)")
    parser.add_argument("--only", choices=["mlx", "torch"], help="run one framework only")
    parser.add_argument("--fixture", default=str(ROOT.parent / "shared" / "fixtures" / "official-tiny"),
                        help="fixture whose checkpoint `lavit generate` runs on for the peak-memory line")
    parser.add_argument("--models", help="reuse a folder of saved models (written if absent)")
    common.add_arguments(parser, rounds=2)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, work)

    import numpy as np

    workers = [w for w in (common.MLX, common.TORCH) if args.only in (None, w.name)]
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models) if args.models else Path(tmp) / "models"
        if not (models / "vae" / "config.json").is_file():
            make_models(models, args.quick)
        args.models = str(models)
        runs = common.run_rounds(__file__, workers, common.forward(args, skip=["only", "fixture"]), Path(tmp),
                                 args.rounds)
        seconds = {name: common.best_by_key(worker_runs, "seconds", better=min) for name, worker_runs in runs.items()}
        outputs = {(name, c): np.load(worker_runs[-1].folder / f"{c}.npy")
                   for name, worker_runs in runs.items() for c in COMPONENTS}
        unet_config = json.loads((models / "unet" / "config.json").read_text())
        vae_config = json.loads((models / "vae" / "config.json").read_text())

    common.print_header("pixel decoding: one UNet step and one VAE decode, float32, MLX vs diffusers", runs)
    print(f"UNet: SDXL-shaped {tuple(unet_config['block_out_channels'])}, {unet_config['layers_per_block']} "
          f"layer/block, batch 2, latent {args.latent}x{args.latent}, {args.context} context tokens of "
          f"{unet_config['cross_attention_dim']}. VAE: SD decoder {tuple(vae_config['block_out_channels'])}, latent "
          f"{args.vae_latent}x{args.vae_latent} -> {8 * args.vae_latent}x{8 * args.vae_latent} image.\n")
    labels = {"unet": "UNet step (batch 2), context K/V projected in the step",
              "unet_prepared": "UNet step, context K/V projected once and reused (sampling loop; MLX prepare_context, "
                               "diffusers ProjectedOnce)",
              "vae": "VAE decode"}
    rows = []
    for component in COMPONENTS:
        mlx_s, torch_s = (seconds.get(name, {}).get(component) for name in ("mlx", "torch"))
        diff = None
        if len(runs) == 2:
            ours, ref = outputs[("mlx", component)], outputs[("torch", component)]
            diff = f"{np.abs(ours - ref).max() / np.abs(ref).max():.1e}"
        rows.append([labels[component], mlx_s and f"{mlx_s:.3f}", torch_s and f"{torch_s:.3f}",
                     common.ratio(torch_s, mlx_s), diff])
    common.print_table(["step", "MLX s", "diffusers s", "MLX speed vs diffusers", "max rel diff"], rows)
    if args.quick:
        print("(--quick: skipping the `lavit generate` memory line)")
    else:
        generate_memory(Path(args.fixture))


def generate_memory(fixture: Path) -> None:
    """Peak resident memory of `lavit generate` (all stages, default high-res decoder) on a fixture."""
    checkpoint = fixture / "checkpoint"
    if not checkpoint.is_dir():
        print(f"(no fixture at {fixture}: skipping the lavit generate memory line)")
        return
    heads = json.loads((fixture / "expected.json").read_text()).get("config", {}).get("heads", 16)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lavit_cli.cli", "generate", "-p", "a red car", "-m", checkpoint,
               "--vision-heads", heads, "--width", 64, "--height", 64, "--steps", 5, "--seed", 0,
               "--out", Path(tmp) / "out.png"]
        measured = common.run_measured(cmd)
    if measured.returncode:
        raise SystemExit(f"lavit generate failed (exit code {measured.returncode}); its output is above")
    print(f"`lavit generate` on {checkpoint.name} of {fixture.name} (64x64, 5 steps): "
          f"peak resident memory {measured.peak_rss / 2**20:.0f} MiB, {measured.seconds:.1f} s")


if __name__ == "__main__":
    main()
