"""The LLM loader (lavit_mlx/models/llm.py): fixture logits, text ids, batching, quantization, errors.

References: the official-tiny fixture (logits of the released LlamaForCausalLM at tiny
size, sentencepiece ids) and transformers' LlamaForCausalLM on the same random weights.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from lavit_mlx.config import TokenIds
from lavit_mlx.errors import CheckpointError, LaVITError
from lavit_mlx.models.llm import TextTokenizer, load_language_model
from support.tiny_llama import TINY_IDS, tiny_llama

TOLERANCE = 1e-4  # max|ours - ref| / max|ref| in float32


def relative_error(ours: mx.array, ref: mx.array) -> float:
    ours, ref = np.array(ours, dtype=np.float64), np.array(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, model = tiny_llama(str(tmp_path_factory.getbasetemp() / "tiny_llama"))
    return path, model


@pytest.fixture(scope="module")
def official_lm(official_checkpoint):
    return load_language_model(official_checkpoint / "language_model")


# ----------------------------------------------------------------------------- fixture parity
def test_fixture_generation_logits(official_lm, official_tiny):
    expected = mx.load(str(official_tiny / "expected.safetensors"))
    logits = official_lm(input_ids=expected["llm_generation_input_ids"])[:, -4:]
    assert logits.dtype == mx.float32
    assert relative_error(logits, expected["llm_generation_logits_last4"]) <= TOLERANCE


def test_fixture_understanding_logits(official_lm, official_tiny):
    expected = mx.load(str(official_tiny / "expected.safetensors"))
    logits = official_lm(inputs_embeds=expected["llm_understanding_inputs_embeds"])[:, -4:]
    assert relative_error(logits, expected["llm_understanding_logits_last4"]) <= TOLERANCE


def test_fixture_config_and_ids(official_lm):
    ids = official_lm.token_ids
    assert (ids.image_start, ids.image_end, ids.visual_offset, ids.vocab_size) == (32000, 32001, 32002, 48386)
    assert official_lm.context_length == 512 and official_lm.hidden_size == 64
    assert official_lm.args.tie_word_embeddings is False


def test_fixture_text_ids(official_checkpoint, official_tiny, official_lm):
    tokenizer = TextTokenizer.from_folder(official_checkpoint / "language_model", official_lm.token_ids)
    text_ids = json.loads((official_tiny / "expected.json").read_text())["text_ids"]
    for text, ids in text_ids.items():
        assert tokenizer.encode(text) == ids
        assert tokenizer.decode(ids) == text


def test_decode_skips_special_and_visual_ids(official_checkpoint, official_lm):
    tokenizer = TextTokenizer.from_folder(official_checkpoint / "language_model", official_lm.token_ids)
    ids = official_lm.token_ids
    words = tokenizer.encode("a red sofa")
    noisy = [ids.bos, *words[:2], ids.image_start, ids.visual_offset + 5, ids.image_end, *words[2:], ids.eos, ids.pad]
    assert tokenizer.decode(noisy) == "a red sofa"
    assert tokenizer.batch_decode([words, []]) == ["a red sofa", ""]
    # special-token text is split out as transformers does (one id, no pieces of '</s>')
    assert tokenizer.encode("sofa</s>") == tokenizer.encode("sofa") + [ids.eos]
    spaced = tokenizer.encode("a cat . Is it ?")
    assert tokenizer.decode(spaced) == "a cat . Is it ?"  # LlamaTokenizer keeps spaces by default
    tokenizer.clean_up_spaces = True  # tokenizer_config.json: clean_up_tokenization_spaces
    assert tokenizer.decode(spaced) == "a cat. Is it?"


# ----------------------------------------------------------------------------- batching, reference
def test_left_padded_batch_equals_rows(official_lm):
    rng = np.random.default_rng(0)
    rows = [mx.array(rng.standard_normal((n, 64)).astype(np.float32) * 0.05) for n in (5, 11, 2)]
    batch, padding = official_lm.pad_embeddings(rows)
    assert padding == [6, 0, 9]
    cache = official_lm.make_cache(padding)
    batched = official_lm(inputs_embeds=batch, cache=cache)
    step_ids = mx.array([[7], [1000], [32005]])
    batched_step = official_lm(input_ids=step_ids, cache=cache)
    for i, row in enumerate(rows):
        single_cache = official_lm.make_cache([0])
        single = official_lm(inputs_embeds=row[None], cache=single_cache)
        assert relative_error(batched[i, padding[i]:], single[0]) <= TOLERANCE
        single_step = official_lm(input_ids=step_ids[i : i + 1], cache=single_cache)
        assert relative_error(batched_step[i], single_step[0]) <= TOLERANCE


def test_logits_match_transformers(tiny):
    path, reference = tiny
    lm = load_language_model(path, token_ids=TINY_IDS)
    ids = np.random.default_rng(1).integers(0, TINY_IDS.vocab_size, size=(2, 17))
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
        embeds = reference.model.embed_tokens(torch.from_numpy(ids)).numpy()
    assert relative_error(lm(input_ids=mx.array(ids)), mx.array(ref)) <= TOLERANCE
    assert relative_error(lm(inputs_embeds=mx.array(embeds)), mx.array(ref)) <= TOLERANCE
    assert relative_error(lm.embed(ids), mx.array(embeds)) == 0.0
    assert relative_error(lm.next_logits(input_ids=mx.array(ids)), mx.array(ref[:, -1])) <= TOLERANCE


def test_stored_dtype_option(official_checkpoint):
    lm = load_language_model(official_checkpoint / "language_model", dtype=None)
    assert lm.dtype == mx.float16  # the release stores float16
    assert lm(input_ids=mx.array([[1, 2, 3]])).dtype == mx.float32


# ----------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_loads_runs_and_reports(tiny, bits):
    path, _ = tiny
    full = load_language_model(path, token_ids=TINY_IDS)
    lm = load_language_model(path, token_ids=TINY_IDS, quantize=bits)
    report = lm.quantization
    assert report.bits == bits and report.group_size == 64
    assert report.bytes_before == full.weight_bytes()
    assert report.bytes_after == lm.weight_bytes() < report.bytes_before
    # MLP width 96 is not a multiple of 64: down_proj (input width 96) stays in full precision.
    assert report.skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "down_proj" in report.describe()
    assert type(lm.model.lm_head).__name__ == "QuantizedLinear"
    assert type(lm.model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert lm.model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    ids = mx.array([[1, 5, 9, 40, 70]])
    ours, ref = np.array(lm(input_ids=ids)), np.array(full(input_ids=ids))
    assert np.isfinite(ours).all()
    agreement = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert agreement > (0.8 if bits == 4 else 0.99), agreement


def test_quantize_rejects_other_bits(tiny):
    with pytest.raises(LaVITError, match="bits must be one of"):
        load_language_model(tiny[0], token_ids=TINY_IDS, quantize=3)


# ----------------------------------------------------------------------------- layouts and errors
def copy_folder(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_sharded_safetensors_with_index(tiny, tmp_path):
    from safetensors.torch import save_file

    path, reference = tiny
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(path / "config.json", folder)
    weight_map = {}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
        weight_map.update({k: name for k in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_language_model(folder, token_ids=TINY_IDS)
    single = load_language_model(path, token_ids=TINY_IDS)
    ids = mx.array([[1, 2, 3, 4]])
    assert relative_error(sharded(input_ids=ids), single(input_ids=ids)) == 0.0

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors is missing \(the index"):
        load_language_model(folder, token_ids=TINY_IDS)


def test_missing_bin_shard_is_named(official_checkpoint, tmp_path):
    folder = copy_folder(official_checkpoint / "language_model", tmp_path / "lm")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="shard pytorch_model-00002-of-00002.bin is missing") as info:
        load_language_model(folder)
    assert "model.layers.1" in str(info.value) or "lm_head" in str(info.value)


def test_rotary_buffers_are_accepted_other_extras_are_not(tiny, tmp_path):
    from safetensors.torch import save_file

    path, reference = tiny
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    folder = copy_folder(path, tmp_path / "extra")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(folder / "model.safetensors"))
    load_language_model(folder, token_ids=TINY_IDS)  # the known extra of old checkpoints

    state["model.layers.0.self_attn.mystery"] = torch.ones(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected key 'model.layers.0.self_attn.mystery'"):
        load_language_model(folder, token_ids=TINY_IDS)


def test_wrong_shape_and_missing_key(tiny, tmp_path):
    from safetensors.torch import save_file

    path, reference = tiny
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    folder = copy_folder(path, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: key 'model\.layers\.\d\.mlp\.\w+_proj\.weight' "
                                              r"has shape \((96, 64|64, 96)\), config.json implies \((128, 64|64, 128)\)"):
        load_language_model(folder, token_ids=TINY_IDS)

    (folder / "config.json").write_text(json.dumps(config))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key 'model.norm.weight'"):
        load_language_model(folder, token_ids=TINY_IDS)


def test_missing_config_and_tokenizer(official_checkpoint, tmp_path):
    folder = copy_folder(official_checkpoint / "language_model", tmp_path / "lm")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="missing text tokenizer .*tokenizer.model"):
        TextTokenizer.from_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_language_model(folder)
    with pytest.raises(CheckpointError, match="language model folder not found"):
        load_language_model(tmp_path / "nowhere")


def test_token_ids_must_fit_the_vocabulary(official_checkpoint):
    with pytest.raises(CheckpointError, match="vocab_size 48386 does not match"):
        load_language_model(official_checkpoint / "language_model", token_ids=TINY_IDS)


def test_prompt_longer_than_context(official_lm):
    limit = official_lm.context_length
    with pytest.raises(LaVITError, match=f"prompt of {limit + 1} tokens is longer than the LLM's context of {limit}"):
        official_lm(input_ids=mx.zeros((1, limit + 1), dtype=mx.int32))
    with pytest.raises(LaVITError, match=f"prompt of {limit - 5} tokens \\+ 36 new tokens exceeds"):
        official_lm.check_length(limit - 5, 36)
    official_lm.check_length(limit - 36, 36)
