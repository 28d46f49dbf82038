"""Check the project against a golden fixture written by the official LaVIT modules.

    python tests/parity.py FIXTURE_DIR [--allow-skip] [--vision-heads N]

FIXTURE_DIR holds `checkpoint/` (released layout, or the MLX folder format),
`input.png`, `expected.safetensors` and `expected.json` (LAVIT_REFERENCE.md section 6).
Every tensor and fact is recomputed with the project's own loader and pipeline, end to
end from `input.png`, and reported as one line:

    KEY ok|FAIL|SKIP max_abs=A max_rel=R

with R = max|ours - ref| / max|ref|. The rules:

- tensors: R <= 1e-4 (UNet and VAE outputs 1e-3); ids and masks exactly;
- `json:keep_margin`, `json:code_margin` (the smallest gap between two computed values:
  the keep/drop log-probabilities of one patch, the best two code distances): the gap's
  error is the error of the values it is taken from, so |ours - ref| <= 1e-4 * max(1,
  |values|) (the two log-probabilities of that patch; for codes, distances between unit
  vectors, scale 1). Relative to the small gap itself that is looser than 1e-4, which is
  what the max_rel column shows;
- `json:config`: the sizes read from the checkpoint's shapes against the fixture's
  record; the head count cannot be read from shapes (it is given to the loader), so it
  is not compared here: the tokenizer and decoder outputs only match with the right one;
- inputs (`unet_latents`, `lowres_unet_mask`, `highres_time_ids`,
  `llm_generation_input_ids`) are used as given, not compared: each is reported as
  `input`, ok when every key that consumes it passes, and counted apart from the
  comparisons.

Keys of `expected.json` are printed as `json:KEY`. The exit status is 1 on any FAIL, on a
key this script does not know, and on a SKIP unless --allow-skip is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from functools import cached_property
from pathlib import Path

import numpy as np

FLOAT_TOL = 1e-4
PIXEL_TOL = 1e-3  # UNet and VAE outputs


class NotBuilt(Exception):
    """The project does not implement what this key needs (yet)."""


class Fixture:
    """The fixture's references and the project's results, computed on demand."""

    def __init__(self, root: Path, vision_heads: int | None):
        from safetensors.numpy import load_file

        self.root = root
        self.tensors = load_file(str(root / "expected.safetensors"))
        self.facts = json.loads((root / "expected.json").read_text())
        self.fixture_config = self.facts.get("config", {})
        self.vision_heads = vision_heads or self.fixture_config.get("heads")

    # ---------------------------------------------------------------- our side
    @cached_property
    def model(self):
        import lavit_mlx

        return lavit_mlx.load(self.root / "checkpoint", vision_heads=self.vision_heads)

    @cached_property
    def pixel_values(self):
        from lavit_mlx.image_processing import load_images

        return load_images([self.root / "input.png"])

    @cached_property
    def encoder_features(self):
        return np.array(self.model.encode(self.pixel_values))

    @cached_property
    def tokenizer_out(self):
        return self.model.tokenize_pixels(self.pixel_values)

    @cached_property
    def understanding_out(self):
        return self.model.tokenize_pixels(self.pixel_values, understanding=True)

    @cached_property
    def codes(self):
        return self.tokenizer_out.codes[0]

    @cached_property
    def llm_token_ids(self):
        from lavit_mlx.lavit import ImageTokens

        tokens = ImageTokens(self.codes, np.array(self.tokenizer_out.keep_mask)[0] > 0.5)
        return tokens.llm_ids(self.model.token_ids)

    def need(self, module: str, attribute: str | None = None):
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise NotBuilt(f"{module} not built") from exc
        if attribute is not None and not hasattr(mod, attribute):
            raise NotBuilt(f"{module}.{attribute} not built")
        return getattr(mod, attribute) if attribute else mod

    @cached_property
    def llm(self):
        self.need("lavit_mlx.models.llm")
        return self.model.llm

    @cached_property
    def decoded(self):
        """(lowres_condition, highres_prompt_embeds, highres_pooled) from our codes."""
        self.need("lavit_mlx.models.vq_decoder")
        low = self.model.decode_codes([self.codes], highres=False)
        high = self.model.decode_codes([self.codes], highres=True)
        return np.array(low), np.array(high[0]), np.array(high[1])

    def pixel_decoder(self, highres: bool):
        self.need("lavit_mlx.models.unet")
        return self.model.pixel_decoder(highres)


# -------------------------------------------------------------------- checks
def compare(ours, ref, exact: bool = False, tol: float = FLOAT_TOL):
    """(ok, max_abs, max_rel) of ours against ref."""
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    if ours.shape != ref.shape:
        if ours.size == ref.size and exact is False:
            ours = ours.reshape(ref.shape)
        else:
            return False, math.inf, math.inf
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = max_abs == 0 if exact else max_rel <= tol
    return ok, max_abs, max_rel


def tensor_checks(fx: Fixture):
    """KEY -> callable returning (ours, exact, tol) for expected.safetensors."""
    t = fx.tensors

    def llm_generation_logits():
        fx.need("lavit_mlx.models.llm")
        ids = t["llm_generation_input_ids"]
        tail = ids[0, -len(fx.llm_token_ids):].tolist()
        if tail != fx.llm_token_ids:
            raise AssertionError("llm_generation_input_ids does not end with our llm_token_ids")
        import mlx.core as mx

        return fx.model.llm(input_ids=mx.array(ids))[:, -4:]

    def understanding_embeds():
        import mlx.core as mx

        fx.need("lavit_mlx.models.llm")
        prompt_ids = [3148, 1139, 29901]
        return mx.stack(fx.model.understanding_rows([fx.understanding_out.visual_embeds[0]], [prompt_ids]))

    def understanding_logits():
        fx.need("lavit_mlx.models.llm")
        return fx.model.llm(inputs_embeds=understanding_embeds())[:, -4:]

    def unet_out(highres: bool):
        decoder = fx.pixel_decoder(highres)
        low, high, pooled = fx.decoded
        latents = t["unet_latents"]
        batch = latents.shape[0]
        if highres:
            context = np.repeat(high, batch, axis=0)
            return decoder.unet_forward(
                latents, 501, context, pooled=np.repeat(pooled, batch, axis=0),
                time_ids=t["highres_time_ids"],
            )
        context = np.repeat(low, batch, axis=0)
        return decoder.unet_forward(latents, 501, context, mask=t["lowres_unet_mask"])

    def vae_decoded(highres: bool):
        decoder = fx.pixel_decoder(highres)
        return decoder.vae_decode_raw(t["unet_latents"] / decoder.scaling_factor)

    def ddim():
        fx.need("lavit_mlx.schedulers")
        decoder = fx.pixel_decoder(False)
        scheduler = decoder.scheduler("ddim")
        scheduler.set_timesteps(5)
        x = t["unet_latents"]
        for i, step in enumerate(scheduler.timesteps):
            eps = 0.1 * np.sin(x * (i + 1))
            x = scheduler.step(eps, step, x)
        return x

    return {
        "pixel_values": lambda: (fx.pixel_values, False, FLOAT_TOL),
        "encoder_features": lambda: (fx.encoder_features, False, FLOAT_TOL),
        "selector_logprobs": lambda: (np.array(fx.tokenizer_out.logprobs), False, FLOAT_TOL),
        "keep_mask": lambda: (np.array(fx.tokenizer_out.keep_mask), True, 0),
        "merged_features": lambda: (np.array(fx.tokenizer_out.merged), False, FLOAT_TOL),
        "code_ids": lambda: (fx.codes, True, 0),
        "quantized": lambda: (np.array(fx.tokenizer_out.quantized), False, FLOAT_TOL),
        "understanding_visual_embeds": lambda: (
            np.array(fx.understanding_out.visual_embeds[0]), False, FLOAT_TOL),
        "llm_generation_logits_last4": lambda: (np.array(llm_generation_logits()), False, FLOAT_TOL),
        "llm_understanding_inputs_embeds": lambda: (np.array(understanding_embeds()), False, FLOAT_TOL),
        "llm_understanding_logits_last4": lambda: (np.array(understanding_logits()), False, FLOAT_TOL),
        "lowres_condition": lambda: (fx.decoded[0], False, FLOAT_TOL),
        "highres_prompt_embeds": lambda: (fx.decoded[1], False, FLOAT_TOL),
        "highres_pooled": lambda: (fx.decoded[2], False, FLOAT_TOL),
        "lowres_unet_out": lambda: (np.array(unet_out(False)), False, PIXEL_TOL),
        "highres_unet_out": lambda: (np.array(unet_out(True)), False, PIXEL_TOL),
        "vae_lowres_decoded": lambda: (np.array(vae_decoded(False)), False, PIXEL_TOL),
        "vae_highres_decoded": lambda: (np.array(vae_decoded(True)), False, PIXEL_TOL),
        "ddim_5step_result": lambda: (np.array(ddim()), False, FLOAT_TOL),
    }


# Inputs used as given: each is ok when every key that consumes it passes.
INPUT_CONSUMERS = {
    "llm_generation_input_ids": ["llm_generation_logits_last4"],
    "unet_latents": ["lowres_unet_out", "highres_unet_out", "vae_lowres_decoded",
                     "vae_highres_decoded", "ddim_5step_result"],
    "lowres_unet_mask": ["lowres_unet_out"],
    "highres_time_ids": ["highres_unet_out"],
}


def fact_checks(fx: Fixture):
    """KEY -> callable returning a list of (ok, max_abs, max_rel) for expected.json."""
    f = fx.facts

    def margins(ours, ref, scale):
        diff = abs(float(ours) - float(ref))
        rel = diff / abs(float(ref)) if ref else (0.0 if diff == 0 else math.inf)
        # A margin is a difference of two computed values: its tolerance is that of
        # the values it is taken from.
        return diff <= FLOAT_TOL * scale, diff, rel, f"margin rule: |diff| <= 1e-4 * {scale:.3g}"

    def keep_margin():
        lp = np.array(fx.tokenizer_out.logprobs, dtype=np.float64).reshape(-1, 2)
        gaps = np.abs(lp[:, 0] - lp[:, 1])
        closest = int(np.argmin(gaps))
        # the two log-probabilities the smallest gap is taken from set its tolerance
        return margins(gaps[closest], f["keep_margin"], max(1.0, float(np.abs(lp[closest]).max())))

    def code_margin():
        return margins(fx.tokenizer_out.code_margin, f["code_margin"], max(1.0, abs(f["code_margin"])))

    def ids(ours, ref):
        return compare(np.asarray(ours, dtype=np.int64), np.asarray(ref, dtype=np.int64), exact=True)

    def text_ids():
        fx.need("lavit_mlx.models.llm")
        tokenizer = fx.model.text_tokenizer
        worst = (True, 0.0, 0.0)
        for prompt, ref in f["text_ids"].items():
            result = ids(tokenizer.encode(prompt), ref)
            if not result[0] or result[1] > worst[1]:
                worst = result if not result[0] or worst[0] else worst
        return worst

    def ddim_timesteps():
        fx.need("lavit_mlx.schedulers")
        decoder = fx.pixel_decoder(False)
        scheduler = decoder.scheduler("ddim")
        scheduler.set_timesteps(len(f["ddim_timesteps_5"]))
        return ids(np.asarray(scheduler.timesteps), f["ddim_timesteps_5"])

    def config():
        cfg = fx.fixture_config
        model = fx.model
        eva = model.eva.config
        tokenizer = model.tokenizer.config
        # "heads" is an input of the loader (shapes cannot reveal it), so it is not compared.
        ours = {
            "width": eva.width,
            "eva_depth": eva.depth,
            "merger_depth": tokenizer.merger_depth,
        }
        if "decoder_depth" in cfg:
            ours["decoder_depth"] = model.config.highres_decoder.depth
        if model.config.llm:
            ours["llm_hidden"] = model.config.llm.hidden_size
            ours["llm_layers"] = model.config.llm.num_hidden_layers
        if "dtype" in cfg:
            dtypes = {str(v.dtype).replace("mlx.core.", "") for v in model.checkpoint.weights("eva").values()}
            ours["dtype"] = dtypes.pop() if len(dtypes) == 1 else f"mixed: {sorted(dtypes)}"
        bad = [k for k in ours if k in cfg and cfg[k] != ours[k]]
        unknown = [k for k in cfg if k not in ours and k not in ("seed", "heads")]
        if bad or unknown:
            print(f"   config mismatch: {[(k, cfg.get(k), ours.get(k)) for k in bad]} unknown: {unknown}")
        return (not bad and not unknown), float(len(bad)), 0.0, f"{len(ours)} sizes compared; heads given, not compared"

    return {
        "keep_margin": keep_margin,
        "code_margin": code_margin,
        "num_tokens": lambda: ids([len(fx.codes)], [f["num_tokens"]]),
        "code_ids": lambda: ids(fx.codes, f["code_ids"]),
        "llm_token_ids": lambda: ids(fx.llm_token_ids, f["llm_token_ids"]),
        "ddim_timesteps_5": ddim_timesteps,
        "text_ids": text_ids,
        "config": config,
    }


def run(root: Path, allow_skip: bool, vision_heads: int | None, verbose: bool) -> int:
    fx = Fixture(root, vision_heads)
    tchecks = tensor_checks(fx)
    fchecks = fact_checks(fx)
    status: dict = {}
    lines = []

    inputs = set()

    def record(name, state, max_abs=None, max_rel=None, note=""):
        status[name] = state
        a = "-" if max_abs is None else f"{max_abs:.3g}"
        r = "-" if max_rel is None else f"{max_rel:.3g}"
        lines.append(f"{name} {state} max_abs={a} max_rel={r}" + (f"  # {note}" if note else ""))

    def record_input(name, state, note):
        status[name] = state
        inputs.add(name)
        lines.append(f"{name} {state} input  # {note}")

    def attempt(name, fn, ref=None):
        try:
            note = ""
            if ref is None:
                ok, max_abs, max_rel, *extra = fn()
                note = extra[0] if extra else ""
            else:
                ours, exact, tol = fn()
                ok, max_abs, max_rel = compare(ours, ref, exact=exact, tol=tol)
            record(name, "ok" if ok else "FAIL", max_abs, max_rel, note)
        except NotBuilt as exc:
            record(name, "SKIP", note=str(exc))
        except Exception as exc:  # a crash is a failure of that key, reported on its line
            if verbose:
                traceback.print_exc()
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            record(name, "FAIL", note=f"{type(exc).__name__}: {message}")

    for key, ref in fx.tensors.items():
        if key in INPUT_CONSUMERS:
            continue
        if key not in tchecks:
            record(key, "FAIL", note="unknown key")
            continue
        attempt(key, tchecks[key], ref)
    for key in fx.tensors:
        if key not in INPUT_CONSUMERS:
            continue
        consumers = [status.get(c) for c in INPUT_CONSUMERS[key] if c in status]
        if not consumers or "SKIP" in consumers:
            record_input(key, "SKIP", "used as given; its consumers are not checked")
        else:
            state = "ok" if all(c == "ok" for c in consumers) else "FAIL"
            record_input(key, state, f"used as given, not compared; its {len(consumers)} consumer(s) "
                                     + ("pass" if state == "ok" else "fail"))
    for key in fx.facts:
        name = f"json:{key}"
        if key not in fchecks:
            record(name, "FAIL", note="unknown key")
            continue
        attempt(name, fchecks[key])

    print("\n".join(lines))
    n = {s: sum(1 for v in status.values() if v == s) for s in ("ok", "FAIL", "SKIP")}
    compared = sum(1 for k, v in status.items() if v == "ok" and k not in inputs)
    given = sum(1 for k, v in status.items() if v == "ok" and k in inputs)
    print(f"# {n['ok']} ok ({compared} compared, {given} inputs used as given), {n['FAIL']} FAIL, {n['SKIP']} SKIP")
    if n["FAIL"] or (n["SKIP"] and not allow_skip):
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture folder (checkpoint/, input.png, expected.*)")
    parser.add_argument("--allow-skip", action="store_true", help="SKIP (not yet built) does not fail")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="override the head count (default: expected.json config.heads, else 16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of crashes")
    args = parser.parse_args(argv)
    for name in ("expected.safetensors", "expected.json", "input.png", "checkpoint"):
        if not (args.fixture / name).exists():
            print(f"error: {args.fixture} is not a fixture folder (missing {name})", file=sys.stderr)
            return 2
    import lavit_mlx  # noqa: F401  (the fast BLAS, before mlx)

    return run(args.fixture, args.allow_skip, args.vision_heads, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
