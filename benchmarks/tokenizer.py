"""Visual tokenizer throughput: MLX vs the project's PyTorch mirror, same weights.

    python benchmarks/tokenizer.py [--batch-sizes 1 8] [--repeats 3] [--width 1408 ...] [--rounds 1] [--quick]

Builds the release's full sizes by default (EVA-g: 40 blocks of 1408, merger: 12
blocks) with random weights, and times processed images -> codes (EVA + selector +
merger + quantizer) in float32. Each framework runs in its own process on the same
weights file (`common.py`), so neither one's thread pool competes with the other's.
The selector's last layer is set so that about a third of the patches are kept (the
release's training target, rho = 1/3); the measured keep fraction is printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

QUICK = dict(width=64, heads=4, eva_depth=2, merger_depth=1, batch_sizes=[1, 2], repeats=1)


def configs(args):
    from lavit_mlx.config import EVAConfig, TokenizerConfig, mlp_width

    eva = EVAConfig(width=args.width, depth=args.eva_depth, num_heads=args.heads, mlp_dim=mlp_width(args.width))
    tok = TokenizerConfig(width=args.width, merger_depth=args.merger_depth, num_heads=args.heads,
                          mlp_dim=mlp_width(args.width))
    return eva, tok


def make_weights(args, path: Path) -> None:
    """Random torch weights for EVA ('eva.*') and the tokenizer ('tok.*'), saved as safetensors."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from lavit_train.models.eva_vit import EVAVisionTransformer
    from lavit_train.models.visual_tokenizer import DynamicVisualTokenizer

    eva_cfg, tok_cfg = configs(args)
    torch.manual_seed(0)
    with torch.no_grad():
        eva = EVAVisionTransformer(eva_cfg).eval()
        tok = DynamicVisualTokenizer(tok_cfg).eval()
        for p in list(eva.parameters()) + list(tok.parameters()):
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
        # Selector logits that vary across patches, thresholded so that ~1/3 are kept.
        head = tok.token_predictor.out_conv[-1]
        head.weight.normal_(0.0, 1.0)
        pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32))
        logprobs = tok.token_predictor(eva(pixels)[:, 1:])
        margin = (logprobs[..., 0] - logprobs[..., 1]).flatten()
        head.bias.add_(torch.tensor([-float(margin.quantile(2 / 3)), 0.0]))
    state = {f"eva.{k}": v.contiguous() for k, v in eva.state_dict().items()}
    state.update({f"tok.{k}": v.contiguous() for k, v in tok.state_dict().items()})
    save_file(state, str(path))


def mlx_tokenizer(args):
    """The MLX pipeline on the saved weights: pixels (B, 3, 224, 224) -> (codes per image, keep mask)."""
    import mlx.core as mx
    import numpy as np

    from lavit_mlx.models.eva_vit import EVAVisionTransformer
    from lavit_mlx.models.visual_tokenizer import DynamicVisualTokenizer
    from lavit_mlx.weights import load_strict

    eva_cfg, tok_cfg = configs(args)
    state = mx.load(args.weights)
    eva = EVAVisionTransformer(eva_cfg)
    tok = DynamicVisualTokenizer(tok_cfg)
    load_strict(eva, eva.sanitize({k[4:]: v for k, v in state.items() if k.startswith("eva.")}), "eva")
    load_strict(tok, {k[4:]: v for k, v in state.items() if k.startswith("tok.")}, "tok")
    eva.eval()  # inference: the deterministic keep rule, as the mirror's eval()
    tok.eval()
    # The tokenizer's host-side entry point is being renamed to `tokenize` (its __call__
    # becomes the differentiable forward); either gives per-image codes and the keep mask.
    tokenize = getattr(tok, "tokenize", tok)

    def run(pixels):
        out = tokenize(eva(mx.array(pixels))[:, 1:])
        return out.codes, np.array(out.keep_mask)

    return run


def torch_tokenizer(args):
    """The PyTorch mirror (lavit_train) on the same weights, same signature as `mlx_tokenizer`."""
    import torch
    from safetensors.torch import load_file

    from lavit_train.models.eva_vit import EVAVisionTransformer
    from lavit_train.models.visual_tokenizer import DynamicVisualTokenizer

    eva_cfg, tok_cfg = configs(args)
    torch.set_grad_enabled(False)
    state = load_file(args.weights)
    eva = EVAVisionTransformer(eva_cfg).eval()
    tok = DynamicVisualTokenizer(tok_cfg).eval()
    eva.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("eva.")})
    tok.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("tok.")})

    def run(pixels):
        out = tok.tokenize(eva(torch.from_numpy(pixels))[:, 1:])
        return [c.numpy() for c in out.codes], out.keep_mask.numpy()

    return run


def work(args) -> dict:
    """Time one framework: {"speed": {batch: [images/s, keep fraction]}, "codes": {batch: codes}}."""
    import numpy as np

    run = (mlx_tokenizer if args.worker == "mlx" else torch_tokenizer)(args)
    rng = np.random.default_rng(0)
    speed, codes = {}, {}
    for batch in args.batch_sizes:
        pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        timing = common.timed(lambda: run(pixels), args.repeats)
        batch_codes, keep = timing.output
        speed[str(batch)] = [batch / timing.best, float(keep.mean())]
        codes[str(batch)] = [np.asarray(c).tolist() for c in batch_codes]
    return {"speed": speed, "codes": codes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--eva-depth", type=int, default=40)
    parser.add_argument("--merger-depth", type=int, default=12)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    common.add_arguments(parser)
    args = common.parse(parser, QUICK)
    if args.worker:
        return common.serve(args, work)

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        make_weights(args, weights)
        args.weights = str(weights)
        runs = common.run_rounds(__file__, [common.MLX, common.TORCH], common.forward(args), Path(tmp), args.rounds)

    common.print_header(f"visual tokenizer: EVA {args.eva_depth} x {args.width} wide blocks, merger "
                        f"{args.merger_depth} blocks, {args.heads} heads, float32, images -> codes", runs)
    mlx_speed = common.best_by_key(runs["mlx"], "speed", better=lambda rows: max(rows, key=lambda r: r[0]))
    torch_speed = common.best_by_key(runs["torch"], "speed", better=lambda rows: max(rows, key=lambda r: r[0]))
    rows = []
    for batch in map(str, args.batch_sizes):
        (mlx_ips, keep), (torch_ips, _) = mlx_speed[batch], torch_speed[batch]
        same = runs["mlx"][0].result["codes"][batch] == runs["torch"][0].result["codes"][batch]
        rows.append([batch, f"{mlx_ips:.3f}", f"{torch_ips:.3f}", common.ratio(mlx_ips, torch_ips), f"{keep:.0%}",
                     "yes" if same else "no"])
    common.print_table(["batch", "MLX images/s", "PyTorch images/s", "MLX / PyTorch", "kept patches", "same codes"],
                       rows, align="rrrrrc")


if __name__ == "__main__":
    main()
