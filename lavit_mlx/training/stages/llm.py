"""Stage 2, the unified LLM (`lavit train llm`): LAVIT_REFERENCE.md section 5 item 2.

Image-text pairs become next-token sequences in the two orders the inference code reads:

    understanding [image, text]:  [IMG] e_1 .. e_T [/IMG] prompt text eos
    generation    [text, image]:  text [IMG] v_1 .. v_T [/IMG]

`e_i` are the merger's continuous embeddings of the kept patches (selector + merger +
`vit_proj`, the understanding path; trained with the LLM as the release's
`visual_weight.bin`, or frozen), `v_i` the visual ids (`[/IMG]` + 1 + code) of the same
patches from the frozen tokenizer. Every next token is a target (an input embedding e_i
is followed by the target v_{i+1}), masked per modality and arrangement
(`understanding_targets`, `generation_targets`); VQA pairs use the release's prompt
"Question: {} Answer:", which is input only (`mask_prompt`). Caption pairs are put in
generation order with probability `generation_fraction`; VQA pairs always read the image.

The frozen encoder and tokenizer run ONCE over the data before training (in data order,
so the features are the same on a resumed run); the step only gathers. Sequences are
right-padded to a few bucketed lengths, so the compiled step sees few shapes: the causal
mask keeps padding out of every real position, and padded targets weigh 0.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...config import LaVITConfig, LLMConfig, TokenIds
from ...data import DataStream, batches, bucket_length, format_stats, merge_states
from ...data.shards import find_files
from ...errors import LaVITError
from ...understanding import VQA_PROMPT
from ..config import register_stage
from ..lora import LoRASection, apply_lora, fuse_llm, save_adapter
from ..loop import Stage
from . import stage_builder

TARGETS = ("both", "text", "image")
SAMPLE_KINDS = ("caption", "vqa")
UNDERSTANDING_MODES = ("train", "projection", "frozen")
UNDERSTANDING_INITS = ("tokenizer", "identity")
PROJECTION_INITS = ("random", "scene_labels")
EXPORTS = ("model", "adapter", "both")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SHAPES_TOKENIZER = "shapes"  # text_tokenizer: train the shapes world's 256-piece tokenizer
# Kinds of a target token (the `kind` of `Sequence`).
NONE, TEXT, IMAGE, PROMPT = 0, 1, 2, 3


@dataclass
class LLMModelSection:
    """`model:` of the llm stage: where the LLM and the image side come from."""

    init: Optional[str] = None  # MLX LaVIT folder: eva + tokenizer (+ understanding, llm, decoders)
    language_model: Optional[str] = None  # a text-only LLaMA folder (HF or mlx-lm layout) to grow
    llm: dict = field(default_factory=dict)  # sizes of an LLM from scratch (config.json keys; vocab is derived)
    text_tokenizer: Optional[str] = None  # folder with tokenizer.model; default the LLM's; "shapes": the world's
    understanding: str = "train"  # train (merger + vit_proj with the LLM) | projection (vit_proj only) | frozen
    understanding_init: str = "tokenizer"  # a new understanding merger: the tokenizer's | identity (see build_understanding)
    projection_init: str = "random"  # a new vit_proj: random | scene_labels (shapes world; see fit_projection_to_scenes)
    projection_images: int = 2000  # training pictures the scene_labels fit reads
    train_projection: bool = True  # false: vit_proj stays as initialised (understanding: projection)
    quantize: Optional[int] = None  # 4 | 8: the LLM quantized at load (QLoRA; needs lora.rank)
    group_size: int = 64
    lora: LoRASection = field(default_factory=LoRASection)
    init_std: float = 0.02  # normal init of a from-scratch LLM (LLaMA / GPT-2 practice)
    grow_noise: float = 0.1  # grown rows: mean of the text rows + this x their per-dim std x N(0, 1)
    vision_heads: Optional[int] = None
    export: str = "model"  # model (out/model: init + llm + understanding) | adapter (into out) | both
    export_dtype: Optional[str] = None  # float16 | bfloat16 | float32 (None: as trained)
    max_length: int = 256  # longest training sequence (longer ones are cut)
    bucket: int = 16  # sequences are padded to a multiple of this
    cache_batch: int = 32  # images per forward pass when tokenizing the data once

    def check(self) -> None:
        if not self.init:
            raise LaVITError("model.init: give the MLX LaVIT folder with the encoder and the tokenizer")
        if self.language_model and self.llm:
            raise LaVITError("give model.language_model (grow a text LLaMA) or model.llm (sizes from scratch), not both")
        if self.understanding not in UNDERSTANDING_MODES:
            raise LaVITError(f"model.understanding {self.understanding!r}: choose {' or '.join(UNDERSTANDING_MODES)}")
        if self.understanding_init not in UNDERSTANDING_INITS:
            raise LaVITError(f"model.understanding_init {self.understanding_init!r}: choose "
                             f"{' or '.join(UNDERSTANDING_INITS)}")
        if self.projection_init not in PROJECTION_INITS:
            raise LaVITError(f"model.projection_init {self.projection_init!r}: choose "
                             f"{' or '.join(PROJECTION_INITS)}")
        if self.projection_init == "scene_labels" and self.understanding != "projection":
            raise LaVITError("model.projection_init scene_labels fits vit_proj over a fixed merger: "
                             "set model.understanding: projection")
        if not self.train_projection and self.understanding != "projection":
            raise LaVITError("model.train_projection false keeps vit_proj fixed over a fixed merger: "
                             "set model.understanding: projection")
        if self.projection_images < 1:
            raise LaVITError(f"model.projection_images {self.projection_images}: expected at least 1")
        if self.quantize not in (None, 4, 8):
            raise LaVITError(f"model.quantize {self.quantize}: expected 4 or 8")
        if self.quantize and not self.lora.enabled:
            raise LaVITError("model.quantize trains adapters on a quantized LLM (QLoRA): set model.lora.rank")
        if self.export not in EXPORTS:
            raise LaVITError(f"model.export {self.export!r}: choose from {', '.join(EXPORTS)}")
        if self.export in ("adapter", "both") and not self.lora.enabled:
            raise LaVITError(f"model.export {self.export}: an adapter needs model.lora.rank of at least 1")
        if self.export_dtype not in (None, *DTYPES):
            raise LaVITError(f"model.export_dtype {self.export_dtype!r}: choose from {', '.join(DTYPES)}")
        self.llm = _llm_sizes(self.llm)
        if self.max_length < 8 or self.bucket < 1 or self.cache_batch < 1:
            raise LaVITError("model.max_length must be at least 8, model.bucket and model.cache_batch at least 1")
        self.lora.check()


def _llm_sizes(values: dict) -> dict:
    """`model.llm` checked against the LLaMA config's keys, numbers read as numbers (YAML
    reads 1e-5 as text)."""
    import dataclasses

    from ..config import _coerce, _nearest

    defaults = {f.name: f.default for f in dataclasses.fields(LLMConfig) if f.name != "extra"}
    out = {}
    for key, value in (values or {}).items():
        if key not in defaults:
            raise LaVITError(f"unknown key model.llm.{key}{_nearest(key, list(defaults))}")
        out[key] = _coerce(value, defaults[key], f"model.llm.{key}")
    return out


@dataclass
class LLMLossSection:
    """`loss:` of the llm stage: which pairs, in which order, with which targets."""

    samples: list = field(default_factory=lambda: list(SAMPLE_KINDS))  # manifest lines used: caption, vqa
    generation_fraction: float = 0.5  # caption pairs put in [text, image] order (the rest [image, text])
    vqa_fraction: float = 1.0  # VQA lines used per epoch (drawn anew each epoch): the caption:VQA mix
    understanding_targets: str = "both"  # both | text | image: the targets of [image, text] sequences
    generation_targets: str = "both"  # the targets of [text, image] sequences
    mask_prompt: bool = True  # the VQA prompt "Question: {} Answer:" is input only
    text_weight: float = 1.0
    image_weight: float = 1.0
    drop_text: float = 0.0  # generation pairs whose text is dropped: the unconditional branch of guidance
    caption_suffix: str = "."  # appended to [image, text] captions (inference cuts at the first '.')
    answer_suffix: str = "."  # appended to answers (VQA decodes at least 2 tokens and cuts at '.')
    # words whose pieces' accuracy is logged apart, as content_accuracy: the words that carry
    # the picture (colours, shapes, places), which the grammar's near-certain tokens drown
    # in text_accuracy; a metric only, the loss is unchanged
    content_words: list = field(default_factory=list)

    def check(self) -> None:
        bad = [k for k in self.samples if k not in SAMPLE_KINDS]
        if bad or not self.samples:
            raise LaVITError(f"loss.samples: choose among {', '.join(SAMPLE_KINDS)}, not {bad or 'none'}")
        for name in ("understanding_targets", "generation_targets"):
            if getattr(self, name) not in TARGETS:
                raise LaVITError(f"loss.{name} {getattr(self, name)!r}: choose from {', '.join(TARGETS)}")
        for name in ("generation_fraction", "vqa_fraction", "drop_text"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LaVITError(f"loss.{name} {getattr(self, name)}: expected 0..1")
        if self.text_weight < 0 or self.image_weight < 0 or self.text_weight + self.image_weight == 0:
            raise LaVITError("loss.text_weight and loss.image_weight must be >= 0, not both 0")
        odd = [w for w in self.content_words if not isinstance(w, str) or not w.strip()]
        if odd:
            raise LaVITError(f"loss.content_words: expected a list of words, got {odd[0]!r} in it")


register_stage("llm", LLMModelSection, LLMLossSection,
               {"steps": 2000, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 100,
                "min_learning_rate": 1e-5, "weight_decay": 0.01, "save_every": 500})


# ----------------------------------------------------------------------------- the images, once
@dataclass
class VisualCache:
    """Per distinct image of the data: the kept patches, their codes and the LLM's inputs.

    `inputs[i]` is what the step starts from: the image's EVA patch features (N, W) when the
    merger trains, the merger's output at the kept patches (T, W) when only `vit_proj` does,
    else the visual embeddings of the kept patches (T, hidden).
    `where[(file, line)]` is the image of a data line (`line_identity`).
    """

    keep: List[np.ndarray] = field(default_factory=list)  # (N,) bool, the understanding selector's rule
    codes: List[np.ndarray] = field(default_factory=list)  # (T,) codes of the kept patches
    inputs: List[np.ndarray] = field(default_factory=list)
    where: Dict[Tuple[str, int], int] = field(default_factory=dict)

    def image_of(self, files, sample) -> Optional[int]:
        return self.where.get(line_identity(files, sample))

    def __len__(self) -> int:
        return len(self.keep)


def line_identity(files, sample) -> Tuple[str, int]:
    """(absolute file, sample number in it) of a sample of a stream over `files` (its
    `find_files`): the same in every stream (shard ids are relative to a stream's common folder)."""
    if sample.shard in files.names:  # a tar shard: named by its file
        return files.paths[files.names.index(sample.shard)], sample.index
    name, start = sample.shard.rsplit("@", 1)  # a manifest's virtual shard: name@first_sample
    return files.paths[files.names.index(name)], int(start) + sample.index


def image_key(image) -> str:
    pixels = np.asarray(image)
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=16).hexdigest()


def tokenize_once(lavit, understanding: nn.Module, sources: List, lines_per_shard: int, mode: str,
                  batch_size: int, log=None) -> VisualCache:
    """Run the frozen encoder, selector and tokenizer over every distinct image of `sources`.

    Images are met in data order (no shuffling) and run `batch_size` at a time, so the
    result depends on the data alone. Unreadable images are skipped (their lines too).
    """
    from ...image_processing import preprocess

    cache = VisualCache()
    seen: Dict[str, int] = {}
    pending: List[Tuple[str, object]] = []
    size = lavit.config.vision.image_size

    def flush():
        if not pending:
            return
        pixels = mx.array(preprocess([image for _, image in pending], size))
        patches = lavit.encode(pixels)[:, 1:]
        keep = understanding.select(understanding.token_predictor(patches))
        codes = lavit.tokenizer(patches, keep=keep).codes
        if mode == "train":
            visual = patches
        else:
            out = understanding(patches, keep=keep)
            visual = out.merged if mode == "projection" else out.visual_embeds
        mx.eval(keep, codes, visual)
        keep_np, codes_np = np.array(keep) > 0.5, np.array(codes)
        for row in range(len(pending)):
            cache.keep.append(keep_np[row])
            cache.codes.append(codes_np[row][keep_np[row]].astype(np.int32))
            cache.inputs.append(np.array(visual[row]) if mode == "train" else np.array(visual[row])[keep_np[row]])
        pending.clear()

    start = time.perf_counter()
    stream = DataStream(sources, shuffle_buffer=1, shuffle_shards=False, lines_per_shard=lines_per_shard, epochs=1)
    files = find_files(sources)
    stream.transform = lambda sample: (line_identity(files, sample), sample.image)
    for line, image in stream:
        key = image_key(image)
        if key not in seen:
            seen[key] = len(seen)
            pending.append((key, image))
            if len(pending) == batch_size:
                flush()
        cache.where[line] = seen[key]
    flush()
    if not cache.where:
        raise LaVITError(f"no usable image-text pair in {', '.join(map(str, sources))} ({format_stats(stream.stats)})")
    if log:
        log(f"tokenized {len(cache)} images of {format_stats(stream.stats)} once in "
            f"{time.perf_counter() - start:.1f} s ({np.mean([len(c) for c in cache.codes]):.1f} visual tokens "
            "on average)")
    return cache


# ----------------------------------------------------------------------------- sequences
@dataclass
class Example:
    """One pair before layout: its image, prompt ids (input only), text ids, order."""

    image: int  # index into the VisualCache
    prompt: List[int]
    text: List[int]
    generation: bool  # [text, image] order


@dataclass
class Sequence:
    """A laid-out sequence: per position its input (an id, or a visual slot) and its target."""

    ids: List[int]  # input ids (pad where a visual embedding goes)
    slots: List[int]  # visual slot per position (-1: the input is `ids`)
    targets: List[int]  # the next token's id
    kinds: List[int]  # TEXT, IMAGE, PROMPT, NONE: the kind of the target


def understanding_sequence(example: Example, codes: np.ndarray, slots: List[int], ids: TokenIds) -> Sequence:
    """[IMG] e_1..e_T [/IMG] prompt text eos: visual embeddings in, visual ids as their next-token targets."""
    visual_ids = (codes + ids.visual_offset).tolist()
    tokens = ([(ids.image_start, -1, IMAGE)] + [(v, s, IMAGE) for v, s in zip(visual_ids, slots)]
              + [(ids.image_end, -1, IMAGE)] + [(t, -1, PROMPT) for t in example.prompt]
              + [(t, -1, TEXT) for t in example.text] + [(ids.eos, -1, TEXT)])
    return _shifted(tokens, ids.pad)


def generation_sequence(example: Example, codes: np.ndarray, ids: TokenIds) -> Sequence:
    """text [IMG] v_1..v_T [/IMG]: what text-to-image generation reads and writes (ids only)."""
    visual_ids = (codes + ids.visual_offset).tolist()
    tokens = ([(t, -1, TEXT) for t in example.text] + [(ids.image_start, -1, IMAGE)]
              + [(v, -1, IMAGE) for v in visual_ids] + [(ids.image_end, -1, IMAGE)])
    return _shifted(tokens, ids.pad)


def _shifted(tokens, pad: int) -> Sequence:
    """Inputs are tokens[:-1], targets tokens[1:] (with the kind of the token predicted)."""
    inputs, following = tokens[:-1], tokens[1:]
    return Sequence(ids=[pad if s >= 0 else t for t, s, _ in inputs], slots=[s for _, s, _ in inputs],
                    targets=[t for t, _, _ in following], kinds=[k for _, _, k in following])


def target_masks(kinds: np.ndarray, generation: np.ndarray, loss: LLMLossSection) -> Tuple[np.ndarray, np.ndarray]:
    """(text, image) float masks of the targets that count, per arrangement's setting."""
    def wanted(setting: str, kind: int) -> bool:
        return setting == "both" or setting == {TEXT: "text", IMAGE: "image"}[kind]

    text = np.zeros(kinds.shape, np.float32)
    image = np.zeros(kinds.shape, np.float32)
    for rows, setting in ((~generation, loss.understanding_targets), (generation, loss.generation_targets)):
        if wanted(setting, TEXT):
            text[rows] = kinds[rows] == TEXT
            if not loss.mask_prompt:
                text[rows] += kinds[rows] == PROMPT
        if wanted(setting, IMAGE):
            image[rows] = kinds[rows] == IMAGE
    return text, image


# ----------------------------------------------------------------------------- the model
class UnifiedModel(nn.Module):
    """What stage 2 trains: the LLM and the understanding path (selector + merger + vit_proj)."""

    def __init__(self, llm, understanding):
        super().__init__()
        self.llm = llm
        self.understanding = understanding


def _normal_init(module: nn.Module, std: float) -> None:
    """LLaMA's init: every matrix N(0, std), norms 1."""
    params = [(k, mx.random.normal(v.shape) * std if v.ndim == 2 else v)
              for k, v in tree_flatten(module.parameters())]
    module.load_weights(params)


def grown_rows(weight: mx.array, count: int, noise: float) -> mx.array:
    """`count` new rows: the mean of `weight`'s rows plus `noise` x their per-dim std x N(0, 1).

    At the mean, a new token's embedding is an average word and its logit the average
    logit, so the text LLM's predictions are not disturbed while the new rows learn.
    """
    mean = mx.mean(weight, axis=0, keepdims=True)
    std = mx.sqrt(mx.var(weight, axis=0, keepdims=True))
    return (mean + noise * std * mx.random.normal((count, weight.shape[1]))).astype(weight.dtype)


def grow_vocabulary(lm, token_ids: TokenIds, noise: float):
    """A text-only `LanguageModel` with its embedding (and head) grown to `token_ids.vocab_size`."""
    from ...models.llm import LanguageModel

    llama = lm.model
    old = llama.model.embed_tokens.weight
    count = token_ids.vocab_size - old.shape[0]
    embedding = nn.Embedding(token_ids.vocab_size, old.shape[1])
    embedding.weight = mx.concatenate([old, grown_rows(old, count, noise)])
    llama.model.embed_tokens = embedding
    if "lm_head" in llama:
        head_old = llama.lm_head.weight
        head = nn.Linear(head_old.shape[1], token_ids.vocab_size, bias=False)
        head.weight = mx.concatenate([head_old, grown_rows(head_old, count, noise)])
        llama.lm_head = head
    llama.args.vocab_size = llama.model.vocab_size = token_ids.vocab_size
    mx.eval(llama.parameters())
    return LanguageModel(llama, token_ids, lm.source)


def resolve_text_tokenizer(section: LLMModelSection, lavit, out: Path) -> Path:
    """The folder of the text tokenizer (tokenizer.model), trained for "shapes"."""
    if section.text_tokenizer == SHAPES_TOKENIZER:
        from ...shapes import train_text_tokenizer

        return train_text_tokenizer(out / "text_tokenizer").parent
    if section.text_tokenizer:
        folder = Path(section.text_tokenizer)
    elif section.language_model:
        folder = Path(section.language_model)
    elif lavit.checkpoint.has("llm"):
        folder = lavit.checkpoint.folder("llm")
    else:
        raise LaVITError("model.text_tokenizer: give the folder of the text tokenizer (tokenizer.model), "
                         f"or '{SHAPES_TOKENIZER}' for the shapes world's")
    if not (folder / "tokenizer.model").is_file():
        raise LaVITError(f"model.text_tokenizer: {folder} has no tokenizer.model")
    return folder


def build_language_model(section: LLMModelSection, lavit, tokenizer_folder: Path):
    """The LLM to train: grown from a text LLaMA, from scratch, or the init folder's own.

    Returns (LanguageModel, LLMConfig of its config.json, TokenIds).
    """
    import sentencepiece as spm

    from ...models.llm import LanguageModel, build_llama, load_language_model
    from ...weights import read_json

    codebook = lavit.config.tokenizer.codebook_size
    if section.language_model:
        folder = Path(section.language_model)
        raw = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
        if raw is None:
            raise LaVITError(f"model.language_model: {folder} has no config.json")
        if raw.get("quantization"):
            raise LaVITError(f"model.language_model: {folder} is stored quantized; grow an unquantized LLaMA")
        vocab = int(raw["vocab_size"])
        # a text-only vocabulary: read with no visual ids, then grow by [IMG], [/IMG] and the codes
        text = load_language_model(folder, token_ids=TokenIds(num_text=vocab - 2, codebook_size=0))
        token_ids = TokenIds(num_text=vocab, codebook_size=codebook)
        lm = grow_vocabulary(text, token_ids, section.grow_noise)
        config = LLMConfig.from_hf({**raw, "vocab_size": token_ids.vocab_size})
    elif section.llm:
        pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model")).get_piece_size()
        token_ids = TokenIds(num_text=pieces, codebook_size=codebook)
        config = LLMConfig.from_hf({"model_type": "llama", **section.llm, "vocab_size": token_ids.vocab_size},
                                   "model.llm")
        llama = build_llama(config)
        if section.init_std > 0:
            _normal_init(llama, section.init_std)
        lm = LanguageModel(llama, token_ids, "model.llm")
    elif lavit.checkpoint.has("llm"):
        lm = lavit.llm  # quantized at load when model.quantize is set
        token_ids, config = lavit.token_ids, lavit.config.llm
        quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in lm.model.named_modules())
        if quantized and not section.lora.enabled:
            raise LaVITError(f"{lavit.checkpoint.path}: the LLM is quantized; train adapters on it (model.lora.rank)")
    else:
        raise LaVITError(f"{lavit.checkpoint.path} has no LLM: give model.llm (sizes) or model.language_model")
    if token_ids.codebook_size != codebook:
        raise LaVITError(f"the LLM has {token_ids.codebook_size} visual ids, the tokenizer {codebook} codes")
    if section.quantize and (section.language_model or section.llm):
        from ...models.llm import quantize_model

        quantize_model(lm.model, section.quantize, section.group_size)
    return lm, config, token_ids


def build_understanding(lavit, hidden: int, log=None, init: str = "tokenizer") -> Tuple[nn.Module, bool]:
    """The init folder's understanding path, or one made from its tokenizer (selector and merger
    copied, as the release loads `visual_weight.bin` over the tokenizer) with a new `vit_proj`.

    `init="identity"` starts a new path's merger as the identity: the tokenizer's merger with
    its blocks' output projections (both attentions' `proj`, the MLP's `fc2`) zeroed, so that
    the residual stream passes each kept patch's EVA feature through the final LayerNorm
    unchanged. Why: the tokenizer's merger is trained for the quantised reconstruction,
    whose decoder knows every token's position, so it is free to write over what the
    features say about where a patch is; on the shapes world a linear probe reads a kept
    object patch's 3 x 3 cell right 87% of the time from EVA's features and 40% from the
    understanding path's output after a whole LLM stage started from that merger.

    Returns the module and whether its `vit_proj` is new.
    """
    from ...loading import build_component

    if lavit.checkpoint.has("understanding") and lavit.config.understanding_dim == hidden:
        if init != "tokenizer" and log:
            log(f"model.understanding_init {init} not applied: the init folder's understanding path is kept")
        return lavit.understanding, False
    if lavit.checkpoint.has("understanding") and log:
        log(f"the init folder's vit_proj is {lavit.config.understanding_dim} wide, the LLM {hidden}: a new vit_proj")
    source = lavit.understanding if lavit.checkpoint.has("understanding") else lavit.tokenizer
    module = build_component("understanding", lavit.config.replace(understanding_dim=hidden))
    kept = [(k, v) for k, v in tree_flatten(source.parameters())
            if k.startswith(("token_predictor.", "causal_encoder."))]
    module.load_weights(kept, strict=False)
    if init == "identity":
        for block in module.causal_encoder.blocks:
            for layer in (block.token_causal_attn.proj, block.token_cross_attn.proj, block.mlp.fc2):
                layer.weight = mx.zeros_like(layer.weight)
                layer.bias = mx.zeros_like(layer.bias)
    mx.eval(module.parameters())
    return module.eval(), True


def content_table(text, words: List[str], vocab_size: int) -> Optional[np.ndarray]:
    """(vocab,) float32: 1 at the pieces of `words` (as they are written inside a sentence),
    0 elsewhere; None when no word is given. A word the tokenizer cannot write is an error.
    Both trainers' `content_accuracy` (numpy, so that the PyTorch stage uses it as it is)."""
    if not words:
        return None
    table = np.zeros(vocab_size, np.float32)
    for word in words:
        ids = text.encode(word)
        pieces = [i for i in ids if i not in text.special_ids]
        if not pieces or text.token_ids.unk in ids:
            raise LaVITError(f"loss.content_words: {word!r} is not written by the text tokenizer's pieces")
        table[pieces] = 1.0
    return table


def scale_projection(projection: nn.Linear, target_rms: float) -> None:
    """Start `vit_proj` so that a visual embedding is as large as a word embedding: the merger
    ends in a LayerNorm (unit-RMS features), so N(0, (target / sqrt(W))^2) weights give outputs
    of RMS ~ target."""
    width = projection.weight.shape[1]
    projection.weight = mx.random.normal(projection.weight.shape) * (target_rms / width**0.5)
    projection.bias = mx.zeros_like(projection.bias)


def fit_projection_to_scenes(cache: VisualCache, sources: List, lines_per_shard: int, patch: int, size: int,
                             hidden: int, target_rms: float, seed: int, images: int, log=None):
    """A `vit_proj` (weight (hidden, W), bias (hidden,)) fitted by ridge regression so that each
    kept patch's merger output maps to an *ideal* object embedding: the sum of fixed random
    embeddings of the colour, shape and cell of the object under it (class 0 of each: none,
    so a background patch maps to the sum of the three "none" rows), labels from the shapes
    world's generator (`shapes.world.patch_objects` of the caption).

    Why: on the shapes world the features at object patches hold colour, shape and cell
    linearly (a ridge probe reads them 99.7 / 98.5 / 97.9%), yet a `vit_proj` learnt through
    the LLM's loss alone reads colour worst (colour is 15% of the between-class variance,
    shape 21%, cell 36%, and gradient descent through the LLM learns the larger directions
    first); the same LLM fed ideal object embeddings reaches 98% content accuracy. The fit
    starts the LLM from such inputs; `vit_proj` then trains with the LLM as before.
    """
    from PIL import Image

    from ...shapes.world import PATCH_CLASSES, patch_objects

    rng = np.random.default_rng(seed)
    tables = [rng.standard_normal((classes, hidden)) * (target_rms / np.sqrt(len(PATCH_CLASSES)))
              for classes in PATCH_CLASSES]
    stream = DataStream(sources, shuffle_buffer=1, shuffle_shards=False, lines_per_shard=lines_per_shard, epochs=1)
    files = find_files(sources)
    rows, labels, done = [], [], set()
    for sample in stream:
        image = cache.image_of(files, sample)
        if sample.question is not None or not sample.text or image is None or image in done:
            continue
        picture = sample.image.convert("RGB").resize((size, size), Image.NEAREST)
        try:
            found = np.stack(patch_objects(picture, sample.text, patch))  # (3, N)
        except LaVITError as error:
            raise LaVITError(f"model.projection_init scene_labels needs the shapes world's captions: {error}") from None
        done.add(image)
        rows.append(cache.inputs[image].astype(np.float64))  # (T, W) the kept patches' merger outputs
        labels.append(found[:, cache.keep[image]])  # (3, T)
        if len(done) == images:
            break
    if not rows:
        raise LaVITError(f"model.projection_init scene_labels: no caption of the shapes world in "
                         f"{', '.join(map(str, sources))}")
    X, labels = np.concatenate(rows), np.concatenate(labels, axis=1)  # (P, W), (3, P)
    Y = sum(table[group] for table, group in zip(tables, labels))  # (P, hidden)
    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    gram = Xa.T @ Xa
    ridge = 1e-3 * np.trace(gram[:-1, :-1]) / X.shape[1]
    gram[np.arange(X.shape[1]), np.arange(X.shape[1])] += ridge  # the bias is not shrunk
    solution = np.linalg.solve(gram, Xa.T @ Y)  # (W + 1, hidden)
    if log:
        predicted = Xa @ solution
        read = [float(np.mean(np.argmax(predicted @ table.T, axis=1) == group)) for table, group in zip(tables, labels)]
        objects = labels[0] > 0
        on_objects = [float(np.mean(np.argmax(predicted[objects] @ t.T, axis=1) == g[objects]))
                      for t, g in zip(tables, labels)]
        log(f"vit_proj fitted to ideal object embeddings over {len(done)} pictures ({len(X)} kept patches, "
            f"{int(objects.sum())} on objects): R^2 {1 - np.sum((predicted - Y) ** 2) / np.sum((Y - Y.mean(0)) ** 2):.3f}; "
            f"read back colour/shape/cell {read[0]:.1%}/{read[1]:.1%}/{read[2]:.1%} "
            f"({on_objects[0]:.1%}/{on_objects[1]:.1%}/{on_objects[2]:.1%} on objects)")
    return solution[:-1].T.astype(np.float32), solution[-1].astype(np.float32)


# ----------------------------------------------------------------------------- the stage
@stage_builder("llm")
class LLMStage(Stage):
    """Stage 2 (and LoRA fine-tuning): the unified LLM on image-text pairs."""

    name = "llm"

    def __init__(self, config, world):
        super().__init__(config, world)
        import lavit_mlx

        section, self.loss_config = config.model, config.loss
        self.section = section
        self.out = Path(config.out)
        data = config.data
        if not data.train:
            raise LaVITError("data.train: give the JSONL manifest(s) or tar shards of image-text pairs")
        continuing = not (section.language_model or section.llm)  # the init folder's own LLM
        self.lavit = lavit_mlx.load(section.init, vision_heads=section.vision_heads,
                                    quantize=section.quantize if continuing else None, group_size=section.group_size)
        for needed in ("eva", "tokenizer"):
            if not self.lavit.checkpoint.has(needed):
                raise LaVITError(f"model.init: {section.init} has no {needed} (train stage 1 first)")
        self.tokenizer_folder = resolve_text_tokenizer(section, self.lavit, self.out)
        lm, self.llm_config, self.token_ids = build_language_model(section, self.lavit, self.tokenizer_folder)
        from ...models.llm import TextTokenizer

        self.text = TextTokenizer.from_folder(self.tokenizer_folder, self.token_ids)
        table = content_table(self.text, self.loss_config.content_words, self.token_ids.vocab_size)
        self.content_table = None if table is None else mx.array(table)
        understanding, new_projection = build_understanding(self.lavit, lm.hidden_size, self._log,
                                                            section.understanding_init)
        embedding = lm.model.model.embed_tokens
        if new_projection and isinstance(embedding, nn.Embedding):
            scale_projection(understanding.vit_proj, float(mx.sqrt(mx.mean(embedding.weight ** 2))))
        self.model = UnifiedModel(lm, understanding)
        self.model.freeze()
        if section.lora.enabled:
            apply_lora(lm.model, section.lora, self.token_ids)
        else:
            lm.unfreeze()
        self.train_understanding = section.understanding != "frozen"
        if section.understanding == "train":
            understanding.causal_encoder.unfreeze()
        if self.train_understanding and section.train_projection:
            understanding.vit_proj.unfreeze()
        mx.eval(self.model.parameters())
        sources = [s for part in (data.train, data.eval) if part for s in ([part] if isinstance(part, str) else part)]
        self.cache = tokenize_once(self.lavit, understanding, sources, data.lines_per_shard, section.understanding,
                                   section.cache_batch, self._log)
        if not new_projection and section.projection_init != "random":
            self._log(f"model.projection_init {section.projection_init} not applied: the init folder's vit_proj is kept")
        if new_projection and section.projection_init == "scene_labels":
            train_sources = [data.train] if isinstance(data.train, str) else data.train
            weight, bias = fit_projection_to_scenes(
                self.cache, train_sources, data.lines_per_shard, self.lavit.config.vision.patch_size,
                self.lavit.config.vision.image_size, lm.hidden_size,
                float(mx.sqrt(mx.mean(lm.embed(mx.arange(self.token_ids.num_text)) ** 2))), self.config.train.seed,
                section.projection_images, self._log)
            understanding.vit_proj.weight, understanding.vit_proj.bias = mx.array(weight), mx.array(bias)
            mx.eval(understanding.vit_proj.parameters())
        self.lavit.unload("eva", "tokenizer")
        self.stream = self._stream(data.train, shuffle=True)

    # ----- data
    def _log(self, text: str) -> None:
        if self.world.main:
            print(text, file=sys.stderr, flush=True)

    def _stream(self, sources, shuffle: bool) -> DataStream:
        """Training (shuffled, endless, this rank's share) or evaluation (in order, once) examples."""
        data = self.config.data
        stream = DataStream(sources, rank=self.world.rank if shuffle else 0,
                            world_size=self.world.size if shuffle else 1, seed=self.config.train.seed,
                            shuffle_buffer=data.shuffle_buffer if shuffle else 1, shuffle_shards=shuffle,
                            lines_per_shard=data.lines_per_shard, epochs=None if shuffle else 1, load_images=False)
        files = find_files(sources)
        stream.transform = lambda sample: self.example(sample, self.cache.image_of(files, sample), stream.epoch)
        return stream

    def example(self, sample, image: Optional[int], epoch: int) -> Optional[Example]:
        """A data line as an `Example` (None: not used by this run, or its image unreadable);
        the order is drawn from (seed, epoch, shard, index), so a resumed run draws the same."""
        kind = "vqa" if sample.question is not None else "caption"
        if kind not in self.loss_config.samples or image is None:
            return None
        loss = self.loss_config
        rng = np.random.default_rng([self.config.train.seed, epoch, sample.index, zlib.crc32(sample.shard.encode())])
        if kind == "vqa":
            if loss.vqa_fraction < 1.0 and rng.random() >= loss.vqa_fraction:
                return None
            return Example(image, self.text.encode(VQA_PROMPT.format(sample.question)),
                           self.text.encode(sample.answer + loss.answer_suffix), generation=False)
        generation = bool(rng.random() < loss.generation_fraction)
        if not generation:
            return Example(image, [], self.text.encode(sample.text + loss.caption_suffix), generation=False)
        dropped = bool(rng.random() < loss.drop_text)
        return Example(image, [], [] if dropped else self.text.encode(sample.text), generation=True)

    def collate(self, examples: List[Example]) -> Dict[str, mx.array]:
        """Right-padded arrays of a batch (see `loss`)."""
        ids = self.token_ids
        cache = self.cache
        sequences = []
        for e in examples:
            codes = cache.codes[e.image]
            if e.generation:
                sequences.append(generation_sequence(e, codes, ids))
            else:
                # a trained merger runs over all N patches (slot = patch index); frozen
                # embeddings are the kept rows (slot = rank among them)
                slots = np.flatnonzero(cache.keep[e.image]).tolist() if self.section.understanding == "train" \
                    else list(range(len(codes)))
                sequences.append(understanding_sequence(e, codes, slots, ids))
        length = bucket_length(max(len(s.ids) for s in sequences), self.section.bucket,
                               max_length=self.section.max_length)
        B = len(sequences)
        tokens = np.full((B, length), ids.pad, np.int32)
        slots = np.zeros((B, length), np.int32)
        visual = np.zeros((B, length), bool)
        targets = np.zeros((B, length), np.int32)
        kinds = np.zeros((B, length), np.int32)
        for row, s in enumerate(sequences):
            n = min(len(s.ids), length)
            tokens[row, :n], targets[row, :n], kinds[row, :n] = s.ids[:n], s.targets[:n], s.kinds[:n]
            slot = np.asarray(s.slots[:n])
            visual[row, :n] = slot >= 0
            slots[row, :n] = np.maximum(slot, 0)
        text_mask, image_mask = target_masks(kinds, np.array([e.generation for e in examples])[:, None]
                                             & np.ones((1, length), bool), self.loss_config)
        batch = {"ids": tokens, "slots": slots, "visual": visual, "targets": targets,
                 "text_mask": text_mask, "image_mask": image_mask}
        if self.section.understanding == "train":
            batch["features"] = np.stack([cache.inputs[e.image] for e in examples])
            batch["keep"] = np.stack([cache.keep[e.image] for e in examples]).astype(np.float32)
        else:  # the kept rows, padded to the patch count (a fixed shape)
            first = cache.inputs[examples[0].image]
            rows = np.zeros((B, self.lavit.config.vision.num_patches, first.shape[1]), np.float32)
            for row, e in enumerate(examples):
                kept = cache.inputs[e.image]
                rows[row, : len(kept)] = kept
            batch["merged" if self.section.understanding == "projection" else "embeds"] = rows
        return {k: mx.array(v) for k, v in batch.items()}

    def batches(self) -> Iterator[Dict[str, mx.array]]:
        for group in batches(self.stream, self.config.train.batch_size, drop_last=True):
            yield self.collate(group)

    def data_state(self) -> dict:
        return self.stream.state_dict()

    def load_data_state(self, state: dict) -> None:
        if state:
            self.stream.load_state_dict(state)

    def merge_data_states(self, states: List[dict]) -> dict:
        return merge_states(states)

    # ----- the loss
    @staticmethod
    def logits(model: UnifiedModel, batch: Dict[str, mx.array]) -> mx.array:
        """The LLM's float32 logits (B, L, vocab) for a batch's inputs.

        Batch (B sequences of L positions, N patches): ids, slots (B, L) int32; visual (B, L)
        bool (the input is a visual embedding); the image side: features (B, N, W) + keep
        (B, N) when the merger trains, merged (B, N, W) kept merger outputs when only vit_proj
        does, else embeds (B, N, hidden).
        """
        lm = model.llm
        words = lm.embed(batch["ids"])  # (B, L, hidden)
        if "features" in batch:
            embeds = model.understanding(batch["features"], keep=batch["keep"]).visual_embeds  # (B, N, hidden)
        elif "merged" in batch:
            embeds = model.understanding.vit_proj(batch["merged"])  # (B, N, hidden)
        else:
            embeds = batch["embeds"]
        gathered = mx.take_along_axis(embeds, batch["slots"][..., None], axis=1)  # (B, L, hidden)
        inputs = mx.where(batch["visual"][..., None], gathered.astype(words.dtype), words)
        return lm.model(None, input_embeddings=inputs).astype(mx.float32)

    def loss(self, model: UnifiedModel, batch: Dict[str, mx.array]):
        """Next-token cross-entropy over the targets (B, L) that the masks text_mask and
        image_mask (B, L) keep, weighted per modality; inputs as `logits`."""
        logits = self.logits(model, batch)  # (B, L, vocab)
        targets = batch["targets"]
        ce = nn.losses.cross_entropy(logits, targets)  # (B, L)
        right = (mx.argmax(logits, axis=-1) == targets).astype(mx.float32)
        text, image = batch["text_mask"], batch["image_mask"]
        weights = self.loss_config.text_weight * text + self.loss_config.image_weight * image
        count = mx.maximum(mx.sum(text + image), 1.0)
        loss = mx.sum(ce * weights) / count
        n_text, n_image = mx.maximum(mx.sum(text), 1.0), mx.maximum(mx.sum(image), 1.0)
        metrics = {"text_loss": mx.sum(ce * text) / n_text, "image_loss": mx.sum(ce * image) / n_image,
                   "text_accuracy": mx.sum(right * text) / n_text,
                   "image_accuracy": mx.sum(right * image) / n_image}
        if self.content_table is not None:
            content = self.content_table[targets] * text  # (B, L): text targets that are content pieces
            metrics["content_accuracy"] = mx.sum(right * content) / mx.maximum(mx.sum(content), 1.0)
        return loss, metrics

    def evaluate(self) -> Dict[str, float]:
        """Mean loss and accuracies on the first `train.eval_batches` batches of `data.eval`."""
        if not self.config.data.eval:
            return {}
        stream = self._stream(self.config.data.eval, shuffle=False)
        totals: Dict[str, float] = {}
        count = 0
        for group in batches(stream, self.config.train.batch_size):
            loss, metrics = self.loss(self.model, self.collate(group))
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
            if count == self.config.train.eval_batches:
                break
        return {k: v / count for k, v in totals.items()} if count else {}

    # ----- the result
    def lavit_config(self) -> LaVITConfig:
        return self.lavit.config.replace(llm=self.llm_config, understanding_dim=self.model.llm.hidden_size,
                                         token_ids=self.token_ids)

    def adapter_info(self) -> dict:
        return {"base_model": str(Path(self.section.init).resolve()), "token_ids": self.token_ids.to_dict(),
                "quantize": self.section.quantize, "understanding_dim": self.model.llm.hidden_size}

    def export(self, folder: Path) -> None:
        """`model.export`: the adapter into the run folder, and/or a complete MLX folder in
        `folder` (a copy of the init folder with the new LLM, its tokenizer and understanding)."""
        section = self.section
        lm, understanding = self.model.llm, self.model.understanding
        if section.export in ("adapter", "both"):
            save_adapter(self.out, lm.model, section.lora, self.adapter_info(),
                         understanding if self.train_understanding else None)
        if section.export == "adapter":
            return
        if section.lora.enabled:
            fuse_llm(lm.model, dequantize=True)
        if section.quantize:
            from mlx_lm.utils import dequantize_model

            dequantize_model(lm.model)
        copy_model_folder(Path(section.init), folder)
        from ...export import save_components

        dtype = DTYPES.get(section.export_dtype) if section.export_dtype else None
        save_components(folder, self.lavit_config(), {"llm": lm, "understanding": understanding}, dtype=dtype,
                        text_tokenizer=self.tokenizer_folder)
        self._log(f"wrote {folder}")


def copy_model_folder(source: Path, folder: Path, replaced=("llm", "understanding")) -> None:
    """The MLX folder `source`'s files into `folder`, except those of the `replaced` components
    (written next) and the manifest (rewritten)."""
    from ...checkpoint import Checkpoint
    from ...layout import MLX_FORMAT, RELEASE_FOLDERS

    if Checkpoint.open(source).kind != "mlx":
        raise LaVITError(f"model.init: {source} is in the released layout; convert it first (lavit convert) "
                         "to export a model folder")
    skip = {MLX_FORMAT["manifest"]} | {RELEASE_FOLDERS.get(name) or MLX_FORMAT["files"][name] for name in replaced}
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in skip or path.resolve() == folder.resolve():
            continue
        target = folder / path.name
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, target)


__all__ = ["LLMStage", "LLMModelSection", "LLMLossSection", "Example", "Sequence", "understanding_sequence",
           "generation_sequence", "tokenize_once", "grow_vocabulary"]
