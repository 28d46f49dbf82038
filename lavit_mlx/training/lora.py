"""LoRA, DoRA and QLoRA for LaVIT's LLM, on mlx-lm's tuner; adapters that mlx-lm reads.

The low-rank layers are mlx-lm's (`mlx_lm.tuner.utils.linear_to_lora_layers`,
`LoRALinear`, `DoRALinear`, their `fuse`); on a quantized model (`QuantizedLinear`) the
same call gives QLoRA. An adapter folder is mlx-lm's:

    adapters.safetensors     lora_a / lora_b (and DoRA's m), keys of the mlx-lm Model
    adapter_config.json      mlx-lm's schema: fine_tune_type, num_layers, lora_parameters
                             {rank, scale, dropout[, keys]}; plus a "lavit" entry (below)

so `mlx_lm.load(MODEL/language_model, adapter_path=DIR)` loads its text side, plus the
pieces only LaVIT has:

    visual_rows.safetensors  the trained rows of [IMG], [/IMG] and the visual ids
    understanding.safetensors  the understanding merger + vit_proj, when tuned

New visual-id rows are trained in full rank (`VisualRows*`), not with mlx-lm's
`LoRAEmbedding`: a rank-r LoRA of the embedding confines all 2 + codebook rows to one r-dim
subspace around their initial value (a low-rank factor `lora_a[id] @ lora_b` per id), so the
visual codes cannot become distinct words; their gradients are dense per row anyway, and a
full row delta costs (2 + codebook) x hidden parameters per matrix, independent of the rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import LLMConfig, TokenIds
from ..errors import LaVITError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
ROWS_WEIGHTS = "visual_rows.safetensors"
UNDERSTANDING_WEIGHTS = "understanding.safetensors"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


@dataclass
class LoRASection:
    """`model.lora` of the llm stage (and `lavit finetune`'s options)."""

    rank: int = 0  # 0: train the whole LLM (no adapters)
    layers: int = -1  # adapters in the last N transformer blocks (-1: every block)
    scale: float = 20.0  # mlx-lm's: the update is scale * (x @ lora_a) @ lora_b
    dropout: float = 0.0
    dora: bool = False
    keys: Optional[List[str]] = None  # module paths inside a block (default: every linear)
    visual_rows: bool = True  # train the [IMG], [/IMG] and visual-id rows in full (see module docstring)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self) -> None:
        if self.rank < 0:
            raise LaVITError(f"model.lora.rank {self.rank}: expected 0 (full training) or more")
        if self.layers == 0 or self.layers < -1:
            raise LaVITError(f"model.lora.layers {self.layers}: expected -1 (every block) or at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise LaVITError(f"model.lora.dropout {self.dropout}: expected 0 <= dropout < 1")
        if self.dora and not self.enabled:
            raise LaVITError("model.lora.dora needs model.lora.rank of at least 1")

    def num_layers(self, depth: int) -> int:
        if self.layers > depth:
            raise LaVITError(f"model.lora.layers {self.layers}: the LLM has only {depth} blocks")
        return depth if self.layers == -1 else self.layers

    def mlx_lm_config(self, depth: int) -> dict:
        """mlx-lm's adapter_config.json entries (what `load_adapters` reads)."""
        parameters = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys:
            parameters["keys"] = list(self.keys)
        return {"fine_tune_type": "dora" if self.dora else "lora", "num_layers": self.num_layers(depth),
                "lora_parameters": parameters}


# ----------------------------------------------------------------------------- visual rows
def _dequantized(layer) -> mx.array:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size,
                             bits=layer.bits, mode=layer.mode)
    return layer.weight


class VisualRowsEmbedding(nn.Module):
    """An embedding (maybe quantized, frozen) whose rows from `first` on get a trainable delta."""

    def __init__(self, embedding: nn.Module, first: int):
        super().__init__()
        self.embedding = embedding
        self.first = first
        vocab = embedding.weight.shape[0]
        dims = _dequantized(embedding).shape[1]
        self.rows = mx.zeros((vocab - first, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        base = self.embedding(ids)
        offset = ids - self.first
        delta = self.rows[mx.clip(offset, 0, self.rows.shape[0] - 1)]
        return base + mx.where((offset >= 0)[..., None], delta, 0.0).astype(base.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        logits = self.embedding.as_linear(x)
        extra = (x @ self.rows.T.astype(x.dtype)).astype(logits.dtype)
        return mx.concatenate([logits[..., : self.first], logits[..., self.first:] + extra], axis=-1)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.embedding
        weight = _dequantized(base)
        weight = mx.concatenate([weight[: self.first], weight[self.first:] + self.rows.astype(weight.dtype)])
        fused = nn.Embedding(*weight.shape)
        fused.weight = weight
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(fused, base.group_size, base.bits, mode=base.mode)
        return fused


class VisualRowsHead(nn.Module):
    """The LM head (maybe quantized, frozen) whose output rows from `first` on get a trainable delta."""

    def __init__(self, linear: nn.Module, first: int):
        super().__init__()
        self.linear = linear
        self.first = first
        vocab, dims = _dequantized(linear).shape
        self.rows = mx.zeros((vocab - first, dims))

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.linear(x)
        extra = (x @ self.rows.T.astype(x.dtype)).astype(logits.dtype)
        return mx.concatenate([logits[..., : self.first], logits[..., self.first:] + extra], axis=-1)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        base = self.linear
        weight = _dequantized(base)
        weight = mx.concatenate([weight[: self.first], weight[self.first:] + self.rows.astype(weight.dtype)])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        fused.weight = weight
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused


def add_visual_rows(llama: nn.Module, token_ids: TokenIds) -> None:
    """Wrap the mlx-lm LLaMA's embedding and head so the rows from `[IMG]` on train in full."""
    first = token_ids.image_start
    inner = llama.model
    if not isinstance(inner.embed_tokens, VisualRowsEmbedding):
        inner.embed_tokens = VisualRowsEmbedding(inner.embed_tokens, first)
    if "lm_head" in llama and not isinstance(llama.lm_head, VisualRowsHead):
        llama.lm_head = VisualRowsHead(llama.lm_head, first)


def visual_row_weights(llama: nn.Module) -> Dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(llama.parameters()) if k.endswith(".rows")}


# ----------------------------------------------------------------------------- apply, save, load, fuse
def apply_lora(llama: nn.Module, lora: LoRASection, token_ids: TokenIds) -> None:
    """Freeze the mlx-lm LLaMA and add trainable adapters (and visual rows) as `lora` says."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    llama.freeze()
    config = lora.mlx_lm_config(len(llama.layers))
    linear_to_lora_layers(llama, config["num_layers"], config["lora_parameters"], use_dora=lora.dora)
    if lora.visual_rows:
        add_visual_rows(llama, token_ids)


def adapter_weights(llama: nn.Module) -> Dict[str, mx.array]:
    """The low-rank factors, keyed as mlx-lm's `load_adapters` expects."""
    return {k: v for k, v in tree_flatten(llama.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def save_adapter(folder, llama: nn.Module, lora: LoRASection, lavit: dict,
                 understanding: Optional[nn.Module] = None) -> Path:
    """Write an adapter folder (see the module docstring); `lavit` is stored under "lavit"."""
    from ..export import _atomic_safetensors, atomic_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_safetensors(folder / ADAPTER_WEIGHTS, adapter_weights(llama))
    rows = visual_row_weights(llama)
    if rows:
        _atomic_safetensors(folder / ROWS_WEIGHTS, rows)
    else:
        (folder / ROWS_WEIGHTS).unlink(missing_ok=True)
    if understanding is not None:
        _atomic_safetensors(folder / UNDERSTANDING_WEIGHTS, dict(tree_flatten(understanding.parameters())))
    else:
        (folder / UNDERSTANDING_WEIGHTS).unlink(missing_ok=True)
    config = {**lora.mlx_lm_config(len(llama.layers)),
              "lavit": {**lavit, "visual_rows": bool(rows), "understanding": understanding is not None}}
    atomic_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder, token_ids: Optional[TokenIds] = None) -> dict:
    """The adapter folder's config, checked against the model's token ids (one-line errors)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise LaVITError(f"--adapter {folder}: no such folder")
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise LaVITError(f"--adapter {folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LaVITError(f"{path}: unreadable ({exc})") from None
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora") or "lora_parameters" not in config or "num_layers" not in config:
        raise LaVITError(f"{path}: expected a LoRA or DoRA adapter (fine_tune_type, num_layers, lora_parameters)")
    stored = (config.get("lavit") or {}).get("token_ids")
    if token_ids is not None and stored is not None and TokenIds.from_dict(stored) != token_ids:
        raise LaVITError(f"{path}: trained for a vocabulary of {TokenIds.from_dict(stored).vocab_size} ids, "
                         f"the model has {token_ids.vocab_size}")
    return config


def load_llm_adapter(lm, folder) -> None:
    """Apply an adapter folder to a `LanguageModel` in place (mlx-lm's `load_adapters`, then the rows)."""
    from mlx_lm.tuner.utils import load_adapters

    folder = Path(folder)
    config = read_adapter_config(folder, lm.token_ids)
    try:
        load_adapters(lm.model, str(folder))
    except (ValueError, KeyError) as exc:
        raise LaVITError(f"--adapter {folder}: does not fit this model ({str(exc).splitlines()[0]})") from None
    if (folder / ROWS_WEIGHTS).is_file() and config.get("lavit", {}).get("visual_rows", True):
        add_visual_rows(lm.model, lm.token_ids)
        rows = mx.load(str(folder / ROWS_WEIGHTS))
        expected = {k: v.shape for k, v in visual_row_weights(lm.model).items()}
        if {k: v.shape for k, v in rows.items()} != expected:
            raise LaVITError(f"{folder / ROWS_WEIGHTS}: visual rows do not fit this model's vocabulary")
        lm.model.load_weights(list(rows.items()), strict=False)
    mx.eval(lm.model.parameters())
    lm.model.eval()


def load_understanding_adapter(module: nn.Module, folder) -> None:
    """Load a tuned understanding merger + vit_proj over the model's (strict: every key, every shape)."""
    from ..weights import load_strict

    path = Path(folder) / UNDERSTANDING_WEIGHTS
    if path.is_file():
        load_strict(module, dict(mx.load(str(path))), str(path))


def fuse_llm(llama: nn.Module, dequantize: bool = False) -> None:
    """Fold every adapter (LoRA, DoRA, visual rows) into its base layer, in place (mlx-lm's `fuse`)."""
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in llama.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        llama.update_modules(tree_unflatten(fused))


def trainable_count(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.trainable_parameters()))


# ----------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Bytes of a LoRA/QLoRA fine-tuning run of the LLM, from its config alone."""

    weights: int  # the frozen base (quantized linears, embedding and head; norms)
    adapters: int  # LoRA factors + visual rows: parameters, gradients, AdamW's two moments
    activations: int  # what the backward pass keeps for one micro-batch
    logits: int  # float32 logits, their softmax and its gradient
    kv_cache: int  # inference afterwards: keys and values of the guided batch (2 rows)
    trainable: int = 0  # trainable parameters
    details: dict = field(default_factory=dict)

    @property
    def training(self) -> int:
        return self.weights + self.adapters + self.activations + self.logits

    def row(self) -> dict:
        gib = 2**30
        return {"weights": self.weights / gib, "adapters+AdamW": self.adapters / gib,
                "activations": self.activations / gib, "logits": self.logits / gib,
                "training total": self.training / gib, "KV (inference)": self.kv_cache / gib}


def qlora_memory(llm: LLMConfig, bits: Optional[int] = 4, group_size: int = 64, rank: int = 8,
                 layers: int = -1, batch: int = 1, sequence: int = 512, activation_bytes: int = 2,
                 visual_rows: int = 0, generated: int = 256, float_bytes: int = 2) -> MemoryEstimate:
    """Memory of LoRA fine-tuning the LLM described by `llm` (no weights needed).

    Args:
        llm: the LLaMA config (the release's: `LLMConfig()` defaults).
        bits: 4 or 8 for QLoRA (every linear, the embedding and the head quantized, as
            `--quantize` does), None for an unquantized base (`float_bytes` a weight).
        group_size: quantization group (a scale and a bias per group).
        rank, layers: LoRA rank, and blocks with adapters (-1: all), on the 7 linears of a block.
        batch, sequence: the micro-batch.
        activation_bytes: 2 for float16 compute (Apple GPU), 4 for float32 (this CPU path).
        visual_rows: rows trained in full (2 + codebook for a freshly grown vocabulary; 0 when
            the LaVIT checkpoint's rows are kept).
        generated: image tokens decoded afterwards (for the KV cache; guidance doubles the batch).
        float_bytes: bytes of the base's floating tensors, i.e. of the dtype it is loaded in (2:
            float16 or bfloat16, as the release is stored; 4: float32): the whole base when it is
            not quantized, otherwise the quantization's scales and biases (`mx.quantize` gives
            them the weight's dtype) and the norms.
    """
    h, inter, depth, vocab = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers, llm.vocab_size
    heads = llm.num_attention_heads
    kv_heads = llm.num_key_value_heads or heads
    head_dim = h // heads
    kv_width = kv_heads * head_dim
    # per block: q, o (h x h), k, v (h x kv), gate, up (h x inter), down (inter x h)
    linear_shapes = [(h, h), (h, kv_width), (h, kv_width), (h, h), (h, inter), (h, inter), (inter, h)]
    block_params = sum(a * b for a, b in linear_shapes)
    matrices = depth * block_params + 2 * vocab * h  # + embedding and untied head
    # packed bits + a scale and a bias per group, in the base's dtype
    per_weight = (bits + 2 * 8 * float_bytes / group_size) / 8 if bits else float_bytes
    weights = int(matrices * per_weight + (2 * depth + 1) * h * float_bytes)  # + the RMSNorm weights
    adapted = depth if layers == -1 else min(layers, depth)
    lora_params = adapted * sum(rank * (a + b) for a, b in linear_shapes)
    row_params = 2 * visual_rows * h
    trainable = lora_params + row_params
    adapters = trainable * 4 * 4  # float32 parameter, gradient, AdamW m and v
    tokens = batch * sequence
    # per token and block: norm inputs (2h), q k v (h + 2 kv), attention output and o_proj
    # input (2h), residual (h), gate, up, their product (3 inter), down input (inter);
    # plus the attention probabilities (heads x sequence per token)
    per_token = 6 * h + 2 * kv_width + 4 * inter + heads * sequence
    activations = int(depth * tokens * per_token * activation_bytes + tokens * h * activation_bytes)
    logits = 3 * tokens * vocab * 4
    kv_cache = 2 * depth * 2 * kv_width * (sequence + generated) * activation_bytes
    return MemoryEstimate(weights, adapters, activations, logits, kv_cache, trainable,
                          {"lora_parameters": lora_params, "visual_row_parameters": row_params})


def memory_table(llm: Optional[LLMConfig] = None, bits: int = 4, rank: int = 8,
                 shapes=((1, 256), (1, 512), (4, 512), (1, 1024), (2, 2048))) -> str:
    """A markdown table of `qlora_memory` for the release's 7B LLM at a few micro-batch shapes."""
    llm = llm or LLMConfig()
    header = ("| batch x tokens | weights | adapters + AdamW | activations | logits | training total "
              "| KV cache (inference) |\n|---|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for batch, sequence in shapes:
        row = qlora_memory(llm, bits=bits, rank=rank, batch=batch, sequence=sequence).row()
        lines.append(f"| {batch} x {sequence} | " + " | ".join(f"{row[k]:.2f} GiB" for k in
                     ("weights", "adapters+AdamW", "activations", "logits", "training total",
                      "KV (inference)")) + " |")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def describe_memory(estimate: MemoryEstimate) -> str:
    return (f"weights {_gib(estimate.weights)}, adapters + AdamW {_gib(estimate.adapters)} "
            f"({estimate.trainable / 1e6:.1f} M trainable), activations {_gib(estimate.activations)}, "
            f"logits {_gib(estimate.logits)}: training {_gib(estimate.training)}; "
            f"KV cache afterwards {_gib(estimate.kv_cache)}")
