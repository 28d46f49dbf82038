"""Linear probes of what the tokenizer's stages keep of a shapes-world picture.

    python -m lavit_mlx.shapes.probes [MODEL] [--scenes 200] [--seed 987654]

For the object patches of fresh scenes (a patch that `world.patch_objects` gives an object),
a ridge classifier is fitted on the first half of the scenes and scored on the second, on:

    target    the encoder's patch features (what the VQ decoder reconstructs)
    decoded   the VQ decoder's output at those patches (what the pixel decoder is conditioned on)
    merged    the merger's output at the kept ones (the LLM's visual input)
    z         the quantizer's input at the kept ones
    row       the kept code's codebook row (the LLM's visual targets stand for these)

and reads the object's colour (six classes, chance about 1/6) and, for the kept ones, its
cell (nine). The decoded features' cosine to their targets, on object and on background
patches, is reported too. These are the figures the model card quotes; they say where the
pipeline loses what an object is (the caption and image gates say only that it does).
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, Optional

import numpy as np

from . import world

PROBE_SEED = 987654  # fresh scenes: the build renders seeds 0 and 1
RIDGE = 1.0


def ridge_accuracy(features, labels, groups, ridge: float = RIDGE) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardised features, fitted on
    the items whose group (scene) is in the first half and scored on the rest."""
    X, y, groups = np.asarray(features, np.float64), np.asarray(labels), np.asarray(groups)
    train = groups < np.median(np.unique(groups))
    test = ~train
    if train.sum() < 2 or test.sum() < 1:
        raise ValueError("too few items to probe: give more scenes")
    mean, std = X[train].mean(axis=0), X[train].std(axis=0) + 1e-6
    X = (X - mean) / std
    classes = np.unique(y[train])
    Y = (y[train, None] == classes[None, :]).astype(np.float64)
    A = X[train]
    W = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ Y)
    return float((classes[np.argmax(X[test] @ W, axis=1)] == y[test]).mean())


def probe(model, scenes: int = 200, seed: int = PROBE_SEED, batch: int = 20) -> Dict[str, float]:
    """The probes' accuracies and cosines (see the module docstring) for a loaded LaVIT model
    with an encoder, a tokenizer and a high-res VQ decoder."""
    import mlx.core as mx

    from ..image_processing import preprocess
    from ..training.stages.tokenizer import kept_positions

    if scenes < 4:
        raise ValueError("the probes need at least 4 scenes")
    eva, tokenizer = model.component("eva"), model.component("tokenizer")
    decoder = model.component("highres_decoder")
    size = model.config.vision.image_size
    everywhere = {"target": [], "decoded": []}
    kept = {"merged": [], "z": [], "row": []}
    colour, scene_of, kept_colour, kept_cell, kept_scene = [], [], [], [], []
    cos_object, cos_background = [], []
    drawn = list(world.scenes(seed, scenes))
    for start in range(0, scenes, batch):
        chunk = drawn[start:start + batch]
        pictures = [world.render(scene) for scene in chunk]
        target = eva(mx.array(preprocess(pictures, size)).astype(mx.float32))[:, 1:].astype(mx.float32)
        out = tokenizer(target)
        decoded = decoder.decode_features(out.quantized, out.keep, kept_positions(out.keep)).astype(mx.float32)
        rows = tokenizer.quantize.embedding(out.codes)
        mx.eval(target, decoded, rows, out.z, out.merged, out.keep)
        arrays = {"target": np.array(target), "decoded": np.array(decoded), "merged": np.array(out.merged),
                  "z": np.array(out.z), "row": np.array(rows)}
        keep = np.array(out.keep) > 0.5
        for i, (picture, scene) in enumerate(zip(pictures, chunk)):
            colours, _, cells = world.patch_objects(picture, world.caption(scene), size // int(np.sqrt(keep.shape[1])))
            t, d = arrays["target"][i], arrays["decoded"][i]
            cos = (t * d).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(d, axis=-1) + 1e-8)
            on = colours > 0
            cos_object += list(cos[on])
            cos_background += list(cos[~on])
            for p in np.flatnonzero(on):
                for name in everywhere:
                    everywhere[name].append(arrays[name][i, p])
                colour.append(colours[p])
                scene_of.append(start + i)
                if keep[i, p]:
                    for name in kept:
                        kept[name].append(arrays[name][i, p])
                    kept_colour.append(colours[p])
                    kept_cell.append(cells[p])
                    kept_scene.append(start + i)
    report = {"scenes": scenes, "object_patches": len(colour), "kept_object_patches": len(kept_colour)}
    for name, features in everywhere.items():
        report[f"{name}_colour"] = ridge_accuracy(features, colour, scene_of)
    for name, features in kept.items():
        report[f"{name}_colour"] = ridge_accuracy(features, kept_colour, kept_scene)
        report[f"{name}_cell"] = ridge_accuracy(features, kept_cell, kept_scene)
    report["decoded_cos_object"] = float(np.mean(cos_object))
    report["decoded_cos_background"] = float(np.mean(cos_background))
    return report


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="MLX folder (default: the bundled shapes model)")
    parser.add_argument("--scenes", type=int, default=200, help="fresh scenes probed (default 200)")
    parser.add_argument("--seed", type=int, default=PROBE_SEED, help=f"their seed (default {PROBE_SEED})")
    args = parser.parse_args(argv)
    import lavit_mlx
    from ..errors import LaVITError
    from ..zoo import bundled_model

    try:
        model = lavit_mlx.load(args.model or bundled_model(), components=["eva", "tokenizer", "highres_decoder"])
        print(json.dumps(probe(model, args.scenes, args.seed), indent=2))
    except (LaVITError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main()
