"""The README's pictures of the bundled model (run from the repository root):

    python docs/figures/make_figures.py [--model DIR] [--seed 20000]

- generated.png: prompts and the images the bundled model generates from them;
- kept_tokens.png: scenes with the patches the selector kept outlined (the dropped ones
  tinted by the kept token that absorbs them), and their token counts.

Scenes and prompts come from a seed the training never used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

import lavit_mlx
from lavit_mlx.generation import GenerationSettings, generate_stages, run_stages
from lavit_mlx.pictures import contact_sheet, token_overlay
from lavit_mlx.shapes import caption, render, scenes

HERE = Path(__file__).parent
PROMPTS = [
    "a red circle at the top left and a blue square in the center",
    "a green triangle at the bottom right",
    "a yellow square at the top, a purple circle on the left and an orange triangle at the bottom",
    "a blue circle at the right",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="Default: the bundled model.")
    parser.add_argument("--seed", type=int, default=20_000)
    args = parser.parse_args()
    model = lavit_mlx.load(args.model)

    prompts = PROMPTS + [caption(s) for s in scenes(args.seed, 4)]
    done = run_stages(generate_stages(model, GenerationSettings(seed=args.seed), prompts=prompts))
    images = [Image.fromarray(im) for im in done.images]
    contact_sheet(images, prompts, columns=4).save(HERE / "generated.png")

    world = list(scenes(args.seed + 1, 8))
    overlays = [token_overlay(model, render(s)) for s in world]
    labels = [f"{o.num_tokens} tokens: {caption(s)}" for o, s in zip(overlays, world)]
    contact_sheet([o.image for o in overlays], labels, columns=4).save(HERE / "kept_tokens.png")
    print(f"wrote {HERE / 'generated.png'} and {HERE / 'kept_tokens.png'}")


if __name__ == "__main__":
    main()
