"""Write fixtures in the official-tiny format from the PyTorch mirror, at other sizes.

The mirror reproduces the official modules (it passes official-tiny), so a fixture made
here at another width, head count, depth, weight dtype and image checks that
`tests/parity.py` and the loaders are general, not fitted to one fixture. Only the
vision keys are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from lavit_mlx.image_processing import preprocess
from lavit_train.checkpoint import load_eva, load_tokenizer
from lavit_train.tiny import TinySpec, write_release_checkpoint


def make_image(path: Path, seed: int = 0, size=(200, 150)) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([np.sin(xx / 9.0 + seed), np.cos(yy / 7.0), np.sin((xx + yy) / 13.0)], -1)
    pixels = ((base * 0.5 + 0.5) * 200 + rng.integers(0, 55, base.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def build_fixture(root: Path, spec: TinySpec = TinySpec(), image_seed: int = 3) -> Path:
    root = Path(root)
    checkpoint = write_release_checkpoint(root / "checkpoint", spec)
    image = make_image(root / "input.png", image_seed)
    pixels = preprocess([Image.open(image).convert("RGB")])
    eva = load_eva(checkpoint, spec.heads)
    tokenizer = load_tokenizer(checkpoint, spec.heads)
    understanding = load_tokenizer(checkpoint, spec.heads, understanding=True)
    with torch.no_grad():
        features = eva(torch.from_numpy(pixels))
    out = tokenizer.tokenize(features[:, 1:])
    und = understanding.tokenize(features[:, 1:])
    codes = out.codes[0].numpy()
    lp = out.logprobs.numpy()
    tensors = {
        "pixel_values": pixels,
        "encoder_features": features.numpy(),
        "selector_logprobs": lp,
        "keep_mask": out.keep_mask.numpy().astype(np.float32),
        "merged_features": out.merged.numpy(),
        "code_ids": codes.astype(np.int64),
        "quantized": out.quantized.numpy(),
        "understanding_visual_embeds": und.visual_embeds[0].numpy(),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(root / "expected.safetensors"))
    facts = {
        "keep_margin": float(np.abs(lp[..., 0] - lp[..., 1]).min()),
        "code_margin": out.code_margin,
        "num_tokens": int(len(codes)),
        "code_ids": codes.tolist(),
        "llm_token_ids": [32000, *(codes + 32002).tolist(), 32001],
        "config": {"width": spec.width, "heads": spec.heads, "eva_depth": spec.eva_depth,
                   "merger_depth": spec.merger_depth, "llm_hidden": spec.llm_hidden, "llm_layers": 2,
                   "seed": spec.seed, "dtype": str(spec.dtype).replace("torch.", "")},
    }
    (root / "expected.json").write_text(json.dumps(facts, indent=1))
    return root
