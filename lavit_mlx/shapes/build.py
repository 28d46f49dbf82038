"""The bundled model from nothing: the shapes world's data, then every training stage, then
the float16 MLX folder that ships with the package (`lavit train shapes`).

    data       the world's text tokenizer and manifests (captions; questions; held-out captions)
    encoder    a tiny EVA, CLIP-style on the captions (configs/encoder.yaml says why)
    tokenizer  LaVIT stage 1 over the frozen encoder
    select     the deterministic selection's threshold that keeps rho of the patches
    quantizer  the tokenizer again with its selector and merger frozen: the quantizer
               re-fitted to the kept tokens (configs/quantizer.yaml says why) and the VQ
               decoder trained on its codes
    vae        the pixel decoder's autoencoder
    llm        LaVIT stage 2 (captions in both orders, questions)
    pixel      LaVIT stage 3 on the VAE's latents
    compose    the last export cast to float16 -> OUT/model

Each stage is `lavit_mlx.training.run` on its YAML in `configs/` with the paths of this build
set, so `lavit train STAGE --config ...` gives the same stage alone. A stage that finished
(its `DONE.json`) is skipped when the build is run again; one that was interrupted resumes
from its latest checkpoint. The same seed gives the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..errors import LaVITError

CONFIGS = Path(__file__).with_name("configs")
STAGES = ("data", "encoder", "tokenizer", "select", "quantizer", "vae", "llm", "pixel", "compose")
TRAINED = ("encoder", "tokenizer", "quantizer", "vae", "llm", "pixel")
TRAINING_STAGE = {"quantizer": "tokenizer"}  # build steps that run a training stage of another name
DONE = "DONE.json"


@dataclass
class BuildOptions:
    out: Path
    seed: int = 0
    train_scenes: int = 6000  # pictures of the training manifests
    eval_scenes: int = 256  # held-out pictures (seed + 1)
    steps_scale: float = 1.0  # every stage's train.steps times this (a quick build: 0.05)
    overrides: Dict[str, List[str]] = field(default_factory=dict)  # stage -> ["key=value", ...]
    stop_after: Optional[str] = None  # the last stage to run

    def check(self) -> None:
        unknown = sorted(set(self.overrides) - set(TRAINED))
        if unknown:
            raise LaVITError(f"--set {unknown[0]}.KEY=VALUE: the stage must be one of {', '.join(TRAINED)}")
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise LaVITError(f"--stop-after {self.stop_after!r}: choose from {', '.join(STAGES)}")
        if self.train_scenes < 64 or self.eval_scenes < 16:
            raise LaVITError("the build needs at least 64 training and 16 held-out scenes")
        if not 0 < self.steps_scale <= 100:
            raise LaVITError(f"steps scale {self.steps_scale}: expected in (0, 100]")


def parse_overrides(values: List[str]) -> Dict[str, List[str]]:
    """["llm.train.steps=10", ...] -> {"llm": ["train.steps=10"], ...}."""
    out: Dict[str, List[str]] = {}
    for value in values:
        stage, dot, rest = value.partition(".")
        if not dot or "=" not in rest:
            raise LaVITError(f"--set {value!r}: expected STAGE.KEY=VALUE, e.g. llm.train.steps=100")
        out.setdefault(stage, []).append(rest)
    return out


def paths(out) -> Dict[str, Path]:
    out = Path(out)
    data = out / "data"
    return {
        "text": data / "text", "train": data / "train" / "manifest.jsonl",
        "train_vqa": data / "train_vqa" / "manifest.jsonl", "eval": data / "eval" / "manifest.jsonl",
        **{stage: out / stage for stage in TRAINED}, "model": out / "model",
    }


def stage_overrides(stage: str, options: BuildOptions) -> List[str]:
    """This build's paths and seed for one stage's YAML (then the user's --set)."""
    p = paths(options.out)
    common = [f"out={p[stage]}", f"train.seed={options.seed}", f"data.eval={p['eval']}"]
    data = [f"data.train={p['train']}"]
    specific = {
        "encoder": [f"model.text_tokenizer={p['text']}"],
        "tokenizer": [f"model.init={p['encoder'] / 'model'}"],
        "quantizer": [f"model.init={p['tokenizer'] / 'model'}", f"model.tokenizer_init={p['tokenizer'] / 'model'}"],
        "vae": [],
        "llm": [f"model.init={p['quantizer'] / 'model'}", f"model.text_tokenizer={p['text']}",
                f"data.train=[{p['train']}, {p['train_vqa']}]"],
        "pixel": [f"model.init={p['llm'] / 'model'}", f"model.vae={p['vae'] / 'model'}"],
    }[stage]
    overrides = common + data + specific
    if stage == "llm":
        overrides.remove(data[0])
    if stage == "quantizer":  # the tokenizer's sizes, as the user set them for its first pass
        overrides += [o for o in options.overrides.get("tokenizer", [])
                      if o.startswith("model.") and not o.startswith("model.init=")]
    return overrides + scaled_steps(stage, options) + options.overrides.get(stage, [])


def scaled_steps(stage: str, options: BuildOptions) -> List[str]:
    if options.steps_scale == 1.0:
        return []
    from ..training.config import load_run_config

    config = load_run_config(TRAINING_STAGE.get(stage, stage), CONFIGS / f"{stage}.yaml", [])
    steps = max(2, round(config.train.steps * options.steps_scale))
    warmup = min(config.train.warmup_steps, steps // 4)
    every = max(1, steps // 2)
    scaled = [f"train.steps={steps}", f"train.warmup_steps={warmup}", f"train.save_every={every}"]
    whole = getattr(config.loss, "full_picture_steps", 0)  # the VAE's last steps on whole pictures
    if whole:
        scaled.append(f"loss.full_picture_steps={min(steps - 1, max(1, round(whole * options.steps_scale)))}")
    return scaled


def write_data(options: BuildOptions, log: Callable[[str], None]) -> None:
    from .dataset import write_manifest
    from .text_tokenizer import train_text_tokenizer

    p = paths(options.out)
    train_text_tokenizer(p["text"], seed=options.seed)
    write_manifest(p["train"].parent, seed=options.seed, n=options.train_scenes, kinds=["caption"])
    write_manifest(p["train_vqa"].parent, seed=options.seed, n=options.train_scenes, kinds=["vqa"])
    write_manifest(p["eval"].parent, seed=options.seed + 1, n=options.eval_scenes, kinds=["caption"])
    log(f"data: {options.train_scenes} training scenes (captions and questions), {options.eval_scenes} held out")


def compose(options: BuildOptions, log: Callable[[str], None]) -> Path:
    """The pixel stage's export (every component) with floating weights in float16 -> OUT/model."""
    import mlx.core as mx

    from ..export import write_manifest

    source = paths(options.out)["pixel"] / "model"
    target = paths(options.out)["model"]
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(source, partial)
    for file in sorted(partial.rglob("*.safetensors")):
        weights = mx.load(str(file))
        cast = {k: v.astype(mx.float16) if v.dtype == mx.float32 and "codebook" not in file.name else v
                for k, v in weights.items()}
        mx.save_safetensors(str(file), cast, metadata={"format": "mlx"})
    config = json.loads((partial / "config.json").read_text())
    config["dtype"] = "float16"  # what `lavit info` reports (the codebook stays float32)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    info = {"seed": options.seed, "train_scenes": options.train_scenes,
            "stage_seconds": stage_times(options.out)}
    (partial / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(partial)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"compose: {target} ({size / 2**20:.1f} MiB, float16)")
    return target


def calibrate_selection(options: BuildOptions, log: Callable[[str], None], pictures: int = 512) -> float:
    """Store in the tokenizer's export the keep threshold that keeps rho of the patches.

    Stage 1 trains the selector with sampled (hard Gumbel) masks, where the ratio term holds
    the *mean keep probability* at rho. The release's deterministic rule (keep when
    p > 1/2) keeps rho only when the probabilities are decided, which a short run does not
    reach: the selector ranks the patches by content but leaves many probabilities between
    0 and 1/2 (here measured and logged as `rule_1/2`). The threshold stored instead is the
    (1 - rho) quantile of p over the first `pictures` training pictures, so inference keeps
    the highest-ranked rho of the patches on average, more on busier pictures.
    """
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from ..export import write_manifest
    from ..image_processing import preprocess
    from ..lavit import load
    from ..training.config import load_run_config

    p = paths(options.out)
    rho = load_run_config("tokenizer", CONFIGS / "tokenizer.yaml", stage_overrides("tokenizer", options)).loss.keep_ratio
    folder = p["tokenizer"] / "model"
    model = load(folder, components=["eva", "tokenizer"])
    lines = [json.loads(line) for line in p["train"].read_text().splitlines()[:pictures]]
    size = model.config.vision.image_size
    probs, counts = [], []
    for start in range(0, len(lines), 64):
        chunk = lines[start:start + 64]
        images = [Image.open(p["train"].parent / line["image"]).convert("RGB") for line in chunk]
        features = model.encode(mx.array(preprocess(images, size)))[:, 1:]
        probs.append(np.exp(np.array(model.tokenizer.token_predictor(features)[..., 0])))
        counts += [line["num_objects"] for line in chunk]
    probs = np.concatenate(probs)
    threshold = float(np.quantile(probs, 1.0 - rho))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer"]["keep_threshold"] = threshold
    partial = config_path.with_name(f".config.json.{os.getpid()}")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    partial.replace(config_path)
    write_manifest(folder)
    kept = probs > threshold
    by_count = {n: float(kept[np.array(counts) == n].sum(axis=1).mean()) for n in sorted(set(counts))}
    log(f"select: keep threshold {threshold:.4f} (kept fraction {kept.mean():.3f} for rho {rho:.3f}; "
        f"rule_1/2 would keep {(probs > 0.5).mean():.3f}); tokens by object count "
        + ", ".join(f"{n}: {v:.1f}" for n, v in by_count.items()))
    return threshold


def stage_times(out: Path) -> Dict[str, float]:
    times = {}
    for stage in STAGES:
        done = out / stage / DONE
        if done.exists():
            times[stage] = json.loads(done.read_text())["seconds"]
    return times


def build(options: BuildOptions, log: Callable[[str], None] = print) -> Path:
    """Run every stage not yet done, in order; returns OUT/model (or the last stage's folder)."""
    from ..training import run

    options.check()
    options.out = Path(options.out)
    last = options.stop_after or STAGES[-1]
    for stage in STAGES[: STAGES.index(last) + 1]:
        done = options.out / stage / DONE
        if done.exists():
            log(f"{stage}: done before ({json.loads(done.read_text())['seconds']:.0f} s), skipped")
            continue
        start = time.perf_counter()
        log(f"{stage}: starting")
        result = {}
        if stage == "data":
            write_data(options, log)
        elif stage == "select":
            calibrate_selection(options, log)
        elif stage == "compose":
            compose(options, log)
        else:
            result = run(TRAINING_STAGE.get(stage, stage), CONFIGS / f"{stage}.yaml", stage_overrides(stage, options),
                         resume=True)
        seconds = time.perf_counter() - start
        done.parent.mkdir(parents=True, exist_ok=True)
        final = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float))}
        done.write_text(json.dumps({"seconds": seconds, "final": final}) + "\n")
        log(f"{stage}: done in {seconds:.0f} s")
    times = stage_times(options.out)
    log("time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"; total {sum(times.values()) / 60:.1f} min")
    return paths(options.out)["model"] if last == "compose" else options.out / last
