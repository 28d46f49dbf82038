"""Pictures of what the tokenizer does, with Pillow only (the plot of a training run needs
matplotlib, the optional `[plot]` extra).

- `token_overlay`: the image with each kept patch outlined in its token's colour, each
  dropped patch tinted with the colour of the kept token that absorbs it most (the
  merger's cross-attention, averaged over heads and blocks), and the token count;
- `side_by_side`: original | reconstruction | overlay;
- `contact_sheet`: a grid of images with captions;
- `plot_run`: a training log's curves as one PNG.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

from .errors import LaVITError
from .image_processing import ImageInput, load_image, preprocess
from .seeding import key, resolve_seed

SCALE = 2  # overlay pixels per input pixel (a 224 image becomes 448 wide: patches stay visible)
TINT = 0.45


def token_colours(count: int) -> List[tuple]:
    """Distinct, saturated colours (hues spaced by the golden ratio)."""
    colours = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


@dataclass
class Overlay:
    image: Image.Image
    num_tokens: int
    keep_mask: np.ndarray  # (grid, grid) bool
    absorbed_by: np.ndarray  # (grid, grid) index of the kept patch each patch belongs to


def token_overlay(model, image: ImageInput, sample: bool = False, seed: Optional[int] = None) -> Overlay:
    """The kept-token picture of one image (the tokenizer's selection and merger)."""
    picture = load_image(image)
    config = model.config.vision
    size, patch = config.image_size, config.patch_size
    grid = size // patch
    pixels = preprocess([picture], size)
    features = model.encode(pixels)[:, 1:]
    tokenizer = model.tokenizer
    logprobs = tokenizer.token_predictor(features)
    keep = tokenizer.select(logprobs, sample=sample, key=key(resolve_seed(seed)) if sample else None)
    weights = tokenizer.causal_encoder.absorption(features, keep)  # (1, N, N)
    keep_np = np.array(keep[0]) > 0.5
    kept = np.flatnonzero(keep_np)
    absorbed = np.arange(grid * grid)
    if kept.size:
        scores = np.array(weights[0])[kept]  # (kept, N): how much each kept token draws from each patch
        absorbed = np.where(keep_np, absorbed, kept[np.argmax(scores, axis=0)])
    canvas = picture.resize((size * SCALE, size * SCALE), Image.BICUBIC).convert("RGB")
    colours = {int(index): colour for index, colour in zip(kept, token_colours(len(kept)))}
    base = np.asarray(canvas, dtype=np.float32)
    cell = patch * SCALE
    for index in range(grid * grid):
        if keep_np[index] or not kept.size:
            continue
        r, c = divmod(index, grid)
        tint = np.array(colours[int(absorbed[index])], dtype=np.float32)
        block = base[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        block[:] = (1 - TINT) * block + TINT * tint
    out = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for index in kept:
        r, c = divmod(int(index), grid)
        box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
        draw.rectangle(box, outline=colours[int(index)], width=max(2, SCALE + 1))
    label = f"{len(kept)} tokens of {grid * grid}"
    draw.rectangle([0, 0, 8 + 7 * len(label), 16], fill=(0, 0, 0))
    draw.text((4, 3), label, fill=(255, 255, 255))
    return Overlay(out, int(len(kept)), keep_np.reshape(grid, grid), absorbed.reshape(grid, grid))


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str] = ()) -> Image.Image:
    """Images of one height next to each other, each with a label above it."""
    height = max(im.height for im in images)
    scaled = [im.convert("RGB").resize((round(im.width * height / im.height), height)) for im in images]
    bar = 18 if labels else 0
    out = Image.new("RGB", (sum(im.width for im in scaled) + 4 * (len(scaled) - 1), height + bar), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for i, im in enumerate(scaled):
        out.paste(im, (x, bar))
        if i < len(labels):
            draw.text((x + 4, 3), labels[i], fill=(0, 0, 0))
        x += im.width + 4
    return out


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str] = (), columns: int = 4,
                  cell: int = 224) -> Image.Image:
    """A grid of images (each `cell` square) with up to two lines of caption under each."""
    if not images:
        raise LaVITError("a contact sheet needs at least one image")
    rows = math.ceil(len(images) / columns)
    text_h = 28 if captions else 0
    sheet = Image.new("RGB", (columns * (cell + 6) + 6, rows * (cell + text_h + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        x, y = 6 + c * (cell + 6), 6 + r * (cell + text_h + 6)
        sheet.paste(image.convert("RGB").resize((cell, cell)), (x, y))
        if i < len(captions):
            words, lines, line = captions[i].split(), [], ""
            for word in words:
                if len(line) + len(word) + 1 > cell // 6:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            for j, text in enumerate(lines[:2]):
                draw.text((x, y + cell + 2 + 12 * j), text, fill=(0, 0, 0))
    return sheet


PLOTTED = ("loss", "learning_rate", "grad_norm")


def plot_run(run_dir, out) -> Path:
    """The curves of a run's `log.jsonl` (losses, kept tokens, codebook usage, learning
    rate, and every other logged number) as one PNG."""
    run_dir, out = Path(run_dir), Path(out)
    log = run_dir / "log.jsonl" if run_dir.is_dir() else run_dir
    if not log.is_file():
        raise LaVITError(f"{run_dir}: no log.jsonl (is it a training run folder?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LaVITError("plotting needs matplotlib: pip install 'lavit-mlx[plot]'") from None
    train, evaluation = [], []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LaVITError(f"{log}:{number}: not JSON") from None
        (evaluation if record.get("split") == "eval" else train).append(record)
    if not train:
        raise LaVITError(f"{log}: no training steps logged yet")
    skip = {"step", "time", "eta_s", "samples_per_s", "split"}
    names = [k for k in train[-1] if k not in skip and isinstance(train[-1][k], (int, float))]
    names.sort(key=lambda k: (k not in PLOTTED, k))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps = [r["step"] for r in train if name in r]
        ax.plot(steps, [r[name] for r in train if name in r], linewidth=1.2, label="train")
        evals = [r for r in evaluation if name in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[name] for r in evals], "o-", markersize=3, label="eval")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if name in ("loss",) and min(r[name] for r in train if name in r) > 0:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    figure.suptitle(run_dir.name, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(out)
    return out
