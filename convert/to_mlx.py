"""Released layout (or a `lavit_train` checkpoint, which uses the same layout) -> MLX folder.

The MLX folder format is documented in docs/mlx-format.md. Conversion runs in two
passes: every expected key and shape of every requested component is checked against
the model definitions first (reading shapes only), then tensors are converted one at a
time (cast, optionally quantized) and written in shards of at most 5 GB, so peak memory
stays near one output shard rather than the whole model. Everything is written into a
temporary folder that is renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from lavit_mlx.checkpoint import Checkpoint
from lavit_mlx.config import LaVITConfig, QuantizationConfig
from lavit_mlx.errors import CheckpointError, LaVITError
from lavit_mlx.layout import KNOWN_EXTRAS, MLX_FORMAT, RELEASE_FOLDERS
from lavit_mlx.weights import read_json
from lavit_mlx.loading import build_component

from .torch_io import LazyTensors
from .writer import ShardWriter, copy_files, staged_folder, write_manifest

VISION = ("eva", "tokenizer", "understanding", "lowres_decoder", "highres_decoder")
FOLDERS = ("llm", "highres_pixel", "lowres_pixel")
ALL_COMPONENTS = VISION + FOLDERS
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "generation_config.json")


@dataclass
class ConvertOptions:
    components: Optional[List[str]] = None  # None: every component the source has
    dtype: Optional[str] = None  # None: keep each tensor's stored dtype (as mlx-lm does)
    quantize: Optional[int] = None  # LLM bits (4 or 8)
    group_size: int = 64
    quantize_vision: bool = False  # 8-bit
    quantize_unet: bool = False  # 8-bit
    vision_heads: Optional[int] = None
    force: bool = False

    def check(self) -> None:
        """One-line errors for option values that cannot work (before anything is read)."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LaVITError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.quantize not in (None, 4, 8):
            raise LaVITError(f"--quantize {self.quantize}: expected 4 or 8")
        if self.group_size not in (32, 64, 128):
            raise LaVITError(f"--group-size {self.group_size}: expected 32, 64 or 128")
        if self.vision_heads is not None and self.vision_heads < 1:
            raise LaVITError(f"--vision-heads {self.vision_heads}: expected at least 1")
        unknown = [c for c in self.components or [] if c not in ALL_COMPONENTS]
        if unknown:
            raise LaVITError(f"unknown component {unknown[0]!r}; choose from {', '.join(ALL_COMPONENTS)}")


@dataclass
class ConvertReport:
    """What was written, for the CLI to print."""

    components: List[str] = field(default_factory=list)
    unquantized: Dict[str, List[str]] = field(default_factory=dict)  # layers left in float
    quantized: Dict[str, int] = field(default_factory=dict)  # layers quantized, per component
    bytes_written: int = 0
    dtypes: set = field(default_factory=set)  # floating dtypes written

    @property
    def dtype(self) -> str:
        return ", ".join(sorted(self.dtypes)) or "no floating tensors"


@dataclass
class _Plan:
    """One component to convert: where its tensors come from, how each is mapped."""

    name: str
    module: nn.Module
    sources: list  # LazyTensors or SanitizedTensors
    known_extra: Optional[Callable[[str], bool]] = None
    quant_bits: Optional[int] = None
    group_size: int = 64
    quant_kinds: tuple = (nn.Linear,)
    shard_per_source: bool = False  # one output shard per input shard (bounds peak memory)


class SanitizedTensors:
    """A file's tensors seen through a model's `sanitize` (renames, conv layout), one at a time."""

    def __init__(self, source: LazyTensors, sanitize: Callable[[dict], dict]):
        self.source, self.sanitize, self.path = source, sanitize, source.path
        self._original: Dict[str, str] = {}
        self.shapes: Dict[str, tuple] = {}
        for key, shape in source.shapes.items():
            # mx.zeros is lazy: only the shapes are worked out here
            ((name, value),) = sanitize({key: mx.zeros(shape, mx.int8)}).items()
            self._original[name] = key
            self.shapes[name] = tuple(value.shape)

    def keys(self) -> list:
        return list(self.shapes)

    def get(self, key: str) -> mx.array:
        original = self._original[key]
        return self.sanitize({original: self.source.get(original)})[key]

    def close(self) -> None:
        self.source.close()


def _check_keys(plan: _Plan) -> None:
    """Every parameter present with its shape; no key that belongs nowhere."""
    from mlx.utils import tree_flatten

    expected = {k: tuple(v.shape) for k, v in tree_flatten(plan.module.parameters())}
    found = {}
    for source in plan.sources:
        for key, shape in source.shapes.items():
            found[key] = (shape, source.path)
    where = ", ".join(str(s.path) for s in plan.sources)
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{where}: missing key {key!r}")
        if found[key][0] != shape:
            raise CheckpointError(f"{found[key][1]}: key {key!r} has shape {found[key][0]}, the model expects {shape}")
    for key, (_, path) in found.items():
        if key not in expected and not (plan.known_extra and plan.known_extra(key)):
            raise CheckpointError(f"{path}: unexpected key {key!r} belongs to no known component")


def _quantizable(module: nn.Module, group_size: int, kinds=(nn.Linear,)) -> tuple:
    """(paths quantized, paths left in float) among the module's Linear/Embedding layers."""
    chosen, skipped = [], []
    for path, layer in module.named_modules():
        if isinstance(layer, kinds) and path:
            (chosen if layer.weight.shape[-1] % group_size == 0 else skipped).append(path)
    return chosen, skipped


FLOAT16_MAX = 65504.0


def cast(value: mx.array, dtype: Optional[mx.Dtype], key: str, source) -> mx.array:
    """`value` in `dtype` (None: as stored); a narrowing cast to float16 that would turn
    values into +-inf is refused, naming the tensor."""
    if dtype is None or not mx.issubdtype(value.dtype, mx.floating) or value.dtype == dtype:
        return value
    if dtype == mx.float16 and value.size:
        peak = float(mx.max(mx.abs(value.astype(mx.float32))))
        if peak > FLOAT16_MAX:
            raise CheckpointError(
                f"{source}: tensor {key!r} holds values up to {peak:.4g}, beyond float16's range (+-65504); "
                "convert with --dtype bfloat16 or float32"
            )
    return value.astype(dtype)


def check_quantizable(plan: _Plan) -> None:
    """Refuse a quantization that would quantize nothing (e.g. a group size that divides no width)."""
    if plan.quant_bits:
        chosen, skipped = _quantizable(plan.module, plan.group_size, plan.quant_kinds)
        if not chosen:
            raise LaVITError(
                f"--group-size {plan.group_size} divides the input width of none of the {plan.name} layers "
                f"({len(skipped)} layers): nothing would be quantized; choose a smaller --group-size"
            )


def _write_plan(plan: _Plan, writer: ShardWriter, dtype: Optional[mx.Dtype], report: ConvertReport):
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(plan.module.parameters()))
    group_size = plan.group_size
    quantized = set()
    if plan.quant_bits:
        chosen, skipped = _quantizable(plan.module, group_size, plan.quant_kinds)
        quantized = {f"{p}.weight" for p in chosen}
        report.quantized[plan.name] = len(chosen)
        if skipped:
            report.unquantized[plan.name] = skipped
    # A key present in several sources comes from the last one (visual_weight.bin is
    # loaded over tokenizer_encoder.bin); sources are written in their own order.
    owner = {key: i for i, source in enumerate(plan.sources) for key in source.keys() if key in expected}
    for i, source in enumerate(plan.sources):
        for key in source.keys():
            if owner.get(key) != i:
                continue
            value = cast(source.get(key), dtype, key, source.path)
            if mx.issubdtype(value.dtype, mx.floating):
                report.dtypes.add(str(value.dtype).replace("mlx.core.", ""))
            if key in quantized:
                stem = key[: -len(".weight")]
                wq, scales, biases = mx.quantize(value, group_size=group_size, bits=plan.quant_bits)
                mx.eval(wq, scales, biases)
                writer.add_group({f"{stem}.weight": wq, f"{stem}.scales": scales, f"{stem}.biases": biases})
            else:
                mx.eval(value)
                writer.add(key, value)
        if plan.shard_per_source:
            writer.flush()
            source.close()


def _vision_plan(ckpt: Checkpoint, name: str, config: LaVITConfig, bits: Optional[int]) -> _Plan:
    """The _Plan of a vision component of a release-layout checkpoint (module built from
    the inferred config, as `lavit_mlx.load` builds it)."""
    if name == "understanding":
        sources = [LazyTensors(ckpt.file("tokenizer")), LazyTensors(ckpt.file("understanding"))]
        if "vit_proj.weight" not in sources[1].shapes:
            raise CheckpointError(f"{sources[1].path}: missing key 'vit_proj.weight'")
        module = build_component(name, config, str(sources[1].path))
        tokenizer_keys = set(sources[0].shapes)
        # visual_weight.bin's extras (other tokenizer parts) are known; from the tokenizer
        # file only the selector is used.
        extra = lambda k: k in tokenizer_keys or KNOWN_EXTRAS["understanding"](k)  # noqa: E731
        return _Plan(name, module, sources, known_extra=extra, quant_bits=bits)
    source = LazyTensors(ckpt.file(name))
    module = build_component(name, config, str(source.path))
    if name == "eva":
        source = SanitizedTensors(source, module.sanitize)
    return _Plan(name, module, [source], known_extra=KNOWN_EXTRAS.get(name), quant_bits=bits)


def convert_to_mlx(src, out, options: ConvertOptions = ConvertOptions(),
                   progress: Optional[Callable[[str], None]] = None) -> ConvertReport:
    """Convert a released-layout checkpoint folder to the MLX folder format.

    Args:
        src: a folder in the released layout (or a `lavit_train` checkpoint).
        out: the output folder; must not exist unless `options.force`.
        options: components, dtype, quantization, head count.
        progress: called with a component name as each one starts.

    Returns:
        A `ConvertReport`.
    """
    options.check()
    ckpt = Checkpoint.open(src)
    if ckpt.kind != "release":
        raise LaVITError(f"{src} is already an MLX folder (use --to torch to go back)")
    heads = options.vision_heads  # None: the release's 16 at width 1408, otherwise required
    requested = options.components or [c for c in ALL_COMPONENTS if ckpt.has(c)]
    for component in requested:
        if component in VISION:
            ckpt.file(component)
        else:
            ckpt.folder(component)
    if any(c in requested for c in ("lowres_decoder", "highres_decoder")) or "tokenizer" in requested:
        ckpt.file("tokenizer")  # the codebook is always written
    dtype = DTYPES[options.dtype] if options.dtype else None

    source_config = ckpt.config(heads)
    for component in requested:
        problem = ckpt.problems.get("tokenizer" if component == "understanding" else component)
        if problem:
            raise CheckpointError(problem)
    vision_bits = 8 if options.quantize_vision else None

    # Pass 1: check everything before writing anything.
    plans = []
    for component in (c for c in requested if c in VISION):
        plan = _vision_plan(ckpt, component, source_config, vision_bits)
        _check_keys(plan)
        plans.append(plan)
    llm_plan = _llm_plan(ckpt, options) if "llm" in requested else None
    if llm_plan is not None:
        check_quantizable(llm_plan[0])
    pixel_plans = {c: _pixel_plans(ckpt, c, options.quantize_unet) for c in requested if c in ("highres_pixel", "lowres_pixel")}

    report = ConvertReport(components=list(requested))
    with staged_folder(Path(out), options.force) as staging:
        for plan in plans:
            if progress:
                progress(plan.name)
            writer = ShardWriter(staging, Path(MLX_FORMAT["files"][plan.name]).stem)
            _write_plan(plan, writer, dtype, report)
            writer.close()
        codebook_key = "quantize.embedding.weight"
        codebook = LazyTensors(ckpt.file("tokenizer")).get(codebook_key)
        mx.save_safetensors(str(staging / MLX_FORMAT["files"]["codebook"]), {codebook_key: codebook.astype(mx.float32)})
        if llm_plan is not None:
            if progress:
                progress("llm")
            _write_llm(llm_plan, staging / RELEASE_FOLDERS["llm"], dtype, options, report)
        for component, parts in pixel_plans.items():
            if progress:
                progress(component)
            _write_pixel(ckpt, component, parts, staging / RELEASE_FOLDERS[component], dtype, report)
        config = _written_config(source_config, requested, options, llm_plan is not None, bool(pixel_plans))
        top = {
            "format": MLX_FORMAT["name"],
            "format_version": MLX_FORMAT["version"],
            **config.to_dict(),
            "dtype": report.dtype if options.dtype is None else options.dtype,
            "components": list(requested),
            "unquantized_layers": report.unquantized,
            "quantized_layers": report.quantized,
            "source": str(ckpt.path),
        }
        (staging / "config.json").write_text(json.dumps(top, indent=2))
        write_manifest(staging, MLX_FORMAT["manifest"])
        report.bytes_written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    return report


def _written_config(source: LaVITConfig, requested, options: ConvertOptions, llm: bool, pixel: bool) -> LaVITConfig:
    """The source's config with only the converted components, and how they are stored."""
    config = LaVITConfig(token_ids=source.token_ids)
    for name in requested:
        field_name = {"eva": "vision", "understanding": "tokenizer"}.get(name, name)
        setattr(config, field_name, getattr(source, field_name))
    if "understanding" in requested:
        config.understanding_dim = source.understanding_dim
    if "tokenizer" not in requested and "understanding" not in requested and source.tokenizer is not None:
        config.tokenizer = None
    config.quantization = QuantizationConfig(
        llm={"bits": options.quantize, "group_size": options.group_size} if options.quantize and llm else None,
        vision={"bits": 8, "group_size": 64} if options.quantize_vision else None,
        unet={"bits": 8, "group_size": 64} if options.quantize_unet and pixel else None,
    )
    return config


def _llm_plan(ckpt: Checkpoint, options: ConvertOptions) -> tuple:
    """(_Plan, config) for the LLaMA of `language_model/`, checked against mlx-lm's model."""
    from mlx_lm.models import llama

    folder = ckpt.folder("llm")
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("tie_word_embeddings", False)  # transformers' LLaMA default
    model = llama.Model(llama.ModelArgs.from_dict(config))
    files = []
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            break
    if not files:
        files = [n for n in ("pytorch_model.bin", "model.safetensors") if (folder / n).is_file()]
    if not files:
        raise CheckpointError(f"{folder}: no LLaMA weights (pytorch_model*.bin or model*.safetensors)")
    sources = [LazyTensors(folder / name) for name in files]
    plan = _Plan("llm", model, sources, known_extra=KNOWN_EXTRAS["llm"], quant_bits=options.quantize,
                 group_size=options.group_size, quant_kinds=(nn.Linear, nn.Embedding), shard_per_source=True)
    _check_keys(plan)
    return plan, config


def _write_llm(llm: tuple, folder: Path, dtype: mx.Dtype, options: ConvertOptions, report: ConvertReport):
    """An mlx-lm model folder: `mlx_lm.load(folder)` loads it."""
    plan, config = llm
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "model")
    _write_plan(plan, writer, dtype, report)
    writer.close()
    config = dict(config)
    if options.dtype:
        config["torch_dtype"] = options.dtype  # otherwise the source's own, as it was
    if options.quantize:
        config["quantization"] = {"group_size": options.group_size, "bits": options.quantize}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    source = plan.sources[0].path.parent
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _pixel_plans(ckpt: Checkpoint, component: str, quantize: bool) -> dict:
    """{"unet": _Plan, "vae": _Plan} of a diffusers pixel-decoding folder, checked."""
    from lavit_mlx.models.unet import UNet2DConditionModel, UNetConfig
    from lavit_mlx.models.vae import AutoencoderKL, VAEConfig

    folder = ckpt.folder(component)
    plans = {}
    for sub, (config_cls, model_cls) in {"unet": (UNetConfig, UNet2DConditionModel),
                                         "vae": (VAEConfig, AutoencoderKL)}.items():
        config_path = folder / sub / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder / sub}: no config.json")
        model = model_cls(config_cls.from_dict(json.loads(config_path.read_text())))
        weights = [folder / sub / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin")]
        found = [w for w in weights if w.is_file()]
        if not found:
            raise CheckpointError(f"{folder / sub}: no diffusion_pytorch_model.safetensors or .bin")
        source = SanitizedTensors(LazyTensors(found[0]), lambda weights, model=model: model.sanitize(weights, "torch"))
        plan = _Plan(f"{component}/{sub}", model, [source], quant_bits=8 if quantize and sub == "unet" else None)
        _check_keys(plan)
        plans[sub] = plan
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise CheckpointError(f"{folder}: no scheduler/scheduler_config.json")
    if component == "lowres_pixel" and not (folder / "uncond_embeddings.bin").is_file():
        raise CheckpointError(f"{folder}: no uncond_embeddings.bin")
    return plans


def _write_pixel(ckpt: Checkpoint, component: str, plans: dict, folder: Path, dtype: mx.Dtype,
                 report: ConvertReport):
    source = ckpt.folder(component)
    for sub, plan in plans.items():
        (folder / sub).mkdir(parents=True)
        shutil.copyfile(source / sub / "config.json", folder / sub / "config.json")
        writer = ShardWriter(folder / sub, MLX_FORMAT["pixel_weights"])
        _write_plan(plan, writer, dtype, report)
        writer.close()
    copy_files(source / "scheduler", folder / "scheduler")
    if component == "lowres_pixel":
        uncond = LazyTensors(source / "uncond_embeddings.bin").get("")
        mx.save_safetensors(str(folder / "uncond_embeddings.safetensors"), {"uncond_embeddings": uncond})
