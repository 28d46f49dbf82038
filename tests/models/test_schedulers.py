"""DDIM, Euler and DPM-Solver++(2M) against the official fixture and diffusers' schedulers."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from lavit_mlx.errors import LaVITError
from lavit_mlx.schedulers import make_scheduler

TOL = 1e-5  # float32 scalars in diffusers' order of operations; measured <= 2e-6

# LaVIT's scheduler_config.json (DDIM, SD-style betas, leading spacing, steps_offset 1).
LAVIT_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
}


def max_rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_fixture_ddim(official_tiny):
    from safetensors.numpy import load_file

    expected = load_file(str(official_tiny / "expected.safetensors"))
    facts = json.loads((official_tiny / "expected.json").read_text())
    config = json.loads((official_tiny / "checkpoint/pixel_decoding/scheduler/scheduler_config.json").read_text())
    scheduler = make_scheduler("ddim", config)
    scheduler.set_timesteps(5)
    assert np.asarray(scheduler.timesteps).tolist() == facts["ddim_timesteps_5"]
    x = expected["unet_latents"]
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(0.1 * np.sin(x * (i + 1)), t, x)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert max_rel(x, expected["ddim_5step_result"]) <= 1e-4


# ------------------------------------------------------------------------- against diffusers
def variants():
    """(scheduler name, config overrides on LAVIT_CONFIG, steps)."""
    cases = [
        ("ddim", {}, 25),
        ("ddim", {"timestep_spacing": "trailing", "steps_offset": 0}, 7),
        ("ddim", {"timestep_spacing": "linspace", "set_alpha_to_one": True}, 10),
        ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "clip_sample": True, "clip_sample_range": 1.5}, 6),
        ("ddim", {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2",
                  "set_alpha_to_one": True, "timestep_spacing": "trailing"}, 8),
        ("ddim", {"prediction_type": "sample", "clip_sample": True}, 5),
        ("euler", {}, 12),
        ("euler", {"timestep_spacing": "linspace"}, 9),  # fractional timesteps
        ("euler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 6),
        ("euler", {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"}, 5),
        ("dpm++2m", {}, 20),  # >= 15 steps: second order up to the last step
        ("dpm++2m", {"timestep_spacing": "linspace"}, 8),
        ("dpm++2m", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10),
        ("dpm++2m", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 6),
        ("dpm++2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min", "steps_offset": 0}, 16),
        ("dpm++2m", {"solver_type": "heun", "prediction_type": "sample"}, 7),
        ("dpm++2m", {"solver_order": 1, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                     "timestep_spacing": "linspace"}, 6),  # the top 4 timesteps clipped
        # zero terminal SNR (the shapes model's pixel decoder: DDIM, trailing, v-prediction)
        ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 20),
        ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 8),
        ("dpm++2m", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
         8),
    ]
    return [pytest.param(name, overrides, steps, id=f"{name}-{i}") for i, (name, overrides, steps) in enumerate(cases)]


def diffusers_scheduler(name: str, config: dict):
    diffusers = pytest.importorskip("diffusers")
    cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
           "dpm++2m": diffusers.DPMSolverMultistepScheduler}[name]
    return cls.from_config(config)


def fake_model(x: np.ndarray, i: int) -> np.ndarray:
    """A fixed, input-dependent stand-in for the UNet (the same numbers go to both sides)."""
    return (0.1 * np.sin(x * (i + 1)) + 0.3 * x).astype(np.float32)


@pytest.mark.parametrize("name,overrides,steps", variants())
def test_matches_diffusers(name, overrides, steps):
    torch = pytest.importorskip("torch")
    config = dict(LAVIT_CONFIG, **overrides)
    ref = diffusers_scheduler(name, config)
    ours_np, ours_mx = make_scheduler(name, config), make_scheduler(name, config)
    for scheduler in (ref, ours_np, ours_mx):
        scheduler.set_timesteps(steps)
    assert np.array_equal(np.asarray(ours_np.timesteps), ref.timesteps.numpy())
    assert ours_np.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    # Euler starts at x = init_noise_sigma * noise: at zero terminal SNR sigma_max is 4096 (diffusers
    # clamps the last alpha_bar to 2^-24), and its first step cancels ~12 of float32's 24 bits, so
    # the two float32 orders of operations may differ by eps * sigma_max (2.3e-5 measured on an AMD
    # EPYC, 2e-6 on an Intel Xeon); the other cases keep TOL (measured within it on both)
    zero_snr = bool(config.get("rescale_betas_zero_snr"))
    tol = max(TOL, 2 * float(np.finfo(np.float32).eps) * float(ref.init_noise_sigma)) if zero_snr else TOL
    start = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)
    x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    x_np = start * ours_np.init_noise_sigma
    x_mx = mx.array(start) * ours_mx.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        model_in = ours_np.scale_model_input(x_np, ours_np.timesteps[i])
        assert max_rel(model_in, ref.scale_model_input(x_ref, t)) <= tol
        output = fake_model(model_in, i)
        x_ref = ref.step(torch.from_numpy(output), t, x_ref).prev_sample
        x_np = ours_np.step(output, ours_np.timesteps[i], x_np)
        mx_in = ours_mx.scale_model_input(x_mx, ours_mx.timesteps[i])
        x_mx = ours_mx.step(mx.array(fake_model(np.array(mx_in), i)), ours_mx.timesteps[i], x_mx)
    assert isinstance(x_np, np.ndarray) and x_np.dtype == np.float32
    assert isinstance(x_mx, mx.array) and x_mx.dtype == mx.float32
    assert max_rel(x_np, x_ref.numpy()) <= tol
    assert max_rel(x_mx, x_ref.numpy()) <= tol


def test_zero_terminal_snr_schedule_is_diffusers():
    from lavit_mlx.schedulers import NoiseScheduleConfig, alphas_cumprod

    config = dict(LAVIT_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ours = alphas_cumprod(NoiseScheduleConfig.from_dict(config))
    plain = alphas_cumprod(NoiseScheduleConfig.from_dict(LAVIT_CONFIG))
    assert ours[-1] == 0.0 and plain[-1] > 0.004  # pure noise at the last step, as sampling starts
    assert ours[0] == pytest.approx(plain[0], rel=1e-6)
    ref = diffusers_scheduler("ddim", config)
    assert np.abs(ours - ref.alphas_cumprod.numpy()).max() <= 1e-6


def test_step_needs_timesteps():
    with pytest.raises(LaVITError, match="set_timesteps"):
        make_scheduler("ddim", LAVIT_CONFIG).step(np.zeros(2), 981, np.zeros(2))


@pytest.mark.parametrize("name,overrides,needle", [
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("ddim", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr needs prediction_type v_prediction"),
    ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm++2m", {"solver_order": 3}, "solver_order"),
    ("dpm++2m", {"variance_type": "learned_range"}, "variance_type"),
])
def test_unsupported_config_value_is_named(name, overrides, needle):
    with pytest.raises(LaVITError, match=needle):
        make_scheduler(name, dict(LAVIT_CONFIG, **overrides))


def test_unknown_scheduler_and_step_count():
    with pytest.raises(LaVITError, match="'pndm'"):
        make_scheduler("pndm", LAVIT_CONFIG)
    with pytest.raises(LaVITError, match="1001 steps"):
        make_scheduler("euler", LAVIT_CONFIG).set_timesteps(1001)


def test_too_many_ddim_steps_is_a_one_line_error(official_checkpoint):
    import json

    from lavit_mlx.errors import LaVITError
    from lavit_mlx.schedulers import make_scheduler

    config = json.loads((official_checkpoint / "pixel_decoding" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = make_scheduler("ddim", config)
    with pytest.raises(LaVITError, match="use at most 999 steps"):
        scheduler.set_timesteps(1000)
    scheduler.set_timesteps(999)
    assert int(scheduler.timesteps.max()) == 999
