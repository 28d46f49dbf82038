"""`lavit finetune` and `lavit fuse`: LoRA fine-tuning of a LaVIT model on image-text data.

Fine-tuning is the llm stage (`stages/llm.py`) with adapters: the frozen encoder and
tokenizer tokenize every image of the data once, then only the adapters (mlx-lm's LoRA or
DoRA layers, on `QuantizedLinear` for QLoRA), optionally the visual-id rows and the
understanding merger train. The task decides which pairs are used and what is predicted:

    caption   [image, text] captions, text targets (the caption and its eos)
    vqa       [image, text] "Question: {} Answer:" pairs, the answer as target
    generate  [text, image] captions, image targets (visual ids and [/IMG]); 10% of the
              texts dropped so that the unconditional branch of guidance tunes too
    mixed     all of the above

The run folder is the adapter folder (`lora.py`: mlx-lm's adapters.safetensors +
adapter_config.json, LaVIT's visual_rows / understanding safetensors), plus the loop's
checkpoints and log, so a killed run resumes; `lavit caption|ask|generate --adapter DIR`
load it, `fuse` writes a new model folder with the adapters folded in.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import LaVITError
from .config import DataSection, RunConfig, TrainSection

TASKS = ("caption", "vqa", "generate", "mixed")
GENERATE_DROP_TEXT = 0.1


@dataclass
class FinetuneOptions:
    """Everything `lavit finetune` takes; `check()` validates it without loading anything."""

    model: str
    data: str
    out: str
    task: str = "caption"
    rank: int = 8
    layers: int = -1  # the last N blocks get adapters (-1: all)
    scale: float = 20.0
    dropout: float = 0.0
    dora: bool = False
    qlora: bool = False  # LoRA on the LLM quantized to `quantize` (default 4) bits at load
    quantize: Optional[int] = None
    visual_rows: Optional[bool] = None  # train the visual-id rows (default: for generate and mixed)
    tune_understanding: bool = False  # also train the understanding merger + vit_proj
    steps: int = 200
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    warmup_steps: Optional[int] = None  # default: 10% of the steps, at most 100
    seed: int = 0
    eval_data: Optional[str] = None
    save_every: int = 100
    max_length: int = 512
    vision_heads: Optional[int] = None

    def check(self) -> None:
        from ..checkpoint import Checkpoint

        if self.task not in TASKS:
            raise LaVITError(f"--task {self.task!r}: choose from {', '.join(TASKS)}")
        for flag, path in (("--data", self.data), ("--eval-data", self.eval_data)):
            if path is not None and not Path(path).is_file():
                raise LaVITError(f"{flag} {path}: no such file")
        if not Path(self.model).is_dir():
            raise LaVITError(f"--model {self.model}: no such folder")
        checkpoint = Checkpoint.open(self.model)
        if not checkpoint.has("llm"):
            raise LaVITError(f"--model {self.model}: has no LLM to fine-tune")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise LaVITError(f"--out {self.out}: exists and is not a folder")
        problems = [
            (self.rank >= 1, f"--rank {self.rank}: expected at least 1"),
            (self.layers == -1 or self.layers >= 1, f"--layers {self.layers}: expected -1 (all) or at least 1"),
            (self.quantize in (None, 4, 8), f"--quantize {self.quantize}: expected 4 or 8"),
            (self.steps >= 1, f"--steps {self.steps}: expected at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected at least 1"),
            (self.learning_rate > 0, f"--learning-rate {self.learning_rate}: expected > 0"),
            (0 <= self.seed <= 2**32 - 1, f"--seed {self.seed}: expected 0..4294967295"),
            (self.max_length >= 8, f"--max-length {self.max_length}: expected at least 8"),
        ]
        for ok, message in problems:
            if not ok:
                raise LaVITError(message)
        stored = checkpoint.quantization("llm")
        if stored and self.quantize and stored["bits"] != self.quantize:
            raise LaVITError(f"--quantize {self.quantize}: {self.model} is stored {stored['bits']}-bit")
        depth = checkpoint.config(self.vision_heads).llm.num_hidden_layers
        if self.layers > depth:
            raise LaVITError(f"--layers {self.layers}: the LLM has {depth} blocks")
        for needed in ("eva", "tokenizer"):
            if not checkpoint.has(needed):
                raise LaVITError(f"--model {self.model}: has no {needed}, which tokenizes the training images")
        self.run_config()  # the stage's own checks

    @property
    def bits(self) -> Optional[int]:
        return self.quantize or (4 if self.qlora else None)

    def run_config(self) -> RunConfig:
        """The llm stage's run config for this fine-tune."""
        from .lora import LoRASection
        from .stages.llm import LLMLossSection, LLMModelSection

        generation = self.task in ("generate", "mixed")
        lora = LoRASection(rank=self.rank, layers=self.layers, scale=self.scale, dropout=self.dropout,
                           dora=self.dora, visual_rows=generation if self.visual_rows is None else self.visual_rows)
        model = LLMModelSection(init=self.model, understanding="train" if self.tune_understanding else "frozen",
                                quantize=self.bits, lora=lora, export="adapter", max_length=self.max_length,
                                vision_heads=self.vision_heads)
        loss = {
            "caption": LLMLossSection(samples=["caption"], generation_fraction=0.0, understanding_targets="text"),
            "vqa": LLMLossSection(samples=["vqa"], understanding_targets="text"),
            "generate": LLMLossSection(samples=["caption"], generation_fraction=1.0, generation_targets="image",
                                       drop_text=GENERATE_DROP_TEXT),
            "mixed": LLMLossSection(understanding_targets="text", generation_targets="image",
                                    drop_text=GENERATE_DROP_TEXT),
        }[self.task]
        warmup = self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)
        train = TrainSection(steps=self.steps, batch_size=self.batch_size, grad_accumulation=self.grad_accumulation,
                             learning_rate=self.learning_rate, warmup_steps=warmup, weight_decay=0.0,
                             seed=self.seed, save_every=self.save_every, log_every=min(10, self.steps),
                             eval_batches=8)
        config = RunConfig(stage="llm", out=str(self.out), model=model,
                           data=DataSection(train=str(self.data), eval=self.eval_data), train=train, loss=loss)
        config.train.check()
        model.check()
        loss.check()
        return config


def finetune(options: FinetuneOptions, resume: bool = True) -> dict:
    """Fine-tune with LoRA and write the adapter folder `options.out`; returns the last metrics."""
    from .loop import World, train
    from .stages.llm import LLMStage

    options.check()
    config = options.run_config()
    world = World.init()
    return train(LLMStage(config, world), config, resume=resume)


def estimate_memory(options: FinetuneOptions) -> str:
    """One line: the memory `options` would need, from the model's config alone (no weights read)."""
    from ..checkpoint import Checkpoint
    from .lora import describe_memory, qlora_memory

    checkpoint = Checkpoint.open(options.model)
    config = checkpoint.config(options.vision_heads)
    stored = checkpoint.quantization("llm")
    bits = options.bits or (stored["bits"] if stored else None)
    rows = config.token_ids.vocab_size - config.token_ids.num_text if (
        options.visual_rows or (options.visual_rows is None and options.task in ("generate", "mixed"))) else 0
    dtype = _stored_dtype(checkpoint.folder("llm")) or "float16"  # the LLM loads in its stored dtype
    estimate = qlora_memory(config.llm, bits=bits, rank=options.rank, layers=options.layers,
                            batch=options.batch_size, sequence=options.max_length, visual_rows=rows,
                            float_bytes=4 if dtype == "float32" else 2)
    base = f"{bits}-bit ({dtype} scales)" if bits else dtype
    return f"{base} base, batch {options.batch_size} x {options.max_length} tokens: {describe_memory(estimate)}"


# ----------------------------------------------------------------------------- fuse
def _stored_dtype(folder: Path) -> Optional[str]:
    """The dtype of the first floating tensor of an LLM folder's safetensors (read from the header)."""
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and entry.get("dtype") in names:
                return names[entry["dtype"]]
    return None


def fuse(model, adapter, out, force: bool = False) -> Path:
    """Write a new MLX model folder with the adapter folded into the LLM (and understanding).

    Args:
        model: the MLX folder the adapter was trained on (the released layout: convert it first).
        adapter: the adapter folder of `lavit finetune`.
        out: the new folder (written next to it under a temporary name, renamed when complete).
        force: replace `out` if it exists.

    A base stored quantized stays quantized (each fused layer quantized again); an unquantized
    base gets the adapters folded into its full-precision weights, even when they were trained
    on a 4-bit copy (QLoRA), and keeps its dtype.
    """
    import mlx.core as mx

    import lavit_mlx

    from ..checkpoint import Checkpoint
    from ..export import atomic_text, save_components, write_manifest
    from .lora import fuse_llm, read_adapter_config
    from .stages.llm import copy_model_folder

    model, adapter, out = Path(model), Path(adapter), Path(out)
    if not model.is_dir():
        raise LaVITError(f"--model {model}: no such folder")
    checkpoint = Checkpoint.open(model)
    if checkpoint.kind != "mlx":
        raise LaVITError(f"--model {model}: fuse writes an MLX folder; convert the released layout first (lavit convert)")
    adapter_config = read_adapter_config(adapter, checkpoint.config().token_ids)
    if out.exists() and not force:
        raise LaVITError(f"--out {out} exists; pass --force to replace it")
    if out.resolve() in (model.resolve(), adapter.resolve()):
        raise LaVITError("--out must be a new folder, not the model or the adapter")
    lavit = lavit_mlx.load(model, adapter=adapter)
    lm = lavit.llm
    fuse_llm(lm.model)
    modules = {"llm": lm}
    if adapter_config.get("lavit", {}).get("understanding"):
        modules["understanding"] = lavit.understanding
    llm_folder = checkpoint.folder("llm")
    dtype = _stored_dtype(llm_folder)
    temporary = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        copy_model_folder(model, temporary, replaced=list(modules))
        save_components(temporary, lavit.config, modules, dtype=getattr(mx, dtype) if dtype else None,
                        text_tokenizer=llm_folder)
        quantization = checkpoint.quantization("llm")
        if quantization:  # save_components writes the transformers config; the layers are quantized
            path = temporary / "language_model" / "config.json"
            atomic_text(path, json.dumps({**json.loads(path.read_text()), "quantization": quantization}, indent=2))
            write_manifest(temporary)
        if out.exists():
            shutil.rmtree(out)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out
