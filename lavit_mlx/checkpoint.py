"""Where each component's weights live in a checkpoint folder, in either supported format.

1. The released layout (rain1011/LaVIT-7B-v2, LAVIT_REFERENCE.md section 2):

    language_model/            LLaMA shards, index, config.json, tokenizer.model
    language_model/visual_weight.bin           merger + vit_proj for understanding
    visual_tokenizer/eva_vitg_psz14.bin        EVA-CLIP ViT-g/14
    visual_tokenizer/tokenizer_encoder.bin     selector, merger, quantizer
    visual_tokenizer/tokenizer_decoder.bin     low-res VQ decoder
    visual_tokenizer/highres_tokenizer_decoder.bin  high-res VQ decoder
    highres_pixel_decoding/{unet,vae,scheduler}/    SDXL-shaped diffusers folders
    pixel_decoding/{unet,vae,scheduler}/, pixel_decoding/uncond_embeddings.bin

2. The MLX folder format written by `lavit convert` (docs/mlx-format.md): a top-level
   `config.json` with `"format": "lavit-mlx"`, one safetensors file (or shards) per
   component in MLX layout, an mlx-lm `language_model/`, and a checksummed manifest.

This module only names files, reads them and describes them (`config()`: the nested
`LaVITConfig`, stored in an MLX folder, inferred once from tensor shapes for the
released layout); building modules is `loading.py`'s job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

from .config import EVAConfig, LaVITConfig, LLMConfig, PixelConfig, TokenIds, TokenizerConfig, VQDecoderConfig
from .errors import CheckpointError
from .layout import KNOWN_EXTRAS, MLX_FORMAT, PURPOSE, RELEASE_FILES, RELEASE_FOLDERS
from .weights import Weights, read_json, read_sharded, read_weights


def sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Checkpoint:
    """A LaVIT checkpoint folder. `Checkpoint.open(path)` returns the right kind."""

    kind = "release"
    # Weights are stored in PyTorch layout (convs OIHW) and need `sanitize`.
    torch_layout = True

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stored: dict = {}  # an MLX folder's config.json
        self.problems: dict = {}  # component -> why its config could not be inferred

    def config(self, vision_heads: Optional[int] = None) -> LaVITConfig:
        """The nested config, inferred from tensor shapes and the folders' own configs.

        Head counts cannot be read from shapes: `vision_heads`, or the release's 16 at the
        release's width, or unknown (building that component then asks for it).
        """
        config = LaVITConfig()

        def infer(name, read):
            # a file that cannot describe its component (e.g. a tokenizer file holding only
            # the codebook) is reported when that component is built, not before
            try:
                return read(self.shapes(name))
            except KeyError as exc:
                self.problems[name] = f"{self.file(name)}: missing key {exc}"
                return None

        if self.has("eva"):
            config.vision = infer("eva", lambda shapes: EVAConfig.from_shapes(_from_torch_layout(shapes), vision_heads))
        if self.has("tokenizer"):
            config.tokenizer = infer("tokenizer", lambda shapes: TokenizerConfig.from_shapes(shapes, vision_heads))
        if self.has("understanding"):
            config.understanding_dim = infer("understanding", lambda shapes: shapes["vit_proj.weight"][0])
        for name in ("lowres_decoder", "highres_decoder"):
            if self.has(name):
                setattr(config, name, infer(name, lambda shapes: VQDecoderConfig.from_shapes(shapes, vision_heads)))
        if self.has("llm") and (self.folder("llm") / "config.json").is_file():
            config.llm = LLMConfig.from_hf(read_json(self.folder("llm") / "config.json"),
                                           str(self.folder("llm") / "config.json"))
        for name in ("highres_pixel", "lowres_pixel"):
            if self.has(name):
                setattr(config, name, self.pixel_config(name))
        codebook = config.tokenizer.codebook_size if config.tokenizer else TokenIds.codebook_size
        if config.tokenizer is None and self.has("tokenizer"):
            codebook = self.shapes("tokenizer").get("quantize.embedding.weight", (codebook,))[0]
        if config.llm is not None:
            try:
                config.token_ids = TokenIds.for_vocab(config.llm.vocab_size, codebook)
            except ValueError as exc:
                raise CheckpointError(f"{self.folder('llm') / 'config.json'}: {exc}") from None
        else:
            config.token_ids = TokenIds(codebook_size=codebook)
        return config

    def pixel_config(self, component: str) -> PixelConfig:
        folder = self.folder(component)
        parts = {}
        for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
            path = folder / sub / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {path.relative_to(self.path)}")
            parts[sub] = read_json(path)
        return PixelConfig(**parts)

    @staticmethod
    def open(path) -> "Checkpoint":
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (expected a LaVIT checkpoint folder)")
        if MLXCheckpoint.is_mlx_folder(path):
            return MLXCheckpoint(path)
        known = [p for p in list(RELEASE_FILES.values()) + list(RELEASE_FOLDERS.values()) if (path / p).exists()]
        if not known:
            raise CheckpointError(
                f"{path}: not a LaVIT checkpoint folder (found neither the released layout's "
                "visual_tokenizer/ and language_model/ nor an MLX folder's config.json)"
            )
        return Checkpoint(path)

    def describe(self) -> str:
        return f"released LaVIT layout (PyTorch pickles) at {self.path}"

    def relative(self, component: str) -> str:
        return RELEASE_FILES[component]

    def file(self, component: str) -> Path:
        path = self.path / self.relative(component)
        if not path.is_file() and not Path(str(path) + ".index.json").is_file():
            raise CheckpointError(
                f"checkpoint {self.path} is missing {self.relative(component)} "
                f"(needed for {PURPOSE[component]})"
            )
        return path

    def folder(self, component: str) -> Path:
        path = self.path / RELEASE_FOLDERS[component]
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {self.path} is missing {RELEASE_FOLDERS[component]}/ "
                f"(needed for {PURPOSE[component]})"
            )
        return path

    def has(self, component: str) -> bool:
        if component in RELEASE_FILES:
            path = self.path / self.relative(component)
            return path.is_file() or Path(str(path) + ".index.json").is_file()
        return (self.path / RELEASE_FOLDERS[component]).is_dir()

    def weights(self, component: str, keys: Optional[set] = None) -> Weights:
        return read_weights(self.file(component), keys=keys)

    def known_extra(self, component: str) -> Optional[Callable[[str], bool]]:
        return KNOWN_EXTRAS.get(component)

    def shapes(self, component: str) -> dict:
        """{key: shape} of a component's tensors, without reading the tensors."""
        from .torch_pickle import LazyTensors

        source = LazyTensors(self.file(component))
        try:
            return dict(source.shapes)
        finally:
            source.close()

    def understanding_weights(self) -> Weights:
        """The understanding path's weights: the tokenizer's selector with
        `visual_weight.bin` loaded over it, as the official `build_dynamic_tokenizer` does
        (strict=False there: a selector copy in visual_weight.bin wins)."""
        source = self.file("understanding")
        overlay = self.weights("understanding")
        base = self.weights("tokenizer")
        weights = {k: v for k, v in base.items() if k.startswith("token_predictor.")}
        known = self.known_extra("understanding")
        for key, value in overlay.items():
            if key.startswith(("causal_encoder.", "vit_proj.")):
                weights[key] = value
                continue
            if not known(key):
                raise CheckpointError(f"{source}: unexpected key {key!r} belongs to no known component")
            if key in weights:
                if tuple(value.shape) != tuple(weights[key].shape):
                    raise CheckpointError(
                        f"{source}: key {key!r} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(weights[key].shape)}"
                    )
                weights[key] = value
        for required in ("vit_proj.weight", "causal_encoder.norm.weight"):
            if required not in weights:
                raise CheckpointError(f"{source}: missing key {required!r}")
        return weights

    def quantization(self, component: str) -> Optional[dict]:
        """{"bits", "group_size"} when the component is stored quantized."""
        return None


class MLXCheckpoint(Checkpoint):
    """A folder in the MLX format of `lavit convert` (see docs/mlx-format.md)."""

    kind = "mlx"
    torch_layout = False

    def __init__(self, path: Path):
        super().__init__(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: the MLX folder has no config.json (convert the checkpoint again)")
        try:
            self.stored = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: unreadable ({exc})") from None
        version = self.stored.get("format_version")
        if version not in MLX_FORMAT["readable_versions"]:
            raise CheckpointError(
                f"{config_path}: MLX folder format version {version!r}; this lavit-mlx reads versions "
                f"{', '.join(map(str, MLX_FORMAT['readable_versions']))} (convert the checkpoint again)"
            )

    def config(self, vision_heads: Optional[int] = None) -> LaVITConfig:
        """The stored config (format 1 folders are mapped onto the nested config)."""
        stored = self.stored
        if stored.get("format_version") == 1:
            stored = _config_from_version_1(self)
        config = LaVITConfig.from_dict(stored)
        return config

    @staticmethod
    def is_mlx_folder(path: Path) -> bool:
        """A top-level config.json (the released layout has none) or the MLX manifest.

        A config.json that cannot be read is reported as such, not as a broken released
        layout.
        """
        path = Path(path)
        config = path / "config.json"
        if not config.is_file():
            return (path / MLX_FORMAT["manifest"]).is_file()
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config}: the MLX folder's config is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != MLX_FORMAT["name"]:
            if (path / MLX_FORMAT["manifest"]).is_file() or not any((path / d).exists() for d in RELEASE_FOLDERS.values()):
                raise CheckpointError(f"{config}: not a lavit-mlx config (no \"format\": \"{MLX_FORMAT['name']}\")")
            return False
        return True

    def describe(self) -> str:
        counts = self.stored.get("quantized_layers") or {}
        quantized = []
        for name, q in (self.stored.get("quantization") or {}).items():
            if not q:
                continue
            members = [c for c, group in MLX_FORMAT["quantization_group"].items() if group == name]
            layers = sum(n for c, n in counts.items() if c.split("/")[0] in members)
            quantized.append(f"{name} {q['bits']}-bit ({layers} layers)" if counts else f"{name} {q['bits']}-bit")
        extra = f", quantized: {', '.join(quantized)}" if quantized else ""
        return f"MLX folder ({self.stored.get('dtype', 'float32')}{extra}) at {self.path}"

    def relative(self, component: str) -> str:
        return MLX_FORMAT["files"][component]

    def weights(self, component: str, keys: Optional[set] = None) -> Weights:
        return read_sharded(self.file(component), keys=keys)

    def known_extra(self, component: str) -> Optional[Callable[[str], bool]]:
        return None  # written by lavit convert: exactly the model's keys

    def shapes(self, component: str) -> dict:
        return {k: tuple(v.shape) for k, v in self.weights(component).items()}

    def understanding_weights(self) -> Weights:
        return self.weights("understanding")  # stored merged by lavit convert

    def verify(self) -> Iterator[Tuple[str, str]]:
        """(file, problem) for every file missing or changed since conversion."""
        manifest_path = self.path / MLX_FORMAT["manifest"]
        if not manifest_path.is_file():
            yield MLX_FORMAT["manifest"], "missing"
            return
        manifest = json.loads(manifest_path.read_text())
        for relative, entry in manifest["files"].items():
            path = self.path / relative
            if not path.is_file():
                yield relative, "missing"
            elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
                yield relative, "checksum mismatch"

    def quantization(self, component: str) -> Optional[dict]:
        return (self.stored.get("quantization") or {}).get(MLX_FORMAT["quantization_group"].get(component, component))

    def pixel_config(self, component: str) -> PixelConfig:
        return self.config().component(component)


def _from_torch_layout(shapes: dict) -> dict:
    """EVA's patch-embedding shape in the torch layout (O, I, kh, kw) from either layout."""
    key = "patch_embed.proj.weight"
    shape = shapes.get(key)
    if shape is not None and len(shape) == 4 and shape[3] == 3 and shape[1] != 3:
        shapes = dict(shapes)
        shapes[key] = (shape[0], shape[3], shape[1], shape[2])
    return shapes


def _config_from_version_1(checkpoint: "MLXCheckpoint") -> dict:
    """A format-1 config.json (flat: eva, llm dict, llm_hidden, {unet, vae} per decoder)
    in the nested format-2 shape."""
    old = checkpoint.stored
    out = {k: old[k] for k in ("tokenizer", "lowres_decoder", "highres_decoder", "token_ids", "quantization")
           if old.get(k) is not None}
    if old.get("eva") is not None:
        out["vision"] = old["eva"]
    if old.get("llm") is not None:
        out["llm"] = LLMConfig.from_hf(old["llm"]).to_dict()
    if old.get("llm_hidden") is not None and checkpoint.has("understanding"):
        out["understanding_dim"] = old["llm_hidden"]
    for name in ("highres_pixel", "lowres_pixel"):
        if old.get(name) is not None:
            scheduler = checkpoint.folder(name) / "scheduler" / "scheduler_config.json"
            out[name] = {**old[name], "scheduler": read_json(scheduler)}
    return out
