"""Noise schedulers for the pixel decoders: DDIM, Euler and DPM-Solver++(2M).

Each follows the diffusers 0.42 class of the same name (`DDIMScheduler` with eta = 0,
`EulerDiscreteScheduler` without churn, `DPMSolverMultistepScheduler` with
algorithm_type 'dpmsolver++'), for the config values LaVIT's and Stable Diffusion's
scheduler configs use. The official LaVIT pipelines always build `DDIMScheduler` from
the checkpoint's `scheduler_config.json` (LAVIT_REFERENCE.md section 3); Euler and
DPM-Solver++ reach comparable images in fewer steps.

The noise schedule is computed in float32 as diffusers does (float32 linspace and
cumprod), and every update uses float32 scalars in the same order of operations, so
results match diffusers to float32 rounding. `step` works on `mx.array` and on numpy
arrays alike and returns the same kind. A config key a scheduler does not know is
ignored (diffusers' `from_config` does the same); a known key with an unsupported value
raises `LaVITError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import LaVITError

# squaredcos_cap_v2 (Nichol & Dhariwal 2021): offset s of the cosine and the beta cap.
COSINE_OFFSET = 0.008
MAX_BETA = 0.999
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _reject(name: str, key: str, value, supported) -> None:
    raise LaVITError(f"{name} scheduler: {key}={value!r} is not supported (supported: {supported})")


@dataclass
class NoiseScheduleConfig:
    """Keys shared by the schedulers; each subclass sets diffusers' defaults for its class."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Sequence[float]] = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False

    scheduler_name = "noise"

    @classmethod
    def from_dict(cls, config: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        name = self.scheduler_name
        if self.trained_betas is None and self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            _reject(name, "beta_schedule", self.beta_schedule, "linear, scaled_linear, squaredcos_cap_v2")
        if self.prediction_type not in PREDICTION_TYPES:
            _reject(name, "prediction_type", self.prediction_type, ", ".join(PREDICTION_TYPES))
        if self.timestep_spacing not in SPACINGS:
            _reject(name, "timestep_spacing", self.timestep_spacing, ", ".join(SPACINGS))
        if self.thresholding:
            _reject(name, "thresholding", self.thresholding, "false")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise LaVITError(f"{name} scheduler: rescale_betas_zero_snr needs prediction_type v_prediction or sample "
                             "(at zero SNR the noise says nothing of the picture)")


def alphas_cumprod(config: NoiseScheduleConfig) -> np.ndarray:
    """Cumulative products of 1 - beta, float32, as diffusers' schedulers compute them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = _linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = _linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2, in float64 then rounded, as diffusers' betas_for_alpha_bar

        def alpha_bar(t):
            return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), MAX_BETA) for i in range(n)],
                         dtype=np.float32)
    if config.rescale_betas_zero_snr:
        betas = zero_terminal_snr(betas)
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    # torch's CPU cumprod of float32 accumulates in float64 and rounds each output.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers `rescale_zero_terminal_snr` (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"): sqrt(alpha_bar) shifted and scaled so that it
    keeps its first value and ends at exactly 0, so that the last timestep is pure noise, as
    the sampler's starting latents are. Without it a world whose latents have a large mean
    (a white canvas) is sampled from a start the model never saw."""
    root = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = (root ** 2).astype(np.float32)
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _finite_terminal(scheduler: "Scheduler") -> None:
    """Euler and DPM-Solver, as diffusers: with a zero terminal SNR the last alpha_bar is
    2^-24, not 0, so that sigma and the log-SNR stay finite."""
    if scheduler.config.rescale_betas_zero_snr:
        scheduler.alphas_cumprod[-1] = np.float32(2.0 ** -24)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32): the float32 step from the near end.

    torch computes `start + i * step` for the first half and `end - (steps - 1 - i) * step`
    for the second, in float32; numpy's float64 linspace can differ in the last bit.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float32)
    half = steps // 2
    return np.where(i < half, start32 + step * i, end32 - step * (np.float32(steps - 1) - i)).astype(np.float32)


def _f(x) -> float:
    """A float32 scalar as a Python float: exact, and it keeps the array's float32 dtype."""
    return float(np.float32(x))


def _sqrt(x) -> np.float32:
    """float32 square root; torch evaluates `x ** 0.5` on float32 tensors as sqrt."""
    return np.sqrt(np.float32(x))


def _clip(x, low: float, high: float):
    return mx.clip(x, low, high) if isinstance(x, mx.array) else np.clip(x, low, high)


def _spaced_timesteps(config: NoiseScheduleConfig, num_steps: int, last: int, extra: int = 0) -> np.ndarray:
    """The inference timesteps (float64, descending) of diffusers' three spacings.

    `extra` = 1 reproduces DPM-Solver's linspace/leading rule: num_steps + 1 points with
    the final (smallest) one dropped.
    """
    n = num_steps + extra
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, last - 1, n).round()[::-1]
    elif config.timestep_spacing == "leading":
        steps = (np.arange(0, n) * (last // n)).round()[::-1] + config.steps_offset
    else:  # trailing
        steps = np.round(np.arange(last, 0, -config.num_train_timesteps / num_steps)) - 1
    return steps[: len(steps) - extra] if extra else steps


class Scheduler:
    """The interface of the three schedulers.

    Use: `set_timesteps(n)`; latents = noise * `init_noise_sigma`; for each t in
    `timesteps`: model input = `scale_model_input(latents, t)`, then
    latents = `step(model_output, t, latents)`. Euler and DPM-Solver++ count their steps
    from the first timestep given, as diffusers does, so call them in schedule order.
    """

    name = "scheduler"
    config: NoiseScheduleConfig

    def __init__(self, config: NoiseScheduleConfig):
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.timesteps: np.ndarray = np.arange(config.num_train_timesteps)[::-1].copy()
        self.num_inference_steps: Optional[int] = None

    @classmethod
    def from_config(cls, config: dict) -> "Scheduler":
        """Build from a diffusers scheduler config dict (unknown keys ignored)."""
        return cls(cls.config_class.from_dict(config))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose `num_inference_steps` inference timesteps (`timesteps`, descending)."""
        raise NotImplementedError

    def step(self, model_output, timestep, sample):
        """One denoising step.

        Args:
            model_output: the UNet's prediction (epsilon, v or sample, per prediction_type).
            timestep: the current entry of `timesteps`.
            sample: the current latents; mx.array or numpy array, like model_output.
        Returns:
            The latents one step less noisy, of the input's kind (float32).
        """
        raise NotImplementedError

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _check_steps(self, num_inference_steps: int) -> None:
        if not 0 < num_inference_steps <= self.config.num_train_timesteps:
            raise LaVITError(f"{self.name} scheduler: {num_inference_steps} steps; expected 1 to "
                             f"{self.config.num_train_timesteps} (num_train_timesteps)")

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise LaVITError(f"{self.name} scheduler: call set_timesteps before step")


# --------------------------------------------------------------------------- DDIM
@dataclass
class DDIMConfig(NoiseScheduleConfig):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    scheduler_name = "ddim"


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0), diffusers `DDIMScheduler`."""

    name = "ddim"
    config_class = DDIMConfig

    def __init__(self, config: DDIMConfig):
        super().__init__(config)
        # alpha_bar "before" the first training step: 1, or that of step 0.
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        steps = _spaced_timesteps(self.config, num_inference_steps, self.config.num_train_timesteps)
        if steps.size and int(steps.max()) >= self.config.num_train_timesteps:
            # e.g. 1000 "leading" steps with steps_offset 1 reach timestep 1000, past the schedule
            most = next(n for n in range(num_inference_steps - 1, 0, -1)
                        if int(_spaced_timesteps(self.config, n, self.config.num_train_timesteps).max())
                        < self.config.num_train_timesteps)
            raise LaVITError(f"{self.name} scheduler: {num_inference_steps} steps reach timestep {int(steps.max())}, "
                             f"past the {self.config.num_train_timesteps} of the schedule; use at most {most} steps")
        self.num_inference_steps = num_inference_steps
        self.timesteps = steps.astype(np.int64).copy()

    def step(self, model_output, timestep, sample):
        """x_t -> x_{t-1}: (model_output, sample) of one kind (mx or numpy), returns that kind."""
        self._require_timesteps()
        cfg = self.config
        t = int(timestep)
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1) - alpha_prod_t
        sqrt_alpha, sqrt_beta = _f(_sqrt(alpha_prod_t)), _f(_sqrt(beta_prod_t))
        if cfg.prediction_type == "epsilon":
            pred_original = (sample - sqrt_beta * model_output) / sqrt_alpha
            pred_epsilon = model_output
        elif cfg.prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - sqrt_alpha * pred_original) / sqrt_beta
        else:  # v_prediction
            pred_original = sqrt_alpha * sample - sqrt_beta * model_output
            pred_epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        if cfg.clip_sample:
            pred_original = _clip(pred_original, -cfg.clip_sample_range, cfg.clip_sample_range)
        direction = _f(_sqrt(np.float32(1) - alpha_prod_prev)) * pred_epsilon
        return _f(_sqrt(alpha_prod_prev)) * pred_original + direction


# --------------------------------------------------------------------------- Euler
@dataclass
class EulerConfig(NoiseScheduleConfig):
    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    scheduler_name = "euler"

    def __post_init__(self):
        super().__post_init__()
        _check_sigma_options(self, "interpolation_type", "linear")
        if self.timestep_type != "discrete":
            _reject("euler", "timestep_type", self.timestep_type, "discrete")


def _check_sigma_options(config, *extra) -> None:
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if getattr(config, key):
            _reject(config.scheduler_name, key, getattr(config, key), "false")
    if config.final_sigmas_type not in ("zero", "sigma_min"):
        _reject(config.scheduler_name, "final_sigmas_type", config.final_sigmas_type, "zero, sigma_min")
    if extra and getattr(config, extra[0]) != extra[1]:
        _reject(config.scheduler_name, extra[0], getattr(config, extra[0]), extra[1])


def _inference_sigmas(scheduler: Scheduler, timesteps: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) interpolated at the timesteps, plus the final sigma."""
    ac = scheduler.alphas_cumprod
    train_sigmas = np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    last = train_sigmas[0] if scheduler.config.final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32)


class _StepIndexed(Scheduler):
    """Schedulers that count steps from the first timestep they are given (diffusers' step_index)."""

    step_index: Optional[int] = None

    def _index_of(self, timestep) -> int:
        matches = np.nonzero(self.timesteps == np.asarray(timestep, dtype=self.timesteps.dtype))[0]
        if len(matches) == 0:
            raise LaVITError(f"{self.name} scheduler: timestep {timestep} is not in the schedule")
        # diffusers starts from the second match when a timestep repeats (image-to-image).
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _current_index(self, timestep) -> int:
        self._require_timesteps()
        if self.step_index is None:
            self.step_index = self._index_of(timestep)
        return self.step_index


class EulerDiscreteScheduler(_StepIndexed):
    """Euler steps on the sigma parameterisation, diffusers `EulerDiscreteScheduler` (no churn)."""

    name = "euler"
    config_class = EulerConfig

    def __init__(self, config: EulerConfig):
        super().__init__(config)
        _finite_terminal(self)
        self.sigmas = _inference_sigmas(self, self.timesteps.astype(np.float64))

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        n = self.config.num_train_timesteps
        if self.config.timestep_spacing == "linspace":
            # Fractional timesteps: float32 linspace, as diffusers.
            steps = np.linspace(0, n - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        else:
            steps = _spaced_timesteps(self.config, num_inference_steps, n).astype(np.float32)
        self.sigmas = _inference_sigmas(self, steps)
        self.timesteps = steps.astype(np.float32)
        self.step_index = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = np.float32(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(_sqrt(max_sigma ** 2 + np.float32(1)))

    def scale_model_input(self, sample, timestep=None):
        """sample / sqrt(sigma^2 + 1): the UNet's input at this step."""
        sigma = self.sigmas[self._current_index(timestep)]
        return sample / _f(_sqrt(sigma ** 2 + np.float32(1)))

    def step(self, model_output, timestep, sample):
        index = self._current_index(timestep)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        if self.config.prediction_type == "epsilon":
            pred_original = sample - _f(sigma) * model_output
        elif self.config.prediction_type == "sample":
            pred_original = model_output
        else:  # v_prediction
            scale_v = _f(-sigma / _sqrt(sigma ** 2 + np.float32(1)))
            pred_original = model_output * scale_v + sample / _f(sigma ** 2 + np.float32(1))
        derivative = (sample - pred_original) / _f(sigma)
        self.step_index = index + 1
        return sample + derivative * _f(sigma_next - sigma)


# --------------------------------------------------------------------------- DPM-Solver++(2M)
@dataclass
class DPMSolverConfig(NoiseScheduleConfig):
    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: Optional[str] = None

    scheduler_name = "dpm++2m"

    def __post_init__(self):
        super().__post_init__()
        _check_sigma_options(self)
        checks = (("algorithm_type", self.algorithm_type in ("dpmsolver++",), "dpmsolver++"),
                  ("solver_order", self.solver_order in (1, 2), "1, 2"),
                  ("solver_type", self.solver_type in ("midpoint", "heun"), "midpoint, heun"),
                  ("use_lu_lambdas", not self.use_lu_lambdas, "false"),
                  ("use_flow_sigmas", not self.use_flow_sigmas, "false"),
                  ("variance_type", self.variance_type is None, "null"))
        for key, ok, supported in checks:
            if not ok:
                _reject(self.scheduler_name, key, getattr(self, key), supported)


def _alpha_sigma(sigma: np.float32):
    """(alpha_t, sigma_t) of the VP process at sigma = sigma_t / alpha_t, in float32."""
    alpha = np.float32(1) / _sqrt(sigma ** 2 + np.float32(1))
    return alpha, sigma * alpha


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):  # sigma = 0 at the last step: lambda = +inf, as torch
        return np.log(alpha) - np.log(sigma)


class DPMSolverMultistepScheduler(_StepIndexed):
    """DPM-Solver++ (2M by default), diffusers `DPMSolverMultistepScheduler`, final step first order."""

    name = "dpm++2m"
    config_class = DPMSolverConfig

    def __init__(self, config: DPMSolverConfig):
        super().__init__(config)
        _finite_terminal(self)
        ac = self.alphas_cumprod
        self.lambdas = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))).astype(np.float32)
        self.model_outputs: List = [None] * config.solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg = self.config
        # Timesteps whose log-SNR is below lambda_min_clipped are cut from the top.
        clipped = int(np.searchsorted(self.lambdas[::-1], np.float32(cfg.lambda_min_clipped), side="left"))
        last = cfg.num_train_timesteps - clipped
        if cfg.timestep_spacing == "trailing":
            steps = _spaced_timesteps(cfg, num_inference_steps, last)
        else:
            steps = _spaced_timesteps(cfg, num_inference_steps, last, extra=1)
        steps = steps.astype(np.int64).copy()
        self.sigmas = _inference_sigmas(self, steps)
        self.timesteps = steps
        self.num_inference_steps = len(steps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self.step_index = None

    def _to_x0(self, model_output, sample, sigma):
        if self.config.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - _f(sigma_t) * model_output) / _f(alpha_t)
        return _f(alpha_t) * sample - _f(sigma_t) * model_output  # v_prediction

    def step(self, model_output, timestep, sample):
        cfg = self.config
        index = self._current_index(timestep)
        count = len(self.timesteps)
        # The last step is first order for short schedules (diffusers: under 15 steps) or
        # when the final sigma is 0. (diffusers' second-to-last rule only lowers order 3.)
        last_step_first_order = index == count - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and count < 15) or cfg.final_sigmas_type == "zero")

        x0 = self._to_x0(model_output, sample, self.sigmas[index])
        self.model_outputs = self.model_outputs[1:] + [x0]

        alpha_t, sigma_t = _alpha_sigma(self.sigmas[index + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[index])
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s0, sigma_s0)
        with np.errstate(over="ignore"):
            phi = alpha_t * (np.exp(-h) - np.float32(1))  # alpha_t (e^{-h} - 1)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or last_step_first_order:
            prev = _f(sigma_t / sigma_s0) * sample - _f(phi) * x0
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[index - 1])
            h_0 = _lambda(alpha_s0, sigma_s0) - _lambda(alpha_s1, sigma_s1)
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            d1 = _f(np.float32(1) / (h_0 / h)) * (m0 - m1)
            if cfg.solver_type == "midpoint":
                prev = _f(sigma_t / sigma_s0) * sample - _f(phi) * m0 - _f(np.float32(0.5) * phi) * d1
            else:  # heun
                prev = (_f(sigma_t / sigma_s0) * sample - _f(phi) * m0
                        + _f(alpha_t * ((np.exp(-h) - np.float32(1)) / h + np.float32(1))) * d1)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self.step_index = index + 1
        return prev


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, config: dict) -> Scheduler:
    """A scheduler by name ('ddim', 'euler', 'dpm++2m') from a diffusers scheduler config dict.

    The dict may be any diffusers scheduler's config (LaVIT ships DDIM's): keys the chosen
    scheduler does not use are ignored, as diffusers' `from_config` does.
    """
    if name not in SCHEDULERS:
        raise LaVITError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
