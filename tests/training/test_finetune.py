"""LoRA fine-tuning (`lavit finetune`): adapters in mlx-lm's schema that load, fuse and
change what the model says; images tokenized once; QLoRA; one-line errors; the memory model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import lavit_mlx
from lavit_mlx.config import LLMConfig
from lavit_mlx.training.finetune import FinetuneOptions, finetune, fuse
from lavit_mlx.training.loop import World, train
from lavit_mlx.training.stages import build_stage

sys.path.insert(0, str(Path(__file__).parent))
from test_stage_llm import TINY_LLM, build_tiny_init, run_config, write_shapes_data  # noqa: E402

# A style marker the base model knows as a word (a VQA answer: its embedding and output rows
# are trained) but never writes in a caption. A made-up word such as "zork" is spelled by the
# shapes text tokenizer with pieces ("z", "or", "k") that occur nowhere in the base's data:
# their rows are untrained, the output ones pushed down at every base step, and LoRA (block
# linears only, as mlx-lm's) cannot move them, which no real LLM's vocabulary asks of it.
STYLE = "nothing"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return write_shapes_data(tmp_path_factory.mktemp("ft-data"), scenes=12)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, data) -> Path:
    """A tiny LaVIT after a short stage 2: encoder, tokenizer, understanding, LLM.

    60 steps: after 20 its LLM captions every image "." or "........" (loss ~2.3), which makes
    the check that it does not already write the style empty; after 60 it starts captions
    with "a" (loss ~1.5)."""
    root = tmp_path_factory.mktemp("ft-base")
    init = build_tiny_init(root / "init")
    config = run_config(init, data, root / "run", "train.steps=60", "train.learning_rate=3e-3",
                        "model.understanding=projection")
    train(build_stage(config, World.init()), config)
    return root / "run" / "model"


@pytest.fixture(scope="session")
def style_data(tmp_path_factory, data) -> Path:
    """The captions of `data`, each wrapped in a word the model never writes in a caption."""
    folder = tmp_path_factory.mktemp("ft-style")
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    styled = [{**line, "image": str(data.parent / line["image"]), "text": f"{STYLE} {line['text']} {STYLE}"}
              for line in lines if "text" in line]
    path = folder / "style.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in styled))
    return path


def _options(model, data, out, **kw) -> FinetuneOptions:
    settings = {"rank": 4, "steps": 4, "batch_size": 4, "learning_rate": 1e-2, "save_every": 0}
    return FinetuneOptions(model=str(model), data=str(data), out=str(out), **{**settings, **kw})


def _probe(model, image: Path):
    """Logits of a generation-order id sequence and of an understanding sequence."""
    ids = model.token_ids
    text = model.text_tokenizer.encode("a red circle at the top")
    generation = mx.array([text + [ids.image_start, ids.visual_offset + 3, ids.visual_offset + 9]])
    picture = lavit_mlx.image_processing.load_images([str(image)])
    embeds = model.tokenize_pixels(picture, understanding=True).visual_embeds
    rows = model.understanding_rows(embeds, [text])[0]
    return model.llm(input_ids=generation), model.llm(inputs_embeds=rows[None])


def _max_rel(a, b) -> float:
    return float(mx.max(mx.abs(a - b)) / mx.max(mx.abs(b)))


@pytest.mark.parametrize("dora,tune_understanding", [(False, False), (True, True)])
def test_adapters_save_load_and_fuse_with_unchanged_outputs(base_model, data, tmp_path, dora, tune_understanding):
    from mlx_lm.tuner.utils import load_adapters

    from lavit_mlx.models.llm import load_language_model

    image = data.parent / "images" / "000002.png"
    out = tmp_path / "adapter"
    finetune(_options(base_model, data, out, task="mixed", dora=dora, tune_understanding=tune_understanding))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if dora else "lora")
    assert config["num_layers"] == TINY_LLM["num_hidden_layers"]
    assert config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0}
    assert (out / "visual_rows.safetensors").is_file()  # task mixed trains the visual rows
    assert (out / "understanding.safetensors").is_file() == tune_understanding
    leaves = {k.rsplit(".", 1)[-1] for k in mx.load(str(out / "adapters.safetensors"))}
    assert leaves == ({"lora_a", "lora_b", "m"} if dora else {"lora_a", "lora_b"})

    base = _probe(lavit_mlx.load(base_model), image)
    adapted = _probe(lavit_mlx.load(base_model, adapter=out), image)
    fused_folder = fuse(base_model, out, tmp_path / "fused")
    fused = _probe(lavit_mlx.load(fused_folder), image)
    for a, f, b in zip(adapted, fused, base):
        assert _max_rel(f, a) <= 1e-5
        assert _max_rel(a, b) > 1e-3  # the adapter does something
    assert list(lavit_mlx.load(fused_folder).checkpoint.verify()) == []

    # mlx-lm reads the adapter itself: its text side equals ours (the visual rows are LaVIT's)
    plain = load_language_model(base_model / "language_model", token_ids=lavit_mlx.load(base_model).token_ids)
    load_adapters(plain.model, str(out))
    ids = mx.array([[5, 40, 77, 12]])
    ours = lavit_mlx.load(base_model, adapter=out).llm(input_ids=ids)
    num_text = plain.token_ids.num_text
    assert _max_rel(plain(input_ids=ids)[..., :num_text], ours[..., :num_text]) <= 1e-5


def test_images_are_tokenized_once(base_model, data, tmp_path, monkeypatch):
    from lavit_mlx.lavit import LaVIT

    seen = []
    encode = LaVIT.encode

    def counting(self, pixels):
        seen.append(int(pixels.shape[0]))
        return encode(self, pixels)

    monkeypatch.setattr(LaVIT, "encode", counting)
    finetune(_options(base_model, data, tmp_path / "adapter", task="vqa", steps=6))
    images = len(list((data.parent / "images").glob("*.png")))
    assert sum(seen) == images  # every image once, however many steps and lines use it


def test_qlora_trains_on_a_4bit_llm_and_fuses_into_the_float_one(base_model, data, tmp_path):
    out = tmp_path / "adapter"
    finetune(_options(base_model, data, out, task="caption", qlora=True))
    assert json.loads((out / "adapter_config.json").read_text())["lavit"]["quantize"] == 4
    quantized = lavit_mlx.load(base_model, quantize=4, adapter=out)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in quantized.llm.model.named_modules())
    q_logits = _probe_ids(quantized)
    fused = lavit_mlx.load(fuse(base_model, out, tmp_path / "fused"))
    assert not any(type(m).__name__ == "QuantizedLinear" for _, m in fused.llm.model.named_modules())
    base, f = _probe_ids(lavit_mlx.load(base_model)), _probe_ids(fused)
    # folded into the float weights: nearer to the 4-bit adapted model than the base is
    assert _max_rel(f, q_logits) < _max_rel(base, q_logits)


def _probe_ids(model):
    return model.llm(input_ids=mx.array([[5, 40, 77, 12, 9, 3]]))


def _caption(model, image) -> str:
    from lavit_mlx.understanding import caption

    return caption(model, [str(image)], num_beams=1, max_new_tokens=16, min_new_tokens=1)[0].raw


def test_finetuning_on_a_new_caption_style_changes_the_captions(base_model, data, style_data, tmp_path, cli):
    image = data.parent / "images" / "000001.png"
    assert STYLE not in _caption(lavit_mlx.load(base_model), image)
    out = tmp_path / "style"
    code, stdout, stderr = cli("finetune", "--model", base_model, "--data", style_data, "--task", "caption",
                               "--out", out, "--rank", "8", "--steps", "40", "--batch-size", "8",
                               "--learning-rate", "1e-3", "--seed", "1", timeout=900)
    assert code == 0, stderr[-2000:]
    assert "tokenized" in stderr and "step 40" in stderr  # progress
    styled = _caption(lavit_mlx.load(base_model, adapter=out), image)
    assert styled.split()[0] == STYLE, styled
    code, stdout, stderr = cli("caption", image, "--model", base_model, "--adapter", out)
    assert code == 0, stderr
    assert f": {STYLE}" in stdout


@pytest.mark.parametrize("args,message", [
    (["finetune", "--data", "missing.jsonl", "--out", "x"], "--data missing.jsonl: no such file"),
    (["finetune", "--data", "{data}", "--out", "x", "--task", "pixels"], "--task"),
    (["finetune", "--data", "{data}", "--out", "x", "--rank", "0"], "--rank 0"),
    (["finetune", "--data", "{data}", "--out", "x", "--layers", "5"], "--layers 5"),
    (["finetune", "--data", "{data}", "--out", "x", "--quantize", "3"], "--quantize"),
    (["finetune", "--data", "{data}", "--out", "x", "--seed", "-1"], "--seed"),
    (["fuse", "--adapter", "no-such-adapter", "--out", "fused"], "--adapter no-such-adapter"),
    (["caption", "{image}", "--adapter", "no-such-adapter"], "--adapter no-such-adapter"),
])
def test_bad_options_are_one_line_errors(base_model, data, cli, args, message):
    filled = [a.replace("{data}", str(data)).replace("{image}", str(data.parent / "images" / "000000.png"))
              for a in args]
    code, stdout, stderr = cli(*filled, "--model", base_model)
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr


# ----------------------------------------------------------------------------- memory
def test_the_memory_model_counts_what_mlx_lm_builds():
    from lavit_mlx.config import TokenIds
    from lavit_mlx.models.llm import build_llama, quantize_model, weight_bytes
    from lavit_mlx.training.lora import LoRASection, apply_lora, qlora_memory, trainable_count

    config = LLMConfig.from_hf({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                                "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 512})
    ids = TokenIds(num_text=400, codebook_size=110)
    rows = ids.vocab_size - ids.num_text
    # the scales, biases and norms are in the dtype the base is loaded in: float32 as
    # build_llama makes it, float16 as the release is stored (and `load(dtype=float16)` casts)
    for dtype in (mx.float32, mx.float16):
        llama = build_llama(config)
        quantize_model(llama, 4, 64, dtype=dtype)
        estimate = qlora_memory(config, bits=4, rank=8, layers=2, visual_rows=rows, float_bytes=dtype.size)
        assert abs(estimate.weights - weight_bytes(llama)) / weight_bytes(llama) < 0.02, dtype
        unquantized = build_llama(config).apply(lambda w: w.astype(dtype))
        assert qlora_memory(config, bits=None, float_bytes=dtype.size).weights == weight_bytes(unquantized)
    apply_lora(llama, LoRASection(rank=8, layers=2, visual_rows=True), ids)
    assert trainable_count(llama) == estimate.trainable


def test_the_7b_qlora_table():
    from lavit_mlx.training.lora import memory_table, qlora_memory

    estimate = qlora_memory(LLMConfig(), bits=4, rank=8, batch=1, sequence=512)
    assert estimate.details["lora_parameters"] == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    assert 3.5 * 2**30 < estimate.weights < 4.0 * 2**30  # LLaMA-2-7B + LaVIT's vocabulary, 4.5 bits a weight
    assert estimate.training < 10 * 2**30  # fits the ~10.7 GiB a 16 GB Mac lends the GPU
    table = memory_table()
    assert table.count("\n") == 6 and "| 1 x 512 |" in table
    assert estimate.adapters == estimate.trainable * 16  # float32 parameter, gradient, AdamW's two moments
