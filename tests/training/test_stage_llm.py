"""Stage 2 (`lavit train llm`): the sequences are what inference reads, the loss falls, a
killed run resumes bit-identically, a text-only LLaMA grows its vocabulary, LoRA trains
exactly the adapters (and the visual rows) it should."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import lavit_mlx
from lavit_mlx.config import EVAConfig, LaVITConfig, TokenIds, TokenizerConfig, mlp_width
from lavit_mlx.export import save_components
from lavit_mlx.loading import build_component
from lavit_mlx.training.config import load_run_config
from lavit_mlx.training.loop import World, train
from lavit_mlx.training.stages import build_stage

ROOT = Path(__file__).resolve().parents[2]
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
CODEBOOK = 64


def build_tiny_init(folder: Path, seed: int = 0) -> Path:
    """A random MLX LaVIT folder with what stage 2 starts from: EVA (224 px, 28 px patches,
    width 32), the tokenizer (64 codes) and the shapes world's text tokenizer."""
    from lavit_mlx.shapes import train_text_tokenizer

    mx.random.seed(seed)
    width = 32
    config = LaVITConfig(
        vision=EVAConfig(width=width, depth=1, num_heads=2, mlp_dim=mlp_width(width), patch_size=28, image_size=224,
                         head_dim_out=16),
        tokenizer=TokenizerConfig(width=width, merger_depth=1, num_heads=2, mlp_dim=mlp_width(width),
                                  codebook_size=CODEBOOK, code_dim=8),
        token_ids=TokenIds(num_text=256, codebook_size=CODEBOOK))
    eva, tokenizer = build_component("eva", config), build_component("tokenizer", config)
    eva.pos_embed = mx.random.normal(eva.pos_embed.shape)  # so that the features know where a patch is
    _keep_the_shapes(eva, tokenizer.token_predictor, seed)
    mx.eval(eva.parameters(), tokenizer.parameters())
    save_components(folder, config, {"eva": eva, "tokenizer": tokenizer})
    train_text_tokenizer(folder / "text_tokenizer")
    return folder


def _keep_the_shapes(eva, selector, seed: int, steps: int = 150) -> None:
    """Fit the random selector to keep the patches a shape touches (as a trained one would)."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from lavit_mlx.image_processing import preprocess
    from lavit_mlx.shapes import render, scenes

    pictures = [render(s) for s in scenes(seed + 100, 24)]
    features = eva(mx.array(preprocess(pictures, 224)))[:, 1:]
    grid = int(features.shape[1] ** 0.5)
    ink = np.stack([(np.asarray(p).min(-1) < 200).reshape(grid, 224 // grid, grid, 224 // grid).any((1, 3))
                    for p in pictures]).reshape(len(pictures), -1)
    target = mx.array(ink.astype(np.float32))

    def loss(model):
        logprobs = model(features)
        return -mx.mean(target * logprobs[..., 0] + (1 - target) * logprobs[..., 1])

    optimizer, grad = optim.Adam(3e-3), nn.value_and_grad(selector, loss)
    for _ in range(steps):
        _, g = grad(selector)
        optimizer.update(selector, g)
        mx.eval(selector.parameters(), optimizer.state)


def write_shapes_data(folder: Path, scenes: int = 24, seed: int = 1, kinds=("caption", "vqa")) -> Path:
    from lavit_mlx.shapes import write_manifest

    return write_manifest(folder, seed, scenes, kinds=kinds)


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory) -> Path:
    return build_tiny_init(tmp_path_factory.mktemp("llm-init") / "init")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    return write_shapes_data(tmp_path_factory.mktemp("llm-data"))


def run_config(init: Path, data: Path, out: Path, *overrides):
    settings = [f"model.init={init}", f"model.text_tokenizer={init / 'text_tokenizer'}",
                f"data.train={data}", f"out={out}", "train.batch_size=8", "train.log_every=1",
                "train.save_every=0", "train.warmup_steps=0", "data.shuffle_buffer=64", "model.bucket=8"]
    settings += [f"model.llm.{k}={v}" for k, v in TINY_LLM.items()]
    return load_run_config("llm", None, settings + list(overrides))


def stage_for(init, data, out, *overrides):
    config = run_config(init, data, out, *overrides)
    return build_stage(config, World.init()), config


# ----------------------------------------------------------------------------- layouts
def test_training_sequences_are_what_inference_feeds(tiny_init, shapes_data, tmp_path):
    """The stage's logits of a caption, a VQA pair and a generation pair equal the exported
    model's logits on the inputs the inference code builds (`understanding_rows`, prompt ids
    + [IMG] + visual ids), with every target where inference decodes it."""
    from lavit_mlx.training.stages.llm import Example
    from lavit_mlx.understanding import VQA_PROMPT

    stage, config = stage_for(tiny_init, shapes_data, tmp_path / "run", "train.steps=2")
    train(stage, config)
    model = lavit_mlx.load(tmp_path / "run" / "model")
    image = str(shapes_data.parent / "images" / "000003.png")
    text = model.text_tokenizer
    tokens = model.tokenize_pixels(lavit_mlx.image_processing.load_images([image]), understanding=True)
    visual_embeds, codes = tokens.visual_embeds[0], model.tokenize([image])[0].codes
    line = stage.cache.where[(os.path.abspath(shapes_data), _first_line_of(shapes_data, image))]
    assert np.array_equal(stage.cache.codes[line], codes)  # the cached targets are the tokenizer's tokens
    caption = text.encode("a red circle at the top.")
    question, answer = text.encode(VQA_PROMPT.format("how many shapes are there?")), text.encode("one.")
    ids = model.token_ids
    examples = [Example(line, [], caption, False), Example(line, question, answer, False),
                Example(line, [], text.encode("a red circle at the top"), True)]
    batch = stage.collate(examples)
    logits = stage.logits(stage.model, batch)
    # understanding: [IMG] e_1..e_T [/IMG] prompt text (the eos is only a target)
    for row, (prompt, target) in enumerate([([], caption), (question, answer)]):
        inputs = model.understanding_rows([visual_embeds], [prompt + target])[0]
        expected = model.llm(inputs_embeds=inputs[None])[0]
        n = inputs.shape[0]
        assert mx.allclose(logits[row, :n], expected, rtol=1e-4, atol=1e-4)
        targets = np.array(batch["targets"][row, :n]).tolist()
        T = len(codes)
        assert targets[:T + 1] == (codes + ids.visual_offset).tolist() + [ids.image_end]
        assert targets[T + 1 + len(prompt):n] == target + [ids.eos]
        text_mask = np.array(batch["text_mask"][row]).astype(bool)
        assert text_mask.sum() == len(target) + 1 and text_mask[T + 1 + len(prompt):n].all()  # prompt: input only
    # generation: text [IMG] v_1..v_T [/IMG]; inference feeds the text + [IMG], then each sampled id
    prompt = text.encode("a red circle at the top")
    sequence = prompt + [ids.image_start] + (codes + ids.visual_offset).tolist() + [ids.image_end]
    expected = model.llm(input_ids=mx.array([sequence[:-1]]))[0]
    n = len(sequence) - 1
    assert mx.allclose(logits[2, :n], expected, rtol=1e-4, atol=1e-4)
    assert np.array(batch["targets"][2, :n]).tolist() == sequence[1:]
    assert np.array(batch["image_mask"][2, :n]).sum() == len(codes) + 2  # [IMG], the codes, [/IMG]


def _first_line_of(manifest: Path, image: str) -> int:
    for number, line in enumerate(manifest.read_text().splitlines()):
        if str(manifest.parent / json.loads(line)["image"]) == image:
            return number
    raise AssertionError(image)


def test_targets_follow_the_masks(tiny_init, shapes_data, tmp_path):
    stage, _ = stage_for(tiny_init, shapes_data, tmp_path / "run", "loss.understanding_targets=text",
                         "loss.generation_targets=image", "loss.generation_fraction=0.5")
    batch = next(stage.batches())
    text, image, visual = (np.array(batch[k]) for k in ("text_mask", "image_mask", "visual"))
    understanding_rows = visual.any(axis=1)
    assert understanding_rows.any() and (~understanding_rows).any()
    assert image[understanding_rows].sum() == 0 and text[understanding_rows].sum() > 0
    assert text[~understanding_rows].sum() == 0 and image[~understanding_rows].sum() > 0
    assert not (text * image).any()


# ----------------------------------------------------------------------------- training
def test_loss_falls_on_a_tiny_task(tiny_init, tmp_path):
    data = write_shapes_data(tmp_path / "data", scenes=8, kinds=("caption",))
    config = run_config(tiny_init, data, tmp_path / "run", "train.steps=50", "train.learning_rate=3e-3",
                        "loss.generation_fraction=0", "loss.understanding_targets=text",
                        "model.understanding=projection")
    stage = build_stage(config, World.init())
    start = time.perf_counter()
    last = train(stage, config)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert last["loss"] < 0.1 * log[0]["loss"], (log[0]["loss"], last["loss"])
    assert last["text_accuracy"] > 0.8  # the 8 captions, told apart by their pictures
    assert time.perf_counter() - start < 300
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert {"eva", "tokenizer", "llm", "understanding"} <= set(exported["components"])
    assert (tmp_path / "run" / "model" / "language_model" / "tokenizer.model").is_file()


def _train_subprocess(config_path: Path, env=None):
    return subprocess.Popen([sys.executable, "-m", "lavit_cli.cli", "train", "llm", "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def test_sigkill_then_resume_is_bit_identical(tiny_init, shapes_data, tmp_path):
    import yaml

    def write(out: Path) -> Path:
        config = {"stage": "llm", "out": str(out),
                  "model": {"init": str(tiny_init), "text_tokenizer": str(tiny_init / "text_tokenizer"),
                            "llm": TINY_LLM, "bucket": 8},
                  "data": {"train": str(shapes_data), "shuffle_buffer": 32, "lines_per_shard": 20},
                  "train": {"steps": 10, "batch_size": 4, "save_every": 3, "log_every": 1, "warmup_steps": 2,
                            "learning_rate": 3e-3},
                  "loss": {"drop_text": 0.2}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    straight = _train_subprocess(write(tmp_path / "a"))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
    killed = _train_subprocess(write(tmp_path / "b"))
    log = tmp_path / "b" / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []
        if steps and steps[-1] >= 4:  # past the step-3 checkpoint, before the step-6 one
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    resumed = _train_subprocess(write(tmp_path / "b"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]

    def final(run: str):
        return mx.load(str(tmp_path / run / "checkpoints" / "step-00000010" / "parameters.safetensors"))

    a, b = final("a"), final("b")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 11))


# ----------------------------------------------------------------------------- starting points
def _text_llama(folder: Path, init: Path) -> Path:
    """A random text-only LLaMA (vocabulary = the 256 text pieces) in the mlx-lm layout."""
    import shutil

    from lavit_mlx.config import LLMConfig
    from lavit_mlx.models.llm import build_llama

    config = LLMConfig.from_hf({"model_type": "llama", **TINY_LLM, "vocab_size": 256})
    mx.random.seed(3)
    llama = build_llama(config)
    mx.eval(llama.parameters())
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(llama.parameters())))
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(init / "text_tokenizer" / name, folder / name)
    return folder


def test_a_text_llama_grows_by_img_marks_and_codes(tiny_init, shapes_data, tmp_path):
    from lavit_mlx.models.llm import load_language_model

    folder = _text_llama(tmp_path / "text-llama", tiny_init)
    config = load_run_config("llm", None, [f"model.init={tiny_init}", f"model.language_model={folder}",
                                           f"data.train={shapes_data}", f"out={tmp_path / 'run'}",
                                           "train.batch_size=4", "train.steps=1", "train.warmup_steps=0"])
    stage = build_stage(config, World.init())
    lm = stage.model.llm
    assert lm.token_ids == TokenIds(num_text=256, codebook_size=CODEBOOK)
    text_only = load_language_model(folder, token_ids=TokenIds(num_text=254, codebook_size=0))
    ids = mx.array([[5, 17, 40, 99]])
    grown, original = lm(input_ids=ids), text_only(input_ids=ids)
    assert grown.shape[-1] == 256 + 2 + CODEBOOK
    assert mx.allclose(grown[..., :256], original, atol=1e-5)  # text predictions untouched
    rows = lm.model.model.embed_tokens.weight
    new, old = rows[256:], rows[:256]
    assert float(mx.max(mx.abs(mx.mean(new, 0) - mx.mean(old, 0)))) < 0.05  # around the mean text row
    assert float(mx.min(mx.std(new, 0))) > 0  # not all equal
    train(stage, config)
    assert lavit_mlx.load(tmp_path / "run" / "model").llm.args.vocab_size == 256 + 2 + CODEBOOK


def _lora_params(config_llm: dict, rank: int, layers: int) -> int:
    h, inter = config_llm["hidden_size"], config_llm["intermediate_size"]
    shapes = [(h, h), (h, h), (h, h), (h, h), (h, inter), (h, inter), (inter, h)]
    return layers * sum(rank * (a + b) for a, b in shapes)


@pytest.mark.parametrize("rank,layers,dora,rows,understanding", [
    (4, -1, False, True, "frozen"), (8, 1, False, False, "frozen"), (4, -1, True, False, "projection"),
])
def test_lora_trains_exactly_its_parameters(tiny_init, shapes_data, tmp_path, rank, layers, dora, rows,
                                            understanding):
    stage, _ = stage_for(tiny_init, shapes_data, tmp_path / "run", f"model.lora.rank={rank}",
                         f"model.lora.layers={layers}", f"model.lora.dora={str(dora).lower()}",
                         f"model.lora.visual_rows={str(rows).lower()}", f"model.understanding={understanding}")
    trainable = dict(tree_flatten(stage.model.trainable_parameters()))
    blocks = TINY_LLM["num_hidden_layers"] if layers == -1 else layers
    expected = _lora_params(TINY_LLM, rank, blocks)
    h, inter = TINY_LLM["hidden_size"], TINY_LLM["intermediate_size"]
    if dora:  # DoRA's magnitude vector per output row
        expected += blocks * (5 * h + 2 * inter)
    if rows:  # [IMG], [/IMG] and the codes, in the embedding and the head
        expected += 2 * (2 + CODEBOOK) * h
    if understanding == "projection":
        expected += (32 + 1) * h  # vit_proj (width 32 -> hidden)
    assert sum(v.size for v in trainable.values()) == expected
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m", "rows") or k.startswith("understanding.vit_proj")
               for k in trainable)
    first_block = [k for k in trainable if ".layers.0." in k]
    assert bool(first_block) == (layers == -1)


def test_an_identity_understanding_merger_passes_the_features_through(tiny_init):
    from lavit_mlx.training.stages.llm import build_understanding

    lavit = lavit_mlx.load(tiny_init)
    features = mx.random.normal((2, 64, 32), key=mx.random.key(3))
    keep = (mx.random.uniform(shape=(2, 64), key=mx.random.key(4)) < 0.4).astype(mx.float32)
    identity, new = build_understanding(lavit, 48, init="identity")
    assert new and identity.vit_proj.weight.shape == (48, 32)
    merger = identity.causal_encoder
    # the blocks add nothing: each patch's feature comes out through the final LayerNorm only
    assert mx.allclose(merger(features, keep), merger.norm(features), atol=1e-5)
    copied, _ = build_understanding(lavit, 48)  # the tokenizer's merger, as the release loads it
    assert mx.allclose(copied.causal_encoder(features, keep), lavit.tokenizer.causal_encoder(features, keep),
                       atol=1e-5)
    assert not mx.allclose(copied.causal_encoder(features, keep), merger.norm(features), atol=1e-3)


def test_content_accuracy_counts_the_content_pieces_only(tiny_init, shapes_data, tmp_path):
    """`loss.content_words`: content_accuracy is the accuracy over the text targets that are
    pieces of those words, and the loss does not change."""
    stage, _ = stage_for(tiny_init, shapes_data, tmp_path / "run", "loss.content_words=[red, circle, top]",
                         "loss.generation_fraction=0")
    plain, _ = stage_for(tiny_init, shapes_data, tmp_path / "plain", "loss.generation_fraction=0")
    batch = next(stage.batches())
    loss, metrics = stage.loss(stage.model, batch)
    assert "content_accuracy" not in plain.loss(stage.model, batch)[1]
    assert float(loss) == pytest.approx(float(plain.loss(stage.model, batch)[0]), rel=1e-6)
    pieces = {i for word in ("red", "circle", "top") for i in stage.text.encode(word)}
    targets, text = np.array(batch["targets"]), np.array(batch["text_mask"]) > 0
    content = text & np.isin(targets, sorted(pieces))
    assert 0 < content.sum() < text.sum()
    right = np.argmax(np.array(stage.logits(stage.model, batch)), axis=-1) == targets
    assert float(metrics["content_accuracy"]) == pytest.approx(right[content].mean(), abs=1e-6)


def test_bad_stage_settings_are_one_line_errors(tiny_init, shapes_data, tmp_path):
    from lavit_mlx.errors import LaVITError

    for overrides, message in [(["model.understanding=half"], "model.understanding"),
                               (["model.understanding_init=zeros"], "model.understanding_init 'zeros'"),
                               (["model.quantize=4"], "QLoRA"),
                               (["loss.generation_targets=pixels"], "loss.generation_targets"),
                               (["loss.samples=[captions]"], "loss.samples"),
                               (["model.lora.rank=4", "model.lora.layers=9"], "only 2 blocks"),
                               (['loss.content_words=["red", " "]'], "loss.content_words")]:
        with pytest.raises(LaVITError, match=message) as info:
            stage_for(tiny_init, shapes_data, tmp_path / "run", *overrides)
        assert "\n" not in str(info.value)


def test_scene_labels_fit_vit_proj_to_the_objects_and_can_stay_fixed(tiny_init, shapes_data, tmp_path,
                                                                       monkeypatch):
    """`model.projection_init: scene_labels` ridge-fits vit_proj so that each kept patch reads
    back its object's colour, shape and cell (far above chance on the tiny encoder's
    features); with `model.train_projection: false` training leaves it as fitted while the LLM
    learns."""
    lines = []
    settings = ["model.understanding=projection", "model.understanding_init=identity",
                "model.projection_init=scene_labels", "model.train_projection=false", "train.steps=3"]
    config = run_config(tiny_init, shapes_data, tmp_path / "run", *settings)
    from lavit_mlx.training.stages.llm import LLMStage

    monkeypatch.setattr(LLMStage, "_log", lambda self, text: lines.append(text))
    stage = build_stage(config, World.init())
    fit = [line for line in lines if line.startswith("vit_proj fitted")]
    assert len(fit) == 1, lines
    colour, shape, cell = (float(x) / 100 for x in
                           fit[0].split("read back colour/shape/cell ")[1].split(" ")[0].rstrip("%").split("%/"))
    # chance: 7 colour classes (6 and none), 4 shapes, 10 cells; most kept patches are on objects
    assert colour > 0.5 and shape > 0.5 and cell > 0.5, fit[0]
    fitted = np.array(stage.model.understanding.vit_proj.weight)
    plain, _ = stage_for(tiny_init, shapes_data, tmp_path / "plain", *settings[:2])
    assert not np.allclose(fitted, np.array(plain.model.understanding.vit_proj.weight), atol=1e-3)
    names = {name for name, _ in tree_flatten(stage.model.trainable_parameters())}
    assert not any("vit_proj" in name for name in names) and any("embed_tokens" in name for name in names)
    before = np.array(stage.model.llm.model.model.embed_tokens.weight)
    train(stage, config)
    assert np.array_equal(np.array(stage.model.understanding.vit_proj.weight), fitted)
    assert not np.array_equal(np.array(stage.model.llm.model.model.embed_tokens.weight), before)


def test_scene_labels_settings_are_checked(tiny_init, shapes_data, tmp_path):
    from lavit_mlx.errors import LaVITError

    for overrides, message in [(["model.projection_init=zeros"], "model.projection_init 'zeros'"),
                               (["model.projection_init=scene_labels"], "understanding: projection"),
                               (["model.train_projection=false"], "understanding: projection"),
                               (["model.understanding=projection", "model.projection_images=0"],
                                "model.projection_images 0")]:
        with pytest.raises(LaVITError, match=message) as info:
            stage_for(tiny_init, shapes_data, tmp_path / "run", *overrides)
        assert "\n" not in str(info.value)


def test_init_options_for_a_new_path_say_when_the_init_folder_has_one(tiny_init, shapes_data, tmp_path,
                                                                       monkeypatch):
    """Started from a folder that has an understanding path, `understanding_init` and
    `projection_init` do not apply: the stage keeps the folder's path and says so."""
    from lavit_mlx.training.stages.llm import LLMStage

    stage, config = stage_for(tiny_init, shapes_data, tmp_path / "first", "train.steps=1")
    train(stage, config)
    exported = tmp_path / "first" / "model"
    lines = []
    monkeypatch.setattr(LLMStage, "_log", lambda self, text: lines.append(text))
    again, _ = stage_for(exported, shapes_data, tmp_path / "again", "model.understanding=projection",
                         "model.understanding_init=identity", "model.projection_init=scene_labels",
                         f"model.text_tokenizer={tiny_init / 'text_tokenizer'}")
    notes = [line for line in lines if "not applied" in line]
    assert any("understanding_init identity" in n for n in notes) and any("projection_init scene_labels" in n
                                                                           for n in notes), lines
    assert not any(line.startswith("vit_proj fitted") for line in lines)
    assert np.array_equal(np.array(again.model.understanding.vit_proj.weight),
                          np.array(lavit_mlx.load(exported).understanding.vit_proj.weight))
