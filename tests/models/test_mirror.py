"""The PyTorch mirror (lavit_train) against the MLX models, component by component.

Each component is built in both frameworks at a small size; random torch weights go into
the MLX module through the one loading path (`load_component`, torch layout). The key
sets must be identical, the outputs agree in eval mode and in train mode (the same Gumbel
noise for both draws), and so do the gradients of a scalar loss of the outputs with
respect to every parameter (MLX `nn.value_and_grad` against torch autograd), which
checks the straight-through keep mask and codebook lookup of the tokenizer. At the end
the mirror is checked against the official fixture and its strict loading against MLX's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import lavit_mlx.models.eva_vit as mlx_eva
import lavit_mlx.models.layers as mlx_layers
import lavit_mlx.models.visual_tokenizer as mlx_tok
import lavit_mlx.models.vq_decoder as mlx_vq
import lavit_train.models.eva_vit as torch_eva
import lavit_train.models.layers as torch_layers
import lavit_train.models.visual_tokenizer as torch_tok
import lavit_train.models.vq_decoder as torch_vq
from lavit_convert.torch_io import tensor_to_mx
from lavit_mlx.config import EVAConfig, TokenizerConfig, VQDecoderConfig, mlp_width
from lavit_mlx.errors import CheckpointError
from lavit_mlx.loading import load_component
from lavit_mlx.weights import load_strict
from lavit_train.checkpoint import load_decoder, load_eva, load_state_strict, load_tokenizer, read_state_dict
from support import max_rel

TOL = 1e-4  # relative to the largest magnitude of the reference tensor, float32
WIDTH, HEADS = 32, 4
TAU = 0.7  # a Gumbel temperature other than 1, so that tau is exercised


@dataclass
class Case:
    """One component in both frameworks; `run(module, inputs, train)` returns named outputs."""

    name: str
    build: Callable[[], Tuple[torch.nn.Module, mlx_nn.Module]]
    inputs: Callable[[np.random.Generator], Dict[str, Any]]
    run_torch: Callable[[torch.nn.Module, Dict[str, Any], bool], Dict[str, torch.Tensor]]
    run_mlx: Callable[[mlx_nn.Module, Dict[str, Any], bool], Dict[str, mx.array]]
    exact: Tuple[str, ...] = ()  # integer or 0/1 outputs: equal up to one float rounding
    loss_on: Tuple[str, ...] = ()  # outputs a train-mode scalar loss is made of
    check: Callable[[Dict[str, np.ndarray]], None] = field(default=lambda out: None)


# ----------------------------------------------------------------------------- components
def tokenizer_config() -> TokenizerConfig:
    return TokenizerConfig(width=WIDTH, merger_depth=2, num_heads=HEADS, mlp_dim=mlp_width(WIDTH),
                           codebook_size=64, code_dim=8)


def decoder_config(highres: bool) -> VQDecoderConfig:
    return VQDecoderConfig(highres=highres, width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=mlp_width(WIDTH),
                           code_dim=8, num_patches=16, feature_dim=48,
                           context_dims=(32, 40) if highres else (40,), pooled_dim=24 if highres else 0)


def tokenizer_inputs(rng):
    B, N = 3, 32
    uniform = rng.uniform(1e-6, 1.0, (B, N, 2))
    return {
        "features": rng.standard_normal((B, N, WIDTH)).astype(np.float32),
        "noise": (-np.log(-np.log(uniform))).astype(np.float32),
        "policy": (rng.uniform(size=(B, N, 1)) > 0.3).astype(np.float32),
    }


def torch_tokenizer_run(module, x, train):
    if train:
        out = module(x["features"], noise=x["noise"], tau=TAU, policy=x["policy"])
        return tokenizer_fields(out, "")
    results = tokenizer_fields(module(x["features"]), "")
    results.update(tokenizer_fields(module(x["features"], noise=x["noise"], tau=TAU), "drawn."))
    tokens = module.tokenize(x["features"])
    results.update(token_fields(tokens, lambda items: torch.cat(list(items))))
    return results


def mlx_tokenizer_run(module, x, train):
    if train:
        out = module(x["features"], noise=x["noise"], tau=TAU, policy=x["policy"])
        return tokenizer_fields(out, "")
    results = tokenizer_fields(module(x["features"]), "")
    results.update(tokenizer_fields(module(x["features"], noise=x["noise"], tau=TAU), "drawn."))
    tokens = module.tokenize(x["features"])
    results.update(token_fields(tokens, lambda items: mx.array(np.concatenate(items))
                                if isinstance(items[0], np.ndarray) else mx.concatenate(items)))
    return results


def tokenizer_fields(out, prefix: str) -> dict:
    names = ("logprobs", "keep", "merged", "z", "codes", "quantized", "visual_embeds")
    return {prefix + n: getattr(out, n) for n in names if getattr(out, n) is not None}


def token_fields(tokens, concatenate) -> dict:
    """The host-side tokens of `tokenize`, per-image lists concatenated (plus the counts)."""
    fields = {"tokens.keep_mask": tokens.keep_mask}
    if tokens.codes:
        fields["tokens.codes"] = concatenate(tokens.codes)
        fields["tokens.counts"] = np.array([len(c) for c in tokens.codes])
        fields["tokens.quantized"] = tokens.quantized
    if tokens.visual_embeds is not None:
        fields["tokens.visual_embeds"] = concatenate(tokens.visual_embeds)
    return fields


def check_tokenizer(out: dict) -> None:
    """Guards that make the comparison meaningful: a mixed hard mask, no near ties."""
    keep = out["keep"]
    # hard in the forward: hard + soft - stop_gradient(soft) is 0/1 up to one rounding
    assert np.abs(keep - np.round(keep)).max() <= 1e-6, "the keep mask must be hard in the forward"
    assert 0 < keep.mean() < 1, "some patches kept, some dropped"
    if "drawn.keep" in out:
        assert not np.array_equal(out["drawn.keep"], keep), "the Gumbel draw should change the mask"


def vq_inputs(rng):
    return {"code_rows": [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 16, 1)]}


def vq_run(module, x, train):
    out = module(x["code_rows"])
    if isinstance(out, tuple):
        return {"prompt_embeds": out[0], "pooled": out[1]}
    return {"context": out}


def mlp_run(module, x, train):
    gelu = torch_layers.GELU() if isinstance(module, torch.nn.Module) else mlx_layers.GELU()
    return {"y": module(x["x"]), "gelu": gelu(4.0 * x["x"])}


def self_attention_run(module, x, train):
    layers = torch_layers if isinstance(module, torch.nn.Module) else mlx_layers
    return {"y": module(x["x"]), "heads": layers.split_heads(x["x"], HEADS),
            "round_trip": layers.merge_heads(layers.split_heads(2.0 * x["x"], HEADS))}


def cross_attention_run(module, x, train):
    return {"y": module(x["x"], x["context"]),
            "y_cached": module(x["x"], None, context_kv=module.project_context(x["context"]))}


def sequence_inputs(rng):
    return {"x": rng.standard_normal((2, 5, WIDTH)).astype(np.float32),
            "context": rng.standard_normal((2, 7, WIDTH)).astype(np.float32)}


EVA = EVAConfig(width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=mlp_width(WIDTH), patch_size=14, image_size=56,
                head_dim_out=16)

CASES = [
    Case("layers.Mlp", lambda: (torch_layers.Mlp(WIDTH, 2 * WIDTH), mlx_layers.Mlp(WIDTH, 2 * WIDTH)),
         sequence_inputs, mlp_run, mlp_run, loss_on=("y", "gelu")),
    Case("layers.SelfAttention",
         lambda: (torch_layers.SelfAttention(WIDTH, HEADS), mlx_layers.SelfAttention(WIDTH, HEADS)),
         sequence_inputs, self_attention_run, self_attention_run, loss_on=("y",)),
    Case("layers.CrossAttention",
         lambda: (torch_layers.CrossAttention(WIDTH, HEADS), mlx_layers.CrossAttention(WIDTH, HEADS)),
         sequence_inputs, cross_attention_run, cross_attention_run, loss_on=("y", "y_cached")),
    Case("eva", lambda: (torch_eva.EVAVisionTransformer(EVA), mlx_eva.EVAVisionTransformer(EVA)),
         lambda rng: {"pixels": rng.standard_normal((2, 3, 56, 56)).astype(np.float32)},
         lambda m, x, train: {"features": m(x["pixels"])}, lambda m, x, train: {"features": m(x["pixels"])},
         loss_on=("features",)),
    Case("tokenizer",
         lambda: (torch_tok.DynamicVisualTokenizer(tokenizer_config()),
                  mlx_tok.DynamicVisualTokenizer(tokenizer_config())),
         tokenizer_inputs, torch_tokenizer_run, mlx_tokenizer_run,
         exact=("keep", "codes", "drawn.keep", "drawn.codes", "tokens.keep_mask", "tokens.codes", "tokens.counts"),
         loss_on=("quantized", "merged"), check=check_tokenizer),
    Case("understanding",
         lambda: (torch_tok.DynamicVisualTokenizer(tokenizer_config(), quantizer=False, llm_hidden=24),
                  mlx_tok.DynamicVisualTokenizer(tokenizer_config(), quantizer=False, llm_hidden=24)),
         tokenizer_inputs, torch_tokenizer_run, mlx_tokenizer_run,
         exact=("keep", "drawn.keep", "tokens.keep_mask"), loss_on=("visual_embeds",), check=check_tokenizer),
    Case("lowres_decoder",
         lambda: (torch_vq.VQDecoder(decoder_config(False)), mlx_vq.VQDecoder(decoder_config(False))),
         vq_inputs, vq_run, vq_run, loss_on=("context",)),
    Case("highres_decoder",
         lambda: (torch_vq.VQDecoder(decoder_config(True)), mlx_vq.VQDecoder(decoder_config(True))),
         vq_inputs, vq_run, vq_run, loss_on=("prompt_embeds", "pooled")),
]


# ----------------------------------------------------------------------------- the runner
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights that keep activations O(1): LayerNorms near (1, 0), matrices 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for p in ("weight", "bias")}
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name in norms:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.ndim >= 2 and not name.endswith(("pos_embed", "query_embed", "cls_token", "positional_embedding")):
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * noise)


def convert(x, to):
    if isinstance(x, list):
        return [convert(item, to) for item in x]
    return torch.from_numpy(x) if to == "torch" else mx.array(x)


def numpy_of(outputs: dict) -> dict:
    return {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.array(v)).astype(np.float64)
            for k, v in outputs.items()}


def compare(ours: dict, ref: dict, exact=()) -> dict:
    """Max relative error per output; `exact` ones (codes, masks) must agree to 1e-6, so
    one code or one keep decision that differs fails (a straight-through mask is 0/1 only
    up to a rounding: hard + soft - stop_gradient(soft))."""
    assert set(ours) == set(ref)
    errors = {}
    for name, expected in ref.items():
        assert ours[name].shape == expected.shape, name
        if name in exact:
            np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-6, err_msg=name)
        else:
            errors[name] = max_rel(ours[name], expected)
            assert errors[name] <= TOL, f"{name}: max relative error {errors[name]:.2e}"
    return errors


def build(case: Case, seed: int = 0):
    torch_module, mlx_module = case.build()
    randomize(torch_module, seed)
    weights = {k: tensor_to_mx(v) for k, v in torch_module.state_dict().items()}
    load_component(mlx_module, weights, "mirror", torch_layout=True)
    return torch_module, mlx_module


def torch_train_step(module, inputs, case, loss_weights):
    module.train()
    outputs = case.run_torch(module, inputs, True)
    loss = sum((outputs[n] * torch.from_numpy(loss_weights[n])).sum() for n in case.loss_on)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)}
    return outputs, grads


def mlx_train_step(module, inputs, case, loss_weights):
    module.train()

    def loss_fn(inputs):
        outputs = case.run_mlx(module, inputs, True)
        return sum((outputs[n] * mx.array(loss_weights[n])).sum() for n in case.loss_on), outputs

    (_, outputs), grads = mlx_nn.value_and_grad(module, loss_fn)(inputs)
    return outputs, dict(tree_flatten(grads))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_mirror(case):
    torch_module, mlx_module = build(case)
    assert set(torch_module.state_dict()) == {k for k, _ in tree_flatten(mlx_module.parameters())}

    rng = np.random.default_rng(1)
    raw = case.inputs(rng)
    t_in, m_in = {k: convert(v, "torch") for k, v in raw.items()}, {k: convert(v, "mlx") for k, v in raw.items()}

    # eval: the deterministic path (and, for the tokenizer, a given Gumbel draw and `tokenize`)
    torch_module.eval()
    mlx_module.eval()
    with torch.no_grad():
        eval_reference = numpy_of(case.run_torch(torch_module, t_in, False))
    case.check(eval_reference)
    eval_errors = compare(numpy_of(case.run_mlx(mlx_module, m_in, False)), eval_reference, case.exact)

    # train: sampled mask from the same noise, straight-through gradients
    loss_weights = {n: rng.standard_normal(eval_reference[n].shape).astype(np.float32) for n in case.loss_on}
    train_reference, reference_grads = torch_train_step(torch_module, t_in, case, loss_weights)
    train_reference = numpy_of(train_reference)
    case.check(train_reference)
    ours_out, ours_grads = mlx_train_step(mlx_module, m_in, case, loss_weights)
    train_errors = compare(numpy_of(ours_out), train_reference, case.exact)

    # torch gradients in MLX layout (the conv of EVA), then one comparison per parameter
    sanitize = getattr(mlx_module, "sanitize", None)
    reference_grads = {k: tensor_to_mx(g.detach()) for k, g in reference_grads.items()}
    if sanitize is not None:
        reference_grads = sanitize(reference_grads, "torch")
    assert set(ours_grads) == set(reference_grads)
    grad_errors = {}
    reference_grads_np = numpy_of(reference_grads)
    largest = max(np.abs(g).max() for g in reference_grads_np.values())
    for name, expected in reference_grads_np.items():
        ours = np.array(ours_grads[name], np.float64)
        # relative to the tensor's own largest gradient, floored at 1% of the model's: some
        # gradients are zero in exact arithmetic (key biases under a softmax) and hold only
        # rounding noise in both frameworks
        scale = max(np.abs(expected).max(), 1e-2 * largest)
        grad_errors[name] = float(np.abs(ours - expected).max() / scale)
        assert grad_errors[name] <= TOL, f"gradient of {name}: max relative error {grad_errors[name]:.2e}"
    if case.name == "tokenizer":
        # training mode draws the mask even without given noise (each framework its own draw)
        deterministic = eval_reference["keep"]
        assert not np.array_equal(torch_module(t_in["features"]).keep.detach().numpy(), deterministic)
        assert not np.array_equal(np.array(mlx_module(m_in["features"]).keep), deterministic)
        # the selector learns only through the straight-through keep mask
        for grads in (ours_grads, reference_grads):
            assert float(mx.abs(grads["token_predictor.out_conv.4.weight"]).max()) > 1e-4
            # and no loss term reaches the codebook through the straight-through lookup
            assert float(mx.abs(grads["quantize.embedding.weight"]).max()) == 0.0
    print(f"{case.name}: eval {max(eval_errors.values(), default=0):.1e}, "
          f"train {max(train_errors.values(), default=0):.1e}, grad {max(grad_errors.values()):.1e}")


# ----------------------------------------------------------------------------- official fixture
@pytest.fixture(scope="module")
def expected(official_tiny):
    return load_file(str(official_tiny / "expected.safetensors"))


def close(ours, ref, tol=TOL):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    return max_rel(ours.reshape(ref.shape), ref) <= tol


def test_mirror_tokenizer_matches_official(official_checkpoint, expected):
    eva = load_eva(official_checkpoint, 2)
    tokenizer = load_tokenizer(official_checkpoint, 2)
    understanding = load_tokenizer(official_checkpoint, 2, understanding=True)
    with torch.no_grad():
        features = eva(torch.from_numpy(expected["pixel_values"]))
    out = tokenizer.tokenize(features[:, 1:])
    visual = understanding.tokenize(features[:, 1:]).visual_embeds[0]
    assert close(features, expected["encoder_features"])
    assert close(out.logprobs, expected["selector_logprobs"])
    np.testing.assert_array_equal(out.keep_mask.numpy(), expected["keep_mask"])
    assert close(out.merged, expected["merged_features"])
    np.testing.assert_array_equal(out.codes[0].numpy(), expected["code_ids"])
    assert close(out.quantized, expected["quantized"])
    assert close(visual, expected["understanding_visual_embeds"])
    assert set(tokenizer.state_dict()) == set(read_state_dict(official_checkpoint, "tokenizer"))
    assert set(eva.state_dict()) == set(read_state_dict(official_checkpoint, "eva"))


def test_mirror_decoders_match_official(official_checkpoint, expected):
    codebook = read_state_dict(official_checkpoint, "tokenizer")["quantize.embedding.weight"].float()
    rows = [codebook[torch.from_numpy(expected["code_ids"])]]
    with torch.no_grad():
        lowres = load_decoder(official_checkpoint, highres=False, vision_heads=2)(rows)
        prompt, pooled = load_decoder(official_checkpoint, highres=True, vision_heads=2)(rows)
    assert close(lowres, expected["lowres_condition"])
    assert close(prompt, expected["highres_prompt_embeds"])
    assert close(pooled, expected["highres_pooled"])


def test_mirror_needs_heads_off_the_release_width(official_checkpoint):
    with pytest.raises(CheckpointError, match="head count is unknown"):
        load_eva(official_checkpoint)
    with pytest.raises(CheckpointError, match="does not divide"):
        load_tokenizer(official_checkpoint, 5)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: [s.pop(k) for k in ("causal_encoder.norm.bias", "quantize.embedding.weight")],
         r"missing key 'causal_encoder.norm.bias' \(and 1 more\)"),
        (lambda s: s.update({"encode_task_layer.2.weight": torch.zeros(4, WIDTH)}),
         r"key 'encode_task_layer.2.weight' has shape \(4, 32\), the model expects \(8, 32\)$"),
        (lambda s: s.update({"mystery.weight": torch.zeros(3)}), "unexpected key 'mystery.weight' belongs to no"),
        (lambda s: s.update({"vit_proj.weight": torch.zeros(3, WIDTH)}), None),  # a known extra of the release
    ],
)
def test_strict_loading_is_the_same_rule(edit, message):
    torch_module, mlx_module = build(next(c for c in CASES if c.name == "tokenizer"))
    state = dict(torch_module.state_dict())
    edit(state)
    weights = {k: tensor_to_mx(v) for k, v in state.items()}
    fresh = torch_tok.DynamicVisualTokenizer(tokenizer_config())
    if message is None:
        load_state_strict(fresh, state, "src.bin", "tokenizer")
        assert torch.equal(fresh.quantize.embedding.weight, torch_module.quantize.embedding.weight)
        return
    errors = []
    for load in (lambda: load_state_strict(fresh, state, "src.bin", "tokenizer"),
                 lambda: load_strict(mlx_module, weights, "src.bin", known_extra=lambda k: k.startswith("vit_proj."))):
        with pytest.raises(CheckpointError, match=message) as info:
            load()
        errors.append(str(info.value))
    assert errors[0] == errors[1] and errors[0].startswith("src.bin: ")
