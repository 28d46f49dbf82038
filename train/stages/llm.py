"""Stage 2 in PyTorch: the unified LLM (reference section 5 item 2), on transformers' LLaMA.

The loss is the MLX llm stage's (`lavit_mlx/training/stages/llm.py`): image-text pairs laid
out as [image, text] (the merger's continuous embeddings of the kept patches in, the
visual ids as their next-token targets) or [text, image] (ids only), next-token
cross-entropy in float32 over the masked targets, `text_weight`/`image_weight` per
modality, normalised by the number of counted targets (`sequences.py` has the layout).

What differs is where the images are tokenized: the MLX stage runs the frozen encoder and
tokenizer once over a data set that fits a laptop; here every step runs them (frozen,
bf16 on CUDA) on the batch's pixels, as LAION-scale data requires. The understanding
selector's deterministic rule picks the kept patches, the discrete tokenizer gives their
codes with that selection, the merger + `vit_proj` (trained with the LLM; `model.understanding:
projection` trains `vit_proj` alone, `frozen` neither) their embeddings: the same inputs and targets as the MLX
stage for the same images. The target count is the global batch's (as stage 1's counts).

The LLM comes from a text LLaMA folder (`model.language_model`, Hugging Face layout), its
vocabulary grown by [IMG], [/IMG] and the codebook rows (each new row the mean of the text
rows plus `grow_noise` x their per-dim std x N(0, 1), the MLX stage's rule), from sizes
(`model.llm`, normal init with `init_std`), or from the init folder's `language_model/`.
LoRA and QLoRA fine-tuning stay in MLX (`lavit finetune`); this trainer pretrains in full.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import LLMConfig, TokenIds
from lavit_mlx.errors import LaVITError
from lavit_mlx.layout import RELEASE_FILES, RELEASE_FOLDERS
from lavit_mlx.training.stages.llm import content_table

from .. import checkpoint as release
from ..data import StreamLoader, eval_loader, even_batches
from ..distributed import World, unsharded
from ..loop import Launch, Stage, checkpoint_blocks
from ..models.visual_tokenizer import DynamicVisualTokenizer
from ..sections import LLMLossSection, LLMModelSection
from . import save_release, stage_builder
from .sequences import VQA_PROMPT, arrangement, layout, pair_rng, vqa_used

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


# ----------------------------------------------------------------------------- building the LLM
def grown_rows(weight: torch.Tensor, count: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`count` new rows: the mean of `weight`'s rows plus `noise` x their per-dim std x N(0, 1)."""
    rows = weight.float()
    mean, std = rows.mean(dim=0, keepdim=True), rows.var(dim=0, unbiased=False, keepdim=True).sqrt()
    draw = torch.randn(count, weight.shape[1], generator=generator)
    return (mean + noise * std * draw).to(weight.dtype)


def grow_vocabulary(llm, token_ids: TokenIds, noise: float, seed: int) -> None:
    """A text LLaMA's embedding (and untied head) grown to `token_ids.vocab_size` in place."""
    old = llm.get_input_embeddings().weight.shape[0]
    count = token_ids.vocab_size - old
    generator = torch.Generator().manual_seed(seed)
    llm.resize_token_embeddings(token_ids.vocab_size, mean_resizing=False)
    with torch.no_grad():
        embedding = llm.get_input_embeddings().weight
        embedding[old:] = grown_rows(embedding[:old], count, noise, generator)
        head = llm.get_output_embeddings()
        if head is not None and head.weight is not embedding:
            head.weight[old:] = grown_rows(head.weight[:old], count, noise, generator)


def llama_config(config: LLMConfig, init_std: float = 0.02):
    from transformers import LlamaConfig

    hf = config.to_hf()
    hf.setdefault("initializer_range", init_std)
    return LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype", "dtype")})


def build_language_model(section: LLMModelSection, init: Path, codebook: int, tokenizer_folder: Path, seed: int):
    """(LlamaForCausalLM in float32, its LLMConfig, TokenIds) as the MLX stage builds them."""
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    if section.language_model:
        folder = Path(section.language_model).expanduser()
        if not (folder / "config.json").is_file():
            raise LaVITError(f"model.language_model: {folder} has no config.json")
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("quantization"):
            raise LaVITError(f"model.language_model: {folder} is stored quantized; grow an unquantized LLaMA")
        llm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        token_ids = TokenIds(num_text=int(raw["vocab_size"]), codebook_size=codebook)
        grow_vocabulary(llm, token_ids, section.grow_noise, seed)
        config = LLMConfig.from_hf({**raw, "vocab_size": token_ids.vocab_size})
    elif section.llm:
        pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model")).get_piece_size()
        token_ids = TokenIds(num_text=pieces, codebook_size=codebook)
        config = LLMConfig.from_hf({"model_type": "llama", **section.llm, "vocab_size": token_ids.vocab_size},
                                   "model.llm")
        llm = LlamaForCausalLM(llama_config(config, section.init_std))
    else:
        folder = init / RELEASE_FOLDERS["llm"]
        if not (folder / "config.json").is_file():
            raise LaVITError(f"{init} has no LLM: give model.llm (sizes) or model.language_model")
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("quantization"):
            raise LaVITError(f"{folder} is stored quantized: train from an unquantized LLM")
        llm = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = LLMConfig.from_hf(raw)
        token_ids = TokenIds.for_vocab(config.vocab_size, codebook)
    if token_ids.codebook_size != codebook:
        raise LaVITError(f"the LLM has {token_ids.codebook_size} visual ids, the tokenizer {codebook} codes")
    return llm, config, token_ids


def text_tokenizer_folder(section: LLMModelSection, init: Path) -> Path:
    if section.text_tokenizer == "shapes":
        raise LaVITError("model.text_tokenizer: the shapes world's tokenizer is trained by the MLX stage; "
                         "give its folder")
    if section.text_tokenizer:
        folder = Path(section.text_tokenizer).expanduser()
    elif section.language_model:
        folder = Path(section.language_model).expanduser()
    else:
        folder = init / RELEASE_FOLDERS["llm"]
    if not (folder / "tokenizer.model").is_file():
        raise LaVITError(f"model.text_tokenizer: {folder} has no tokenizer.model")
    return folder


def build_understanding(init: Path, hidden: int, heads: Optional[int], embed_rms: float,
                        start: str = "tokenizer"):
    """The init folder's understanding path, or one made from its tokenizer (selector and
    merger copied, as the release loads `visual_weight.bin` over the tokenizer) with a new
    `vit_proj` whose outputs start as large as a word embedding (RMS `embed_rms`).
    `start="identity"`: the new merger's output projections zeroed, so that it passes the
    features through (the MLX stage's `build_understanding` says why)."""
    if release.has_component(init, "understanding"):
        module = release.load_tokenizer(init, heads, understanding=True)
        if module.vit_proj.out_features == hidden:
            return module
    tokenizer = release.load_tokenizer(init, heads)
    module = DynamicVisualTokenizer(tokenizer.config, quantizer=False, llm_hidden=hidden)
    kept = {k: v for k, v in tokenizer.state_dict().items() if k.startswith(("token_predictor.", "causal_encoder."))}
    module.load_state_dict({**module.state_dict(), **kept})
    with torch.no_grad():
        width = module.vit_proj.weight.shape[1]
        module.vit_proj.weight.normal_(0.0, embed_rms / width ** 0.5)
        module.vit_proj.bias.zero_()
        if start == "identity":
            for block in module.causal_encoder.blocks:
                for layer in (block.token_causal_attn.proj, block.token_cross_attn.proj, block.mlp.fc2):
                    layer.weight.zero_()
                    layer.bias.zero_()
    return module


# ----------------------------------------------------------------------------- the training module
class UnifiedTraining(nn.Module):
    """Frozen EVA and discrete tokenizer, the understanding path and the LLM; forward = the loss."""

    def __init__(self, eva, tokenizer, understanding, llm, token_ids: TokenIds, section: LLMModelSection,
                 loss: LLMLossSection, world: World):
        super().__init__()
        self.eva, self.tokenizer, self.understanding, self.llm = eva, tokenizer, understanding, llm
        self.token_ids, self.section, self.loss_config, self.world = token_ids, section, loss, world
        self.understanding_mode = section.understanding  # train | projection | frozen
        self.content = None  # (vocab,) 1 at the pieces of loss.content_words (set by the stage)

    @torch.no_grad()
    def train(self, mode: bool = True):
        """Training mode for what trains; the frozen encoders stay in inference mode."""
        super().train(mode)
        for frozen in (self.eva, self.tokenizer,):
            frozen.eval()
        return self

    def tokenize(self, pixels: torch.Tensor):
        """Patch features, the understanding selector's keep mask and the discrete codes (frozen)."""
        dtype = self.eva.patch_embed.proj.weight.dtype
        patches = self.eva(pixels.to(dtype))[:, 1:].float()
        selector = self.understanding.token_predictor
        keep = self.understanding.select(selector(patches.to(selector.in_conv[1].weight.dtype)).float())
        codes = self.tokenizer(patches.to(self.tokenizer.encode_task_layer[0].weight.dtype), keep=keep).codes
        return patches, keep, codes

    def forward(self, batch: Dict):
        world, cfg = self.world, self.loss_config
        patches, keep, codes = self.tokenize(batch["pixels"])
        arrays = layout(batch["examples"], (keep > 0.5).cpu().numpy(), codes.cpu().numpy(), self.token_ids, cfg,
                        self.section.bucket, self.section.max_length, features=True)
        device = patches.device
        ids, slots, targets = (torch.from_numpy(arrays[k]).to(device) for k in ("ids", "slots", "targets"))
        visual = torch.from_numpy(arrays["visual"]).to(device)
        text, image = (torch.from_numpy(arrays[k]).to(device) for k in ("text_mask", "image_mask"))
        words = self.llm.get_input_embeddings()(ids)  # (B, L, hidden)
        if self.understanding_mode == "train":
            embeds = self.understanding(patches, keep=keep).visual_embeds  # (B, N, hidden)
        elif self.understanding_mode == "projection":  # the merger frozen, vit_proj trained
            with torch.no_grad():
                merged = self.understanding.causal_encoder(patches, keep)
            embeds = self.understanding.vit_proj(merged)
        else:
            with torch.no_grad():
                embeds = self.understanding(patches, keep=keep).visual_embeds
        gathered = torch.gather(embeds, 1, slots[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, L, hidden)
        inputs = torch.where(visual[..., None], gathered.to(words.dtype), words)
        logits = self.llm(inputs_embeds=inputs).logits.float()  # (B, L, vocab)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
        right = (logits.argmax(dim=-1) == targets).float()
        weights = cfg.text_weight * text + cfg.image_weight * image
        count = world.global_sum((text + image).sum()).clamp_min(1.0) / world.size
        loss = (ce * weights).sum() / count
        n_text = world.global_sum(text.sum()).clamp_min(1.0) / world.size
        n_image = world.global_sum(image.sum()).clamp_min(1.0) / world.size
        metrics = {"text_loss": (ce * text).sum() / n_text, "image_loss": (ce * image).sum() / n_image,
                   "text_accuracy": (right * text).sum() / n_text,
                   "image_accuracy": (right * image).sum() / n_image,
                   "tokens_per_image": world.global_sum(keep.sum()) / (world.size * keep.shape[0])}
        if self.content is not None:
            content = self.content[targets] * text
            n_content = world.global_sum(content.sum()).clamp_min(1.0) / world.size
            metrics["content_accuracy"] = (right * content).sum() / n_content
        return loss, metrics


# ----------------------------------------------------------------------------- the stage
@stage_builder("llm")
class LLMStage(Stage):
    """`python -m lavit_train llm`: stage 2, the unified LLM (see the module docstring)."""

    name = "llm"

    def __init__(self, config, world: World, launch: Launch):
        super().__init__(config, world, launch)
        section: LLMModelSection = config.model
        self.section, self.loss_config = section, config.loss
        if section.lora.enabled or section.quantize:
            raise LaVITError("model.lora / model.quantize: LoRA and QLoRA fine-tuning run in MLX (lavit finetune); "
                             "the PyTorch trainer trains the whole LLM")
        if not config.data.train:
            raise LaVITError("data.train: give the JSONL manifest(s) or tar shards of image-text pairs")
        self.init = Path(section.init).expanduser()
        heads = section.vision_heads or launch.vision_heads
        for needed in ("eva", "tokenizer"):
            if not release.has_component(self.init, needed):
                raise LaVITError(f"model.init: {self.init} has no {needed} (train stage 1 first)")
        eva = release.load_eva(self.init, heads).requires_grad_(False)
        tokenizer = release.load_tokenizer(self.init, heads).requires_grad_(False)
        self.tokenizer_folder = text_tokenizer_folder(section, self.init)
        llm, self.llm_config, self.token_ids = build_language_model(
            section, self.init, tokenizer.config.codebook_size, self.tokenizer_folder, config.train.seed)
        embed_rms = float(llm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        understanding = build_understanding(self.init, llm.config.hidden_size, heads, embed_rms,
                                            section.understanding_init)
        understanding.requires_grad_(False)
        if section.understanding == "train":
            understanding.causal_encoder.requires_grad_(True)
        if section.understanding != "frozen":
            understanding.vit_proj.requires_grad_(True)
        from lavit_mlx.models.llm import TextTokenizer  # the MLX trainer's encoding, exactly

        self.text = TextTokenizer.from_folder(self.tokenizer_folder, self.token_ids)
        if world.cuda:
            eva, tokenizer = eva.to(torch.bfloat16), tokenizer.to(torch.bfloat16)
        self.module = UnifiedTraining(eva.eval(), tokenizer.eval(), understanding, llm, self.token_ids, section,
                                      self.loss_config, world).to(world.device)
        table = content_table(self.text, self.loss_config.content_words, self.token_ids.vocab_size)
        if table is not None:
            self.module.content = torch.from_numpy(table).to(world.device)  # moved once, not per step
        self.data = self._loader(config.data.train, shuffle=True)

    # ----- data
    def example(self, sample, stream) -> Optional[dict]:
        """A data line as the MLX stage reads it (None: not used by this run)."""
        from lavit_mlx.image_processing import preprocess

        kind = "vqa" if sample.question is not None else "caption"
        loss = self.loss_config
        if kind not in loss.samples:
            return None
        rng = pair_rng(self.config.train.seed, stream.epoch, sample.index, sample.shard)
        if kind == "vqa":
            if not vqa_used(rng, loss):
                return None
            entry = {"prompt": self.text.encode(VQA_PROMPT.format(sample.question)),
                     "text": self.text.encode(sample.answer + loss.answer_suffix), "generation": False}
        else:
            generation, dropped = arrangement(rng, loss)
            if not generation:
                entry = {"prompt": [], "text": self.text.encode(sample.text + loss.caption_suffix),
                         "generation": False}
            else:
                entry = {"prompt": [], "text": [] if dropped else self.text.encode(sample.text), "generation": True}
        size = self.module.eva.config.image_size
        return {"pixels": preprocess([sample.image], size)[0], "entry": entry}

    @staticmethod
    def collate(examples: List[dict]) -> dict:
        return {"pixels": torch.from_numpy(np.stack([e["pixels"] for e in examples])),
                "examples": [e["entry"] for e in examples]}

    def _loader(self, sources, shuffle: bool):
        data = self.config.data
        return StreamLoader(sources, self.world, self.config.train.batch_size, self.example, self.collate,
                            workers=self.launch.workers if shuffle else 0, seed=self.config.train.seed,
                            shuffle_buffer=data.shuffle_buffer, lines_per_shard=data.lines_per_shard,
                            epochs=None if shuffle else 1, shuffle=shuffle)

    def batches(self):
        return iter(self.data)

    def data_state(self) -> dict:
        return self.data.state_dict()

    def load_data_state(self, state: dict) -> None:
        if state:
            self.data.load_state_dict(state)

    # ----- the model
    def blocks(self) -> List[nn.Module]:
        return [*self.module.llm.model.layers, *self.module.understanding.causal_encoder.blocks]

    def frozen(self) -> List[nn.Module]:
        return [self.module.eva, self.module.tokenizer, self.module.understanding.token_predictor]

    def enable_checkpointing(self) -> None:
        self.module.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpoint_blocks(self.module.understanding.causal_encoder.blocks)

    # ----- evaluation and export
    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """Mean loss and accuracies on the first `train.eval_batches` batches of `data.eval` (per rank)."""
        if not self.config.data.eval:
            return {}
        loader = eval_loader(self.config.data.eval, self.world, self.config.train.batch_size, self.example,
                             self.collate, self.config.data.lines_per_shard)
        totals: Dict[str, float] = {}
        count = 0
        self.module.eval()
        with unsharded(model):
            for batch, counted in even_batches(loader, self.world, self.config.train.eval_batches):
                batch = {**batch, "pixels": batch["pixels"].to(self.world.device)}
                loss, metrics = self.module(batch)
                if counted:
                    for k, v in {"loss": loss, **metrics}.items():
                        totals[k] = totals.get(k, 0.0) + float(v)
                    count += 1
        self.module.train()
        self.module.eva.eval()
        self.module.tokenizer.eval()
        parts = self.world.gather_objects((totals, count))
        total = sum(n for _, n in parts)
        return {k: sum(t.get(k, 0.0) for t, _ in parts) / total for k in totals} if total else {}

    def export(self, folder: Path, state: Dict[str, torch.Tensor]) -> None:
        """`out/model` in the released layout: `language_model/` (transformers shards, config, the
        text tokenizer), `visual_weight.bin` (merger + vit_proj) and the init's encoder and tokenizer."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        language_model = folder / RELEASE_FOLDERS["llm"]
        llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
        self.module.llm.save_pretrained(language_model, state_dict=llm_state, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_folder / name).is_file():
                shutil.copyfile(self.tokenizer_folder / name, language_model / name)
        visual = {k[len("understanding."):]: v for k, v in state.items()
                  if k.startswith(("understanding.causal_encoder.", "understanding.vit_proj."))}
        save_release(folder / RELEASE_FILES["understanding"], visual)
        for component in ("eva", "tokenizer"):
            prefix = f"{component}."
            save_release(folder / RELEASE_FILES[component],
                         {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})

    def close(self) -> Optional[str]:
        return f"llm data: {self.data.summary()}"
