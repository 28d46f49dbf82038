"""The LaVIT language model: the released `language_model/` folder on mlx-lm's LLaMA.

Reference: LAVIT_REFERENCE.md section 3 "LLM" (LLaMA, unified vocabulary: text ids,
`[IMG]`, `[/IMG]`, visual codes) and the official `lavit_for_understanding.py` /
`lavit_for_generation.py`, which load the folder with transformers 4.33.2
(`LlamaForCausalLM`, slow `LlamaTokenizer`). The network itself is mlx-lm's
`models/llama.py`; this file only maps the transformers config onto it, loads the
weights strictly, quantizes, and wraps the sentencepiece tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._mlx_lm import prepare as _prepare_mlx_lm

_prepare_mlx_lm()
from mlx_lm.models.cache import BatchKVCache  # noqa: E402
from mlx_lm.models.llama import Model as LlamaModel  # noqa: E402
from mlx_lm.models.llama import ModelArgs  # noqa: E402

from ..config import LLMConfig, TokenIds
from ..errors import CheckpointError, LaVITError
from ..layout import KNOWN_EXTRAS
from ..weights import read_json, read_weights

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers' names, in the order `from_pretrained` looks for them.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
QUANTIZE_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 64


def llama_args(config: Union[LLMConfig, Mapping]) -> ModelArgs:
    """mlx-lm `ModelArgs` from the LLM config (or a transformers config.json dict).

    `LLMConfig` carries transformers' defaults where mlx-lm's differ (notably
    `tie_word_embeddings=False`: the release has a separate `lm_head`).
    """
    if not isinstance(config, LLMConfig):
        config = LLMConfig.from_hf(config)
    if config.model_type != "llama":
        raise CheckpointError(f"config.json: model_type {config.model_type!r} is not 'llama'")
    if config.hidden_act != "silu":
        raise CheckpointError(f"config.json: hidden_act {config.hidden_act!r} is not supported (LLaMA uses 'silu')")
    return ModelArgs.from_dict({k: v for k, v in config.to_hf().items() if v is not None})


def build_llama(config: Union[LLMConfig, Mapping]) -> LlamaModel:
    """mlx-lm's LLaMA for this config (unloaded)."""
    return LlamaModel(llama_args(config))


@dataclass
class QuantizationReport:
    """What `quantize` did: weight memory before and after, and the layers left alone."""

    bits: int
    group_size: int
    bytes_before: int
    bytes_after: int
    skipped: List[str] = field(default_factory=list)  # module paths, e.g. "model.layers.0.mlp.down_proj"

    def describe(self) -> str:
        text = (
            f"{self.bits}-bit (group {self.group_size}): weights {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB"
        )
        if self.skipped:
            text += f"; kept unquantized (input width not divisible by {self.group_size}): " + ", ".join(self.skipped)
        return text


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters (quantized weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def quantize_model(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: Optional[mx.Dtype] = None) -> QuantizationReport:
    """Quantize every Linear and Embedding (lm_head and embed_tokens included) in place.

    A layer whose input width (the weight's last axis, along which groups run) is not
    divisible by `group_size` stays in full precision and is named in the report.
    Layers are quantized one at a time (cast to `dtype` first when given), so the peak
    memory is the unquantized model plus one layer.
    """
    if bits not in QUANTIZE_BITS:
        raise LaVITError(f"quantize: bits must be one of {QUANTIZE_BITS}, got {bits}")
    before = weight_bytes(model)
    skipped, replaced = [], []
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    for path, module in leaves:
        if not hasattr(module, "to_quantized"):
            continue
        if module.weight.shape[-1] % group_size:
            skipped.append(path)
            continue
        if dtype is not None:
            module.weight = module.weight.astype(dtype)
        quantized = module.to_quantized(group_size=group_size, bits=bits)
        mx.eval(quantized.parameters())
        replaced.append((path, quantized))
    model.update_modules(tree_unflatten(replaced))
    if dtype is not None:
        model.set_dtype(dtype)  # norms and unquantized layers; uint32 packs are not floating
    mx.eval(model.parameters())
    return QuantizationReport(bits, group_size, before, weight_bytes(model), skipped)


# ----------------------------------------------------------------------------- weights
def weight_files(folder: Path) -> Tuple[List[Path], Dict[str, str]]:
    """The weight files of a transformers folder and the index's {key: file name} ({} without index).

    A shard named by the index but absent is an error naming the shard and one key it holds.
    """
    for name in INDEX_FILES:
        index_path = folder / name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            files = []
            for key, file in weight_map.items():
                if not (folder / file).is_file():
                    raise CheckpointError(
                        f"{folder}: shard {file} is missing (the index {name} puts {key!r} in it)"
                    )
                if folder / file not in files:
                    files.append(folder / file)
            return files, dict(weight_map)
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name], {}
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        return shards, {}
    raise CheckpointError(
        f"{folder}: no LLaMA weights (expected {INDEX_FILES[1]} with its shards, {SINGLE_FILES[1]}, "
        f"or {SINGLE_FILES[0]} / {INDEX_FILES[0]} with its shards)"
    )


def read_llama_weights(folder: Path, model: nn.Module, dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    """Read every shard, checking each key against the model's parameters as it comes.

    Errors name the key and the file: an unexpected key (other than the known
    `rotary_emb.inv_freq` buffers), a wrong shape, a key missing from every shard, or
    a key the index places in another shard than the one that holds it.
    """
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    files, weight_map = weight_files(folder)
    known_extra = KNOWN_EXTRAS["llm"]
    weights: Dict[str, mx.array] = {}
    for path in files:
        shard = read_weights(path)
        for key, value in shard.items():
            if key not in expected:
                if known_extra(key):
                    continue
                raise CheckpointError(f"{path}: unexpected key {key!r} (not a parameter of the LLaMA in config.json)")
            if tuple(value.shape) != tuple(expected[key]):
                raise CheckpointError(
                    f"{path}: key {key!r} has shape {tuple(value.shape)}, config.json implies {tuple(expected[key])}"
                )
            if key in weights:
                raise CheckpointError(f"{path}: key {key!r} is also in another shard")
            if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            weights[key] = value
        mx.eval(list(weights.values()))
        del shard
    missing = [k for k in expected if k not in weights]
    if missing:
        where = f" (the index puts it in {weight_map[missing[0]]})" if missing[0] in weight_map else ""
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: missing key {missing[0]!r}{where}{more}")
    return weights


# ----------------------------------------------------------------------------- model
class LanguageModel(nn.Module):
    """mlx-lm's LLaMA with LaVIT's token ids, a context check and weight accounting.

    `model` is the plain `mlx_lm.models.llama.Model` (a child module: freeze it, wrap it
    in LoRA, differentiate or save it through this one); use it directly with mlx-lm
    tools. Build one with `load_language_model`.
    """

    def __init__(self, model: LlamaModel, token_ids: TokenIds, source: str = "",
                 quantization: Optional[QuantizationReport] = None):
        super().__init__()
        self.model = model
        self.args: ModelArgs = model.args
        self.token_ids = token_ids
        self.source = source
        self.quantization = quantization

    @property
    def context_length(self) -> Optional[int]:
        """max_position_embeddings of config.json (2048 for LLaMA-1, 4096 for LLaMA-2)."""
        return self.args.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.model.norm.weight.dtype

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def check_length(self, prompt_length: int, new_tokens: int = 0) -> None:
        """Raise a one-line LaVITError when the prompt (plus new tokens) exceeds the context."""
        limit = self.context_length
        if limit is None:
            return
        if prompt_length > limit:
            raise LaVITError(
                f"prompt of {prompt_length} tokens is longer than the LLM's context of {limit} tokens"
            )
        if prompt_length + new_tokens > limit:
            raise LaVITError(
                f"prompt of {prompt_length} tokens + {new_tokens} new tokens exceeds the LLM's context of "
                f"{limit} tokens"
            )

    def embed(self, ids) -> mx.array:
        """Input embeddings of token ids: (..., hidden) in the model's dtype."""
        ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
        return self.model.model.embed_tokens(ids)

    def make_cache(self, left_padding: Sequence[int]) -> List[BatchKVCache]:
        """One BatchKVCache per layer for a left-padded batch.

        Each row's positions count from its first real token (as transformers derives
        position ids from the attention mask), and padded keys are masked.
        """
        return [BatchKVCache(list(left_padding)) for _ in self.model.layers]

    def __call__(self, input_ids: Optional[mx.array] = None, inputs_embeds: Optional[mx.array] = None,
                 cache=None) -> mx.array:
        """Logits (B, T, vocab) in float32 for ids (B, T) or embeddings (B, T, hidden).

        Without a cache the rows must be unpadded; for left-padded batches pass
        `make_cache(left_padding)`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is None:
            self.check_length((input_ids if input_ids is not None else inputs_embeds).shape[1])
        logits = self.model(input_ids, cache=cache, input_embeddings=inputs_embeds)
        return logits.astype(mx.float32)

    def next_logits(self, input_ids: Optional[mx.array] = None, inputs_embeds: Optional[mx.array] = None,
                    cache=None) -> mx.array:
        """Float32 logits (B, vocab) of the last position only: the head runs on one position."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.model.model(input_ids, cache, inputs_embeds)[:, -1:]
        if self.args.tie_word_embeddings:
            logits = self.model.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.model.lm_head(hidden)
        return logits[:, 0].astype(mx.float32)

    def pad_embeddings(self, rows: Sequence[mx.array]) -> Tuple[mx.array, List[int]]:
        """Left-pad (T_i, hidden) rows with the eos embedding, as the release does.

        Returns the (B, T_max, hidden) batch and each row's padding.
        """
        lengths = [int(r.shape[0]) for r in rows]
        if not rows or min(lengths) == 0:
            raise LaVITError("every prompt needs at least one embedding")
        for r in rows:
            if r.ndim != 2 or r.shape[1] != self.hidden_size:
                raise LaVITError(
                    f"input embeddings must be (tokens, {self.hidden_size}), got {tuple(r.shape)}"
                )
        longest = max(lengths)
        pad = self.embed(mx.array([self.token_ids.pad]))  # (1, hidden)
        batch = [
            mx.concatenate([mx.broadcast_to(pad, (longest - n, self.hidden_size)), r.astype(pad.dtype)])
            if n < longest else r.astype(pad.dtype)
            for r, n in zip(rows, lengths)
        ]
        return mx.stack(batch), [longest - n for n in lengths]

    def pad_ids(self, rows: Sequence[Sequence[int]]) -> Tuple[mx.array, List[int]]:
        """Left-pad id rows with the pad (= eos) id. Returns (B, T_max) ids and the paddings."""
        lengths = [len(r) for r in rows]
        if not rows or min(lengths) == 0:
            raise LaVITError("every prompt needs at least one token")
        longest = max(lengths)
        vocab = self.args.vocab_size
        for r in rows:
            bad = [i for i in r if not 0 <= int(i) < vocab]
            if bad:
                raise LaVITError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        padded = [[self.token_ids.pad] * (longest - len(r)) + [int(i) for i in r] for r in rows]
        return mx.array(padded, dtype=mx.int32), [longest - n for n in lengths]


def load_language_model(
    folder,
    dtype: Optional[mx.Dtype] = mx.float32,
    quantize: Optional[int] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    token_ids: Optional[TokenIds] = None,
) -> LanguageModel:
    """Load a `language_model/` folder: the released one (transformers LLaMA layout) or an
    MLX folder's (mlx-lm layout, maybe stored quantized); the keys are the same.

    Args:
        folder: holds config.json and the weights: pytorch_model.bin.index.json with
            its .bin shards, a single pytorch_model.bin, or model.safetensors (with
            model.safetensors.index.json when sharded).
        dtype: compute dtype; float32 (the default) for the CPU, None keeps the
            stored dtype (float16 in the release; for the GPU).
        quantize: 4 or 8 to quantize Linear and Embedding layers (lm_head and
            embed_tokens included) at load, with `group_size`; the report is
            `.quantization`. A folder stored quantized keeps its own quantization.
        token_ids: the special ids; by default `TokenIds.for_vocab(vocab_size)`.

    Returns:
        a LanguageModel in eval mode. Raises CheckpointError on a missing config or
        shard, an unexpected key (named with its file), a missing key or a wrong shape.
    """
    from ..loading import load_component

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"language model folder not found: {folder}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_FILE} (the LLaMA configuration)")
    raw = read_json(config_path)
    config = LLMConfig.from_hf(raw, str(config_path))
    model = build_llama(config)
    stored = raw.get("quantization")
    if quantize not in (None, *QUANTIZE_BITS):
        raise LaVITError(f"quantize: bits must be one of {QUANTIZE_BITS}, got {quantize}")
    if stored and quantize and quantize != stored["bits"]:
        raise LaVITError(f"{folder} is stored {stored['bits']}-bit; convert again to use --quantize {quantize}")
    if stored:
        files, _ = weight_files(folder)
        weights = {}
        for path in files:
            weights.update(read_weights(path))
        load_component(model, weights, str(folder), quantization=stored, dtype=dtype)
    else:
        # one shard at a time, each key checked as it comes; quantizing reads at the
        # stored dtype and casts layer by layer (lower peak memory)
        weights = read_llama_weights(folder, model, None if quantize else dtype)
        load_component(model, weights, str(folder), dtype=None)
    del weights
    report = quantize_model(model, quantize, group_size, dtype) if quantize and not stored else None
    args = model.args
    if token_ids is None:
        token_ids = TokenIds.for_vocab(args.vocab_size)
    elif token_ids.vocab_size != args.vocab_size:
        raise CheckpointError(
            f"{config_path}: vocab_size {args.vocab_size} does not match the token ids' "
            f"{token_ids.vocab_size} ({token_ids.num_text} text + 2 + {token_ids.codebook_size} visual)"
        )
    return LanguageModel(model, token_ids, str(folder), report).eval()


# ----------------------------------------------------------------------------- text tokenizer
class TextTokenizer:
    """The release's slow `LlamaTokenizer` (transformers 4.33.2, legacy mode) over sentencepiece.

    `encode` adds no special tokens (the release calls it with add_special_tokens=False);
    special-token strings in the text (`<s>`, `</s>`, `<unk>`) become their ids, as the
    transformers tokenizer splits on them. `decode` equals
    `batch_decode(..., skip_special_tokens=True)` for one row, with visual ids
    (`[IMG]`, `[/IMG]`, codes) skipped too.
    """

    def __init__(self, model_file, token_ids: Optional[TokenIds] = None, legacy: bool = True,
                 clean_up_spaces: bool = False):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"missing text tokenizer {model_file}")
        if not legacy:
            raise CheckpointError(
                f"{model_file.parent / TOKENIZER_CONFIG_FILE}: legacy=False tokenization is not supported "
                "(the release uses the legacy LlamaTokenizer)"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"{model_file}: not a sentencepiece model ({exc})") from None
        self.token_ids = token_ids or TokenIds(num_text=self.sp.get_piece_size())
        if self.sp.get_piece_size() != self.token_ids.num_text:
            raise CheckpointError(
                f"{model_file}: {self.sp.get_piece_size()} pieces, but the LLM's vocabulary has "
                f"{self.token_ids.num_text} text ids"
            )
        self.clean_up_spaces = clean_up_spaces
        ids = self.token_ids
        self.special_ids = {ids.unk, ids.bos, ids.eos, ids.pad}
        specials = sorted({self.sp.id_to_piece(i): i for i in self.special_ids}.items(), key=lambda kv: -len(kv[0]))
        self._special = dict(specials)
        self._split = re.compile("(" + "|".join(re.escape(s) for s, _ in specials) + ")")

    @classmethod
    def from_folder(cls, folder, token_ids: Optional[TokenIds] = None) -> "TextTokenizer":
        """The tokenizer of a `language_model/` folder (tokenizer.model, tokenizer_config.json)."""
        folder = Path(folder)
        config_path = folder / TOKENIZER_CONFIG_FILE
        config = read_json(config_path) if config_path.is_file() else {}
        # LlamaTokenizer's defaults in 4.33.2: legacy when unset, no clean-up of spaces.
        return cls(folder / TOKENIZER_FILE, token_ids, legacy=config.get("legacy", True) is not False,
                   clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`, no BOS (the release's `add_special_tokens=False`)."""
        ids: List[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            if part in self._special:
                ids.append(self._special[part])
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, skipping special ids (<unk>, <s>, </s>) and every id past the text vocabulary."""
        kept = [int(i) for i in ids if int(i) not in self.special_ids and 0 <= int(i) < self.token_ids.num_text]
        if not kept:
            return ""
        pieces = [self.sp.id_to_piece(i) for i in kept]
        # transformers strips the dummy-prefix marker of the first piece itself.
        if pieces[0].startswith("\u2581"):
            pieces[0] = pieces[0][1:]
        text = self.sp.decode_pieces(pieces)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def batch_decode(self, rows: Iterable[Iterable[int]]) -> List[str]:
        return [self.decode(r) for r in rows]


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (used when tokenizer_config.json asks for it)."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
