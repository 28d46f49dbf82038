"""Build the PyTorch mirror from a checkpoint folder in the released layout, strictly.

Same rules as the MLX loader: sizes from tensor shapes; head counts given, or the
release's 16 at the release's width (`lavit_mlx.config.vision_heads_for`), else a
one-line error asking for them; every key required with its shape and only the
release's known extras accepted (`lavit_mlx.layout.check_state`, shared with MLX).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch import nn

from lavit_convert.torch_io import load_pickle
from lavit_mlx.config import EVAConfig, TokenizerConfig, VQDecoderConfig, check_heads
from lavit_mlx.errors import CheckpointError
from lavit_mlx.layout import KNOWN_EXTRAS, RELEASE_FILES, check_state

from .models.eva_vit import EVAVisionTransformer
from .models.visual_tokenizer import DynamicVisualTokenizer
from .models.vq_decoder import VQDecoder


def source_of(root, component: str) -> str:
    return str(Path(root) / RELEASE_FILES[component])


def read_state_dict(root: Path, component: str) -> dict:
    path = Path(root) / RELEASE_FILES[component]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {root} is missing {RELEASE_FILES[component]}")
    state = load_pickle(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def shapes_of(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def infer_config(read: Callable[[dict], object], state: dict, source: str):
    """A config from the tensor shapes; a key it needs that is absent is a one-line error."""
    try:
        return read(shapes_of(state))
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing key {exc}") from None


def load_state_strict(module: nn.Module, state: dict, source: str, component: Optional[str] = None) -> nn.Module:
    """`load_state_dict(strict=True)` after the shared key/shape check: the release's
    known extras of `component` are dropped, anything else wrong is a one-line
    CheckpointError that names the key and `source`. Returns the module in eval mode."""
    expected = module.state_dict()
    known = KNOWN_EXTRAS.get(component) if component else None
    check_state(shapes_of(expected), shapes_of(state), source, known)
    module.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return module.eval()


def load_eva(root, vision_heads: Optional[int] = None) -> EVAVisionTransformer:
    """The EVA-CLIP tower of a release-layout folder (`vision_heads`: see module docstring)."""
    state = read_state_dict(root, "eva")
    source = source_of(root, "eva")
    config = infer_config(lambda shapes: EVAConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "EVA vision transformer", source)
    return load_state_strict(EVAVisionTransformer(config), state, source, "eva")


def load_tokenizer(root, vision_heads: Optional[int] = None, understanding: bool = False,
                   llm_hidden: Optional[int] = None) -> DynamicVisualTokenizer:
    """The discrete tokenizer (`tokenizer_encoder.bin`) or, with `understanding`, the
    selector with `visual_weight.bin`'s merger and projection loaded over it (as the
    official `build_dynamic_tokenizer` does: a selector copy in visual_weight.bin wins)."""
    state = read_state_dict(root, "tokenizer")
    source = source_of(root, "tokenizer")
    config = infer_config(lambda shapes: TokenizerConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "token merger", source)
    if not understanding:
        return load_state_strict(DynamicVisualTokenizer(config, quantizer=True), state, source, "tokenizer")
    overlay = read_state_dict(root, "understanding")
    source = source_of(root, "understanding")
    if "vit_proj.weight" not in overlay:
        raise CheckpointError(f"{source}: missing key 'vit_proj.weight'")
    hidden = llm_hidden or overlay["vit_proj.weight"].shape[0]
    model = DynamicVisualTokenizer(config, quantizer=False, llm_hidden=hidden)
    merged = {k: v for k, v in state.items() if k.startswith("token_predictor.")}
    merged.update(overlay)
    return load_state_strict(model, merged, source, "understanding")


def load_decoder(root, highres: bool = True, vision_heads: Optional[int] = None) -> VQDecoder:
    """The high-res or low-res VQ decoder of a release-layout folder."""
    component = "highres_decoder" if highres else "lowres_decoder"
    state = read_state_dict(root, component)
    source = source_of(root, component)
    config = infer_config(lambda shapes: VQDecoderConfig.from_shapes(shapes, vision_heads), state, source)
    check_heads(config.width, config.num_heads, "VQ decoder", source)
    if config.highres:
        check_heads(config.feature_dim, config.num_heads, "VQ decoder pooling", source)
    return load_state_strict(VQDecoder(config), state, source, component)
