"""The encoder stage: a small EVA ViT for a new world, pretrained CLIP-style on its captions.

LaVIT's tokenizer reads a frozen pretrained CLIP ViT (EVA-CLIP ViT-g/14, reference section
3); a world without one needs its own. This stage trains the project's own
`EVAVisionTransformer` (so the tokenizer stage and the CLI use it unchanged) with:

- CLIP's symmetric InfoNCE between the image embedding (`head(norm(CLS))`, EVA-CLIP's
  own head) and a small causal text transformer over the text tokenizer's ids (the
  embedding at the eos, CLIP's pooling), with a learned temperature. Captions that occur
  twice in a batch are both positives (a one-object world repeats captions often);
- an auxiliary per-patch pixel prediction: a linear head on every normed patch feature
  predicts that patch's pixels pooled to `patch_grid` x `patch_grid`. Why: the tokenizer
  needs patch features that say what each patch holds (background or which colour and
  outline) and where, and the contrastive signal alone reaches the patches only through
  the CLS token; in the few hundred steps this stage has on a CPU it mostly learns the
  colours. The dense term costs one small matmul and is world-agnostic (no labels), and
  the head is dropped at export;
- optionally (`loss.position_weight`, default 0: off) a per-patch position regression: a
  linear head on the normed patch features predicts each patch's (row, column) in the
  grid, on every patch (`loss.position_on: all`) or only on the patches that hold
  something other than the picture's background (`content`: a patch any of whose pooled
  pixel cells is off the picture's median patch, `content_patches`). Why: EVA adds its
  position embedding once, at the input, and on the patches that hold an object the
  content drowns it. A linear probe of an encoder trained without the term reads an object
  patch's 3 x 3 cell right 26% of the time (chance 14%), so the LLM, which sees only the
  kept patches' features in raster order, cannot say where an object is. Measured on the
  shapes world (500 steps, patch_grid 7), the probe reads the cell right 83% of the time
  with the term on every patch and 82% with it on content only; but on every patch it also
  gives the background patches position to carry, and the tokenizer's selector over such
  features keeps a nearly fixed set of positions whatever the picture holds (19 / 21 / 24
  tokens for 1 / 2 / 3 objects), while on content only the selection follows the objects
  (7.5 / 22.8 / 33.5). Over that encoder the LLM stage (1400 steps) still captioned places
  right only 21% of the time and colours 58% (80% in the bundled model), so the bundled
  model does not use the term: the LLM does not yet read the place the features carry.
- optionally (`loss.object_weight`, default 0: off; the shapes world only) a per-patch
  object term: a linear head on every normed patch feature classifies the colour, shape
  and cell of the object the patch shows (or none), cross-entropy against labels the
  world's generator knows (`lavit_mlx.shapes.world.patch_objects`: the caption's object
  in the cell that holds most of the patch's ink). Why: a pretrained CLIP's patch
  features already say which object a patch belongs to; this encoder's, after a few
  hundred contrastive steps, hold the patch's own colour and little else, and the LLM
  cannot bind shape and place from them. Measured: with ideal object-level inputs (each
  kept token the sum of its object's colour, shape and cell embeddings) the same tiny LLM
  reaches 95% held-out caption-token accuracy in 600 steps on captions alone; over this
  term's encoder (weight 2, 400 steps: a linear probe reads an object patch's colour 99.5%,
  cell 87%, shape 56%, against 91%, 24%, 47% without it) the same run reaches 81%. The
  term is dense supervision from the synthetic world, stated as such in the model card,
  not something LaVIT's recipe has. Its accuracy rises late: at weight 4 over 1000 steps
  (the bundled model's encoder) the fraction of object patches with all three right was
  23% at step 300, 76% at 400, 93% at 600 and 98% held out at 1000, where a ridge probe of
  the features (before the final norm) reads colour 99.7%, shape 98.5% and cell 97.9%.

Negatives are the rank's own batch (no all_gather). Only `eva` is exported (with its
config) into `out/model` via `save_components`; the text tower is a training aid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from ...config import EVAConfig, LaVITConfig, TokenIds, mlp_width
from ...data import DataStream, batches, merge_states
from ...errors import LaVITError
from ...image_processing import preprocess
from ...models.eva_vit import EVAVisionTransformer
from ...shapes.world import PATCH_CLASSES, patch_objects
from ..config import RunConfig, register_stage
from ..loop import Stage, World
from . import stage_builder

INIT_STD = 0.02  # position embeddings and CLS token, as timm/EVA initialise them
POSITION_ON = ("all", "content")
CONTENT_TOLERANCE = 0.3  # normalised pixel units (~0.08 of the 0..1 range): a cell this far off the background is content


@dataclass
class EncoderModel:
    """`model:` of the encoder stage: the EVA sizes and the text tower's."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 0  # 0: int(width * 4.3637), the release's ratio
    patch_size: int = 28
    embed_dim: int = 128  # the CLIP head's output (EVA's `head`)
    text_tokenizer: str = ""  # folder holding the sentencepiece tokenizer.model
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_length: int = 48  # caption ids (with the eos) padded or cut to this

    def check(self) -> None:
        if not self.text_tokenizer:
            raise LaVITError("model.text_tokenizer: the folder of the text tokenizer (tokenizer.model) is required")
        for heads, width, name in ((self.num_heads, self.width, "model.num_heads"),
                                   (self.text_heads, self.text_width, "model.text_heads")):
            if heads < 1 or width % heads:
                raise LaVITError(f"{name} {heads} does not divide the width {width}")

    def eva_config(self, image_size: int) -> EVAConfig:
        if image_size % self.patch_size:
            raise LaVITError(f"model.patch_size {self.patch_size} does not divide data.image_size {image_size}")
        return EVAConfig(width=self.width, depth=self.depth, num_heads=self.num_heads,
                         mlp_dim=self.mlp_dim or mlp_width(self.width), patch_size=self.patch_size,
                         image_size=image_size, head_dim_out=self.embed_dim)


@dataclass
class EncoderLoss:
    """`loss:` of the encoder stage."""

    temperature: float = 0.07  # initial softmax temperature (CLIP's), then learned
    max_logit_scale: float = 100.0  # CLIP clamps 1/temperature here
    patch_weight: float = 1.0  # the auxiliary per-patch pixel prediction (0: off)
    patch_grid: int = 4  # each patch's pixels pooled to grid x grid per colour channel
    position_weight: float = 0.0  # the auxiliary per-patch position regression (0: off)
    position_on: str = "all"  # the patches it applies to: all, or content (those unlike the picture's background)
    object_weight: float = 0.0  # the per-patch object term on the shapes world's scene labels (0: off)

    def check(self) -> None:
        if not 0 < self.temperature < 1:
            raise LaVITError(f"loss.temperature {self.temperature}: expected between 0 and 1")
        if self.patch_grid < 1 or self.patch_weight < 0:
            raise LaVITError("loss.patch_grid must be at least 1 and loss.patch_weight at least 0")
        if self.position_weight < 0:
            raise LaVITError(f"loss.position_weight {self.position_weight}: expected at least 0")
        if self.object_weight < 0:
            raise LaVITError(f"loss.object_weight {self.object_weight}: expected at least 0")
        if self.position_on not in POSITION_ON:
            raise LaVITError(f"loss.position_on {self.position_on!r}: choose among {', '.join(POSITION_ON)}")


register_stage("encoder", EncoderModel, EncoderLoss,
               {"steps": 400, "batch_size": 64, "learning_rate": 1e-3, "warmup_steps": 40, "weight_decay": 0.05,
                "beta2": 0.98})


# ----------------------------------------------------------------------------- data
def stack(examples: List[dict]) -> Dict[str, mx.array]:
    return {key: mx.array(np.stack([example[key] for example in examples])) for key in examples[0]}


class ImageData:
    """Batches of processed pictures (plus what `example` adds) from one `DataStream`, whose
    cursor is the stage's data state. Shared by the encoder and tokenizer stages."""

    def __init__(self, config: RunConfig, world: World, example: Callable, sources=None, epochs=None,
                 shuffle: bool = True):
        data = config.data
        self.batch_size = config.train.batch_size
        self.image_size = data.image_size
        self.example = example
        self.stream = DataStream(sources if sources is not None else data.train, rank=world.rank,
                                 world_size=world.size, seed=config.train.seed,
                                 shuffle_buffer=data.shuffle_buffer if shuffle else 1, shuffle_shards=shuffle,
                                 lines_per_shard=data.lines_per_shard, epochs=epochs, transform=self._transform)

    def _transform(self, sample):
        fields = self.example(sample)
        if fields is None:
            return None
        return {"pixels": preprocess([sample.image], self.image_size)[0], **fields}

    def __iter__(self) -> Iterator[Dict[str, mx.array]]:
        for group in batches(self.stream, self.batch_size, drop_last=True):
            yield stack(group)

    def state(self) -> dict:
        return self.stream.state_dict()

    def load(self, state: dict) -> None:
        if state:
            self.stream.load_state_dict(state)

    def close(self) -> Optional[str]:
        from ...data import format_stats

        return format_stats(self.stream.stats)


def eval_sources(config: RunConfig):
    """The eval manifest, or the training one when none is given."""
    return config.data.eval if config.data.eval is not None else config.data.train


# ----------------------------------------------------------------------------- model
def l2_normalize(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_vision_transformer(eva: EVAVisionTransformer) -> None:
    """Random position embeddings and CLS token (the module's zeros are placeholders for loading)."""
    eva.pos_embed = INIT_STD * mx.random.normal(eva.pos_embed.shape)
    eva.cls_token = INIT_STD * mx.random.normal(eva.cls_token.shape)


class TextEncoder(nn.Module):
    """CLIP's text tower at a small size: causal pre-norm transformer, the eos position pooled."""

    def __init__(self, vocab_size: int, length: int, width: int, depth: int, heads: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = INIT_STD * mx.random.normal((length, width))
        self.transformer = nn.TransformerEncoder(depth, width, heads, mlp_dims=4 * width, activation=nn.gelu)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)

    def __call__(self, ids: mx.array, lengths: mx.array) -> mx.array:
        """Embeddings (B, embed_dim) of ids (B, L) whose last real id (the eos) is at lengths - 1."""
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x = self.transformer(x, nn.MultiHeadAttention.create_additive_causal_mask(L))
        eos = mx.take_along_axis(x, (lengths - 1)[:, None, None].astype(mx.int32), axis=1)[:, 0]
        return self.text_projection(eos)


class ContrastivePretraining(nn.Module):
    """EVA + text tower + learned temperature + the auxiliary patch head (training only)."""

    def __init__(self, eva_config: EVAConfig, model: EncoderModel, vocab_size: int, loss: EncoderLoss):
        super().__init__()
        self.eva = EVAVisionTransformer(eva_config)
        init_vision_transformer(self.eva)
        self.text = TextEncoder(vocab_size, model.text_length, model.text_width, model.text_depth,
                                model.text_heads, model.embed_dim)
        self.logit_scale = mx.array([math.log(1.0 / loss.temperature)])
        self.patch_head = nn.Linear(eva_config.width, 3 * loss.patch_grid ** 2)
        if loss.position_weight > 0:
            self.position_head = nn.Linear(eva_config.width, 2)
        if loss.object_weight > 0:
            self.object_head = nn.Linear(eva_config.width, sum(PATCH_CLASSES))


def patch_positions(grid: int) -> mx.array:
    """Each patch's (row, column) centre in raster order, scaled to [-1, 1]: (grid * grid, 2)."""
    centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid * 2.0 - 1.0
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    return mx.array(np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1))


def content_patches(pooled: mx.array, tolerance: float = CONTENT_TOLERANCE) -> mx.array:
    """1.0 for the patches that hold something other than the picture's background, else 0.0: (B, patches).

    `pooled` (B, patches, cells) are the patches' pooled pixels (`pooled_patches`); the
    background is, cell by cell, the median over the picture's patches (most of a picture
    is background in a world of objects on a plain canvas), and a patch holds content when
    any of its cells is further than `tolerance` from it.
    """
    middle = mx.sort(pooled, axis=1)[:, pooled.shape[1] // 2 : pooled.shape[1] // 2 + 1]  # (B, 1, cells)
    return (mx.max(mx.abs(pooled - middle), axis=-1) > tolerance).astype(mx.float32)


def pooled_patches(pixels: mx.array, patch: int, grid: int) -> mx.array:
    """Each patch's pixels averaged to grid x grid: (B, 3, H, W) -> (B, patches, 3 * grid * grid)."""
    B, C, H, W = pixels.shape
    cell = patch // grid
    x = pixels.reshape(B, C, H // patch, grid, cell, W // patch, grid, cell).mean(axis=(4, 7))
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, grid, grid)
    return x.reshape(B, (H // patch) * (W // patch), C * grid * grid)


def object_loss(logits: mx.array, labels: mx.array) -> tuple:
    """(the colour, shape and cell classifications' cross-entropy, its mean over the object
    patches plus its mean over the others; the fraction of object patches with all three right).

    The two means weigh the few object patches as much as the many background ones, whose
    "none" is learnt at once. logits (B, patches, sum(PATCH_CLASSES)); labels (B, 3,
    patches) class indices, 0: none.
    """
    ce, all_right, start = 0.0, None, 0
    for part, classes in enumerate(PATCH_CLASSES):
        scores, target = logits[..., start:start + classes], labels[:, part]
        ce = ce + nn.losses.cross_entropy(scores, target) / len(PATCH_CLASSES)  # (B, patches)
        right = mx.argmax(scores, axis=-1) == target
        all_right = right if all_right is None else all_right & right
        start += classes
    objects = (labels[:, 0] > 0).astype(mx.float32)
    count, others = mx.maximum(mx.sum(objects), 1.0), mx.maximum(mx.sum(1.0 - objects), 1.0)
    loss = mx.sum(ce * objects) / count + mx.sum(ce * (1.0 - objects)) / others
    return loss, mx.sum(all_right.astype(mx.float32) * objects) / count


# ----------------------------------------------------------------------------- the stage
@stage_builder("encoder")
class EncoderStage(Stage):
    """`lavit train encoder`: pretrain the world's EVA (see the module docstring)."""

    name = "encoder"

    def __init__(self, config: RunConfig, world: World):
        super().__init__(config, world)
        from ...models.llm import TextTokenizer

        self.model_config: EncoderModel = config.model
        self.loss_config: EncoderLoss = config.loss
        if self.model_config.patch_size % self.loss_config.patch_grid:
            raise LaVITError(f"loss.patch_grid {self.loss_config.patch_grid} does not divide "
                             f"model.patch_size {self.model_config.patch_size}")
        folder = Path(self.model_config.text_tokenizer).expanduser()
        self.text_tokenizer = TextTokenizer(folder / "tokenizer.model")
        self.vocab_size = self.text_tokenizer.sp.get_piece_size()
        self.eva_config = self.model_config.eva_config(config.data.image_size)
        self.model = ContrastivePretraining(self.eva_config, self.model_config, self.vocab_size, self.loss_config)
        self.data = ImageData(config, world, self._caption_ids)

    def _caption_ids(self, sample) -> Optional[dict]:
        if not sample.text:
            return None  # a VQA line: this stage learns from captions
        eos = self.text_tokenizer.token_ids.eos
        ids = (self.text_tokenizer.encode(sample.text) + [eos])[: self.model_config.text_length]
        padded = np.full((self.model_config.text_length,), eos, np.int32)
        padded[: len(ids)] = ids
        fields = {"text": padded, "length": np.int32(len(ids))}
        if self.loss_config.object_weight > 0:
            size = self.config.data.image_size
            picture = sample.image.convert("RGB").resize((size, size), Image.NEAREST)
            try:
                colour, shape, cell = patch_objects(picture, sample.text, self.eva_config.patch_size)
            except LaVITError as error:
                raise LaVITError(f"loss.object_weight needs the shapes world's captions: {error}") from None
            fields["objects"] = np.stack([colour, shape, cell])  # (3, patches)
        return fields

    def loss(self, model, batch):
        features = model.eva(batch["pixels"])  # (B, 1 + patches, width), before the final norm
        normed = model.eva.norm(features)
        image = l2_normalize(model.eva.head(normed[:, 0]))
        text = l2_normalize(model.text(batch["text"], batch["length"]))
        scale = mx.exp(mx.minimum(model.logit_scale[0], math.log(self.loss_config.max_logit_scale)))
        logits = scale * (image @ text.T)  # (B, B) image i against caption j
        ids = batch["text"]
        same = mx.all(ids[:, None, :] == ids[None, :, :], axis=-1).astype(mx.float32)  # identical captions
        targets = same / mx.sum(same, axis=-1, keepdims=True)
        image_to_text = -mx.mean(mx.sum(targets * nn.log_softmax(logits, axis=-1), axis=-1))
        text_to_image = -mx.mean(mx.sum(targets * nn.log_softmax(logits.T, axis=-1), axis=-1))
        contrastive = (image_to_text + text_to_image) / 2
        metrics = {"contrastive": contrastive, "logit_scale": scale,
                   "retrieval_accuracy": mx.mean(mx.take_along_axis(same, mx.argmax(logits, axis=-1)[:, None],
                                                                    axis=1))}
        loss = contrastive
        pooled = pooled_patches(batch["pixels"], self.eva_config.patch_size, self.loss_config.patch_grid)
        if self.loss_config.patch_weight > 0:
            patch = mx.mean((model.patch_head(normed[:, 1:]) - pooled) ** 2)
            metrics["patch_pixels"] = patch
            loss = loss + self.loss_config.patch_weight * patch
        if self.loss_config.position_weight > 0:
            grid = self.eva_config.image_size // self.eva_config.patch_size
            error = mx.mean((model.position_head(normed[:, 1:]) - patch_positions(grid)) ** 2, axis=-1)  # (B, P)
            if self.loss_config.position_on == "content":
                where = content_patches(pooled)
                position = mx.sum(error * where) / mx.maximum(mx.sum(where), 1.0)
            else:
                position = mx.mean(error)
            metrics["patch_position"] = position
            loss = loss + self.loss_config.position_weight * position
        if self.loss_config.object_weight > 0:
            term, right = object_loss(model.object_head(normed[:, 1:]), batch["objects"])
            metrics["patch_objects"], metrics["object_accuracy"] = term, right
            loss = loss + self.loss_config.object_weight * term
        return loss, metrics

    def batches(self):
        return iter(self.data)

    def data_state(self) -> dict:
        return self.data.state()

    def load_data_state(self, state: dict) -> None:
        self.data.load(state)

    def merge_data_states(self, states):
        return merge_states(states)

    def evaluate(self) -> Dict[str, float]:
        """Contrastive loss, retrieval accuracy (image -> caption within a batch) and patch loss
        over `train.eval_batches` batches of the eval data."""
        data = ImageData(self.config, self.world, self._caption_ids, sources=eval_sources(self.config), epochs=1,
                         shuffle=False)
        totals: Dict[str, float] = {}
        count = 0
        for index, batch in enumerate(data):
            if index == self.config.train.eval_batches:
                break
            _, metrics = self.loss(self.model, batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        return {key: value / max(count, 1) for key, value in totals.items() if key != "logit_scale"}

    def export(self, folder: Path) -> None:
        config = LaVITConfig(vision=self.eva_config, token_ids=TokenIds(num_text=self.vocab_size))
        self.model.eva.eval()
        from ...export import save_components

        save_components(folder, config, {"eva": self.model.eva})

    def close(self) -> None:
        import sys

        if self.world.main:
            print(f"encoder data: {self.data.close()}", file=sys.stderr)
