"""Build the PyTorch mirror from a checkpoint folder in the released layout, strictly.

Same rules as the MLX loader: sizes from tensor shapes, head counts given (16 in the
release), every key required with its shape, only the release's known extras accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from lavit_convert.torch_io import load_pickle
from lavit_mlx.config import EVAConfig, TokenizerConfig
from lavit_mlx.errors import CheckpointError
from lavit_mlx.layout import KNOWN_EXTRAS, RELEASE_FILES

from .models.eva_vit import EVAVisionTransformer
from .models.visual_tokenizer import DynamicVisualTokenizer


def read_state_dict(root: Path, component: str) -> dict:
    path = Path(root) / RELEASE_FILES[component]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {root} is missing {RELEASE_FILES[component]}")
    state = load_pickle(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def load_state_strict(module: nn.Module, state: dict, source: str, component: Optional[str] = None) -> nn.Module:
    """`load_state_dict(strict=True)` with the release's known extras dropped and
    one-line errors that name the key and the file."""
    expected = module.state_dict()
    known = KNOWN_EXTRAS.get(component) if component else None
    extra = [k for k in state if k not in expected and not (known and known(k))]
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects {tuple(value.shape)}"
            )
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} belongs to no known component")
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return module


def shapes_of(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_eva(root, vision_heads: Optional[int] = None) -> EVAVisionTransformer:
    state = read_state_dict(root, "eva")
    model = EVAVisionTransformer(EVAConfig.from_shapes(shapes_of(state), vision_heads))
    return load_state_strict(model, state, str(Path(root) / RELEASE_FILES["eva"]), "eva").eval()


def load_tokenizer(root, vision_heads: Optional[int] = None, understanding: bool = False,
                   llm_hidden: Optional[int] = None) -> DynamicVisualTokenizer:
    """The discrete tokenizer (`tokenizer_encoder.bin`) or, with `understanding`, the
    selector with `visual_weight.bin`'s merger and projection loaded over it."""
    state = read_state_dict(root, "tokenizer")
    config = TokenizerConfig.from_shapes(shapes_of(state), vision_heads)
    source = str(Path(root) / RELEASE_FILES["tokenizer"])
    if not understanding:
        model = DynamicVisualTokenizer(config, quantizer=True)
        return load_state_strict(model, state, source, "tokenizer").eval()
    overlay = read_state_dict(root, "understanding")
    if "vit_proj.weight" not in overlay:
        raise CheckpointError(f"{Path(root) / RELEASE_FILES['understanding']}: missing key 'vit_proj.weight'")
    hidden = llm_hidden or overlay["vit_proj.weight"].shape[0]
    model = DynamicVisualTokenizer(config, quantizer=False, llm_hidden=hidden)
    merged = {k: v for k, v in state.items() if k.startswith("token_predictor.")}
    merged.update(overlay)
    return load_state_strict(model, merged, str(Path(root) / RELEASE_FILES["understanding"]), "understanding").eval()


def load_decoder(root, highres: bool = True, vision_heads: Optional[int] = None):
    """The high-res or low-res VQ decoder of a release-layout folder."""
    from lavit_mlx.config import VQDecoderConfig

    from .models.vq_decoder import VQDecoder

    component = "highres_decoder" if highres else "lowres_decoder"
    state = read_state_dict(root, component)
    model = VQDecoder(VQDecoderConfig.from_shapes(shapes_of(state), vision_heads))
    return load_state_strict(model, state, str(Path(root) / RELEASE_FILES[component]), component).eval()
