"""The memory check before generation (issue 8): a size whose pixel decoding cannot fit is
refused in one line that names the estimate, before the pixel decoder loads and before
the LLM generates a token, through the API, the server's runner and the CLI.

`LAVIT_MEMORY_LIMIT_GB` caps the memory the check counts on, so these tests do not
depend on the machine: 4096x4096 on official-tiny needs tens of GiB, 1 GiB is given.
"""

from __future__ import annotations

import pytest

import lavit_mlx
import lavit_mlx.generation as generation
from lavit_mlx.errors import LaVITError
from lavit_mlx.generation import (
    GenerationSettings,
    check_generation_memory,
    generate_stages,
    llm_weight_bytes,
    pixel_memory_estimate,
    reconstruct_stages,
)
from lavit_mlx.memory import MEMORY_LIMIT_ENV, available_memory
from support import assert_one_line_error

GiB = 2**30


class LLMCalled(Exception):
    pass


@pytest.fixture
def model(official_checkpoint):
    return lavit_mlx.load(official_checkpoint, vision_heads=2)


@pytest.fixture
def no_llm(monkeypatch):
    """The LLM's token stream fails the test if anything reaches it."""
    calls = []

    def stream(*args, **kwargs):
        calls.append(args)
        raise LLMCalled("the LLM was asked for tokens")
        yield  # noqa: unreachable - a generator like the real one

    monkeypatch.setattr(generation, "stream_image_tokens", stream)
    return calls


def huge(**kw) -> GenerationSettings:
    base = dict(prompt="a red car", width=4096, height=4096, steps=1, seed=1)
    base.update(kw)
    return GenerationSettings(**base)


def first_event(stages):
    return next(iter(stages))


def assert_refusal(message: str, *fragments: str) -> None:
    assert "\n" not in message
    assert "4096x4096" in message and "GiB (denoising" in message and "is available" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_api_refuses_before_the_decoder_loads_and_the_llm_runs(model, no_llm, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(LaVITError) as error:
        first_event(generate_stages(model, huge()))
    estimate, _ = pixel_memory_estimate(model, huge().resolved())
    assert_refusal(str(error.value), f"{estimate.peak_bytes / GiB:.1f} GiB", "1.0 GiB is available",
                   "--width/--height", "-n", "--low-memory", "--decoder lowres")
    assert no_llm == []
    assert model.loaded == []  # nothing was built: neither the pixel decoder nor the LLM


def test_lowres_reconstruction_and_several_images_are_checked(model, no_llm, monkeypatch, official_tiny):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    monkeypatch.setattr(type(model), "tokenize", lambda *a, **k: pytest.fail("tokenized before the check"))
    with pytest.raises(LaVITError) as error:
        first_event(reconstruct_stages(model, str(official_tiny / "input.png"), huge(prompt="", decoder="lowres")))
    message = str(error.value)
    assert_refusal(message)
    assert "--decoder lowres" not in message and "--ratio" not in message and "--low-memory" not in message
    with pytest.raises(LaVITError, match="of 3 images at 4096x4096"):
        first_event(generate_stages(model, huge(), prompts=["a", "b", "c"]))
    assert no_llm == [] and model.loaded == []


def test_the_check_can_be_turned_off(model, no_llm, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(LLMCalled):  # past the check: the LLM is the next thing to run
        first_event(generate_stages(model, huge(), check_memory=False))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "off")
    with pytest.raises(LLMCalled):
        first_event(generate_stages(model, huge()))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(LaVITError, match=f"{MEMORY_LIMIT_ENV}='lots': expected a number of GiB"):
        available_memory()


def test_a_size_that_fits_runs(model, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    assert available_memory() <= GiB
    events = list(generate_stages(model, huge(width=32, height=32, steps=1)))
    assert events[-1].images[0].shape == (32, 32, 3)


def test_the_estimate_from_the_config_equals_the_loaded_decoders(model):
    """No weights are needed: the parameter bytes counted on the unloaded modules are those loaded."""
    for decoder in ("highres", "lowres"):
        s = huge(decoder=decoder, width=256, height=192).resolved()
        from_config, resident = pixel_memory_estimate(model, s)
        assert resident == 0 and from_config.breakdown["weights"] > 0
        loaded = model.pixel_decoder(decoder == "highres")
        from_weights, resident = pixel_memory_estimate(model, s)
        assert resident == loaded.weight_bytes() == from_config.breakdown["weights"]
        assert from_weights == from_config
    # a loaded decoder's weights are resident: only the rest must be available
    s = huge(width=256, height=192).resolved()
    estimate, resident = pixel_memory_estimate(model, s)
    check_generation_memory(model, s, available=estimate.peak_bytes - resident + llm_weight_bytes(model))
    with pytest.raises(LaVITError, match="more memory"):
        check_generation_memory(model, s, available=estimate.peak_bytes - resident - 1, uses_llm=False)


def test_the_llm_kept_loaded_is_counted_without_low_memory(model):
    s = huge(width=256, height=192).resolved()
    estimate, _ = pixel_memory_estimate(model, s)
    llm = llm_weight_bytes(model)
    assert llm > 0
    between = estimate.peak_bytes + llm // 2
    with pytest.raises(LaVITError) as error:
        check_generation_memory(model, s, available=between)
    assert "for the LLM's weights" in str(error.value) and "--low-memory" in str(error.value)
    check_generation_memory(model, huge(width=256, height=192, low_memory=True).resolved(), available=between)
    check_generation_memory(model, s, available=between, uses_llm=False)  # reconstruction: no LLM
    model.llm  # noqa: B018 - loaded now: its memory is no longer available, not counted twice
    assert llm_weight_bytes(model) == 0
    check_generation_memory(model, s, available=estimate.peak_bytes)


def test_the_servers_runner_is_checked(model, no_llm, monkeypatch):
    from lavit_mlx.serve.tasks import Generation, generate

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(LaVITError) as error:
        next(generate(model, [Generation(huge().resolved(), [])]))
    assert_refusal(str(error.value))
    assert no_llm == [] and model.loaded == []


def test_cli_refuses_in_one_line(cli, official_tiny, tmp_path):
    out = tmp_path / "big.png"
    code, stdout, err = cli("generate", "-p", "a red car", "-m", official_tiny / "checkpoint", "--vision-heads", "2",
                            "--width", "4096", "--height", "4096", "--steps", "1", "--out", out,
                            env={MEMORY_LIMIT_ENV: "1"})
    assert_one_line_error(code, stdout, err, "4096x4096", "GiB (denoising", "1.0 GiB is available", "--low-memory")
    assert "image tokens" not in err  # the LLM stage never started
    assert not out.exists()
    code, stdout, err = cli("reconstruct", official_tiny / "input.png", "-m", official_tiny / "checkpoint",
                            "--vision-heads", "2", "--width", "4096", "--height", "4096", "--steps", "1",
                            "--out", tmp_path / "r.png", env={MEMORY_LIMIT_ENV: "1"})
    assert_one_line_error(code, stdout, err, "4096x4096", "1.0 GiB is available")
