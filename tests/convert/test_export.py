"""Built components written into an MLX folder load back unchanged (training exports)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

import lavit_mlx
from lavit_mlx.export import save_components


def test_every_component_round_trips(official_checkpoint, official_tiny, tmp_path):
    model = lavit_mlx.load(official_checkpoint, vision_heads=2)
    names = ["eva", "tokenizer", "understanding", "lowres_decoder", "highres_decoder", "llm", "highres_pixel",
             "lowres_pixel"]
    out = tmp_path / "model"
    # written in two goes, as training stages do: the folder accumulates
    save_components(out, model.config, {n: model.component(n) for n in names[:3]})
    save_components(out, model.config, {n: model.component(n) for n in names[3:]},
                    text_tokenizer=official_checkpoint / "language_model")
    again = lavit_mlx.load(out)
    assert again.checkpoint.kind == "mlx" and list(again.checkpoint.verify()) == []
    assert sorted(json.loads((out / "config.json").read_text())["components"]) == sorted(names)
    image = str(official_tiny / "input.png")
    assert np.array_equal(model.tokenize([image])[0].codes, again.tokenize([image])[0].codes)
    ids = mx.array([[1, 319, 2654, 32000, 32005]])
    assert mx.array_equal(model.llm(input_ids=ids), again.llm(input_ids=ids))
    for highres in (True, False):
        a, b = model.pixel_decoder(highres), again.pixel_decoder(highres)
        z = mx.random.normal((1, 4, 8, 8), key=mx.random.key(0))
        assert mx.array_equal(a.vae_decode_raw(z), b.vae_decode_raw(z))
    assert again.config == model.config.replace(quantization=again.config.quantization)
