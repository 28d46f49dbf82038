"""Memory per GPU of each stage at the release's sizes, under DDP and FSDP2 (docs/training-cluster.md).

Parameter counts come from the configs: the mirrors, transformers' LLaMA and diffusers'
UNet are built on the meta device (no memory) and counted. Per trained parameter:

    DDP    fp32 master weights 4 B + fp32 gradients 4 B + AdamW m, v 8 B = 16 B, on every GPU
           (+ 4 B for stage 3's EMA copy)
    FSDP2  the same 16 B sharded over the GPUs, plus the unsharded bf16 copies of the two
           largest units in flight (forward prefetch) and their bf16 gradients

Frozen encoders are held in bf16 on every GPU (2 B per parameter, outside FSDP2). Activations
are for the micro-batch a GPU runs (the paper's global batch split over the GPUs, with
gradient accumulation above `MICRO_BATCH`), with activation checkpointing per block: the
block inputs in bf16, plus one block recomputed with its gradients, plus what sits outside
the blocks (fp32 logits of the LLM, fp32 attention scores of the merger's masked softmax).
They are estimates of the order of 10-30%; allocator fragmentation and CUDA's own context
(~1 GiB) come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

GiB = 2**30

# The paper gives stage 1's batch (2048 images); stages 2 and 3 are assumptions stated in the docs.
GLOBAL_BATCH = {"tokenizer": 2048, "llm": 2048, "pixel": 256}
MICRO_BATCH = {"tokenizer": 32, "llm": 8, "pixel": 4}  # per GPU and step, accumulation above it
LLM_LENGTH = 256  # tokens per stage-2 sequence ([IMG] + ~90 kept visual tokens + text, padded)
PIXEL_RESOLUTION = 1024

# The high-res pixel decoder's UNet: SDXL's public diffusers config (cross-attention 2048, text_time).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2}


@dataclass
class Estimate:
    """GiB per GPU of one stage under one strategy on `gpus` GPUs."""

    stage: str
    strategy: str
    gpus: int
    micro_batch: int
    accumulation: int
    trained_params: float  # billions
    weights: float  # fp32 master weights (sharded under FSDP2) + unsharded bf16 units
    gradients: float
    optimizer: float
    frozen: float  # bf16 frozen encoders
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.frozen + self.activations


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _on_meta(build):
    import torch

    with torch.device("meta"):
        return build()


def component_sizes() -> Dict[str, Tuple[int, int]]:
    """{component: (parameters, parameters of its largest block)} at the release's sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import LlamaForCausalLM

    from lavit_mlx.config import EVAConfig, LLMConfig, TokenizerConfig, VQDecoderConfig

    from .models.eva_vit import EVAVisionTransformer
    from .models.visual_tokenizer import DynamicVisualTokenizer
    from .models.vq_decoder import VQDecoder
    from .stages.llm import llama_config
    from .stages.pixel import unet_units

    eva = _on_meta(lambda: EVAVisionTransformer(EVAConfig()))
    tokenizer = _on_meta(lambda: DynamicVisualTokenizer(TokenizerConfig()))
    understanding = _on_meta(lambda: DynamicVisualTokenizer(TokenizerConfig(), quantizer=False, llm_hidden=4096))
    highres = _on_meta(lambda: VQDecoder(VQDecoderConfig(highres=True, context_dims=(768, 1280))))
    lowres = _on_meta(lambda: VQDecoder(VQDecoderConfig(highres=False, context_dims=(768,), pooled_dim=0)))
    llm = _on_meta(lambda: LlamaForCausalLM(llama_config(LLMConfig(rms_norm_eps=1e-5))))
    unet = _on_meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    vae = _on_meta(lambda: AutoencoderKL(**SD_VAE))
    largest = lambda blocks: max(_count(b) for b in blocks)  # noqa: E731
    return {
        "eva": (_count(eva), largest(eva.blocks)),
        "tokenizer": (_count(tokenizer), largest(tokenizer.causal_encoder.blocks)),
        "merger": (_count(understanding.causal_encoder) + _count(understanding.vit_proj),
                   largest(understanding.causal_encoder.blocks)),
        "highres_decoder": (_count(highres), largest(highres.blocks)),
        "highres_heads": (sum(_count(getattr(highres, n)) for n in ("unet_proj_1", "unet_proj_2", "unet_attnpool")), 0),
        "lowres_decoder": (_count(lowres), largest(lowres.blocks)),
        "llm": (_count(llm), largest(llm.model.layers)),
        "llm_embeddings": (_count(llm.model.embed_tokens) + _count(llm.lm_head), 0),
        "unet": (_count(unet), largest(unet_units(unet))),
        "vae": (_count(vae), 0),
    }


def _transformer(batch: int, tokens: int, width: int, mlp: int, heads: int, blocks: int, keys: int = 0,
                 fp32_scores: bool = False, attentions: int = 1) -> int:
    """Bytes of a checkpointed transformer stack's activations: block inputs (bf16) and one block
    recomputed with its gradients (projections, MLP, and attention scores unless fused)."""
    keys = keys or tokens
    stored = blocks * batch * tokens * width * 2
    block = batch * tokens * (10 * width + 3 * mlp) * 2
    if fp32_scores:  # the policy-masked softmax: scores, weights and probabilities in fp32
        block += attentions * batch * heads * tokens * keys * 4 * 3
    return stored + 2 * block


def _activations(stage: str, micro: int, sizes) -> int:
    W, mlp, heads, N = 1408, 6144, 16, 256
    if stage == "tokenizer":
        frozen_pass = micro * (N + 1) * (3 * W + mlp) * 2 + micro * N * W * 4  # EVA under no_grad, fp32 target
        merger = _transformer(micro, N, W, mlp, heads, 12, fp32_scores=True, attentions=2)
        decoder = _transformer(micro, N, W, mlp, heads, 12, fp32_scores=True)
        outputs = micro * N * W * 4 * 4  # z, quantized, decoded, cosine terms
        return frozen_pass + merger + decoder + outputs
    if stage == "llm":
        L, hidden, vocab = LLM_LENGTH, 4096, 48386
        llm = _transformer(micro, L, hidden, 11008, 32, 32)  # SDPA: no stored score matrices
        logits = micro * L * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy and its gradient
        merger = _transformer(micro, N, W, mlp, heads, 12, fp32_scores=True, attentions=2)
        return llm + logits + merger + micro * (N + 1) * (3 * W + mlp) * 2
    # pixel: SDXL UNet at 1024^2 (latents 128^2): checkpointed block inputs per level, one
    # transformer block recomputed (64^2 tokens x 640 and 32^2 x 1280 dominate)
    latent = PIXEL_RESOLUTION // 8
    stored = 0
    for channels, side, units in ((320, latent, 6), (640, latent // 2, 10), (1280, latent // 4, 40)):
        stored += units * micro * channels * side * side * 2
    peak = 2 * micro * (latent // 2) ** 2 * 640 * 2 * 24
    vae = micro * 128 * PIXEL_RESOLUTION ** 2 * 2 * 2  # the frozen VAE encoder's widest transient
    condition = _transformer(micro, N, W, mlp, heads, 12)  # the VQ decoder (trunk under no_grad: its heads)
    return stored + peak + vae + condition // 4


def estimate(stage: str, strategy: str, gpus: int, sizes=None) -> Estimate:
    """The per-GPU memory of `stage` ("tokenizer", "llm", "pixel") under "ddp" or "fsdp"."""
    sizes = sizes or component_sizes()
    if stage == "tokenizer":
        trained = [sizes["tokenizer"], sizes["highres_decoder"]]
        trained_count = sizes["tokenizer"][0] + sizes["highres_decoder"][0] - sizes["highres_heads"][0]
        frozen = sizes["eva"][0]
    elif stage == "llm":
        trained = [sizes["llm"], sizes["merger"]]
        trained_count = sizes["llm"][0] + sizes["merger"][0]
        frozen = sizes["eva"][0] + sizes["tokenizer"][0]
    else:
        trained = [sizes["unet"], sizes["highres_heads"]]
        trained_count = sizes["unet"][0] + sizes["highres_heads"][0]
        frozen = sizes["eva"][0] + sizes["tokenizer"][0] + sizes["vae"][0] + sizes["highres_decoder"][0] \
            - sizes["highres_heads"][0]
    micro = min(MICRO_BATCH[stage], max(1, GLOBAL_BATCH[stage] // gpus))
    accumulation = max(1, GLOBAL_BATCH[stage] // (gpus * micro))
    shard = gpus if strategy == "fsdp" else 1
    weights = trained_count * 4 / shard
    if stage == "pixel":
        weights += trained_count * 4 / shard  # the EMA of every trained weight (fp32, sharded like them)
    if strategy == "fsdp":
        largest_unit = max(block for _, block in trained)
        weights += 2 * largest_unit * 2  # two units unsharded in bf16 (the one running, the next)
        if stage == "llm":  # the embeddings and head stay with the root: unsharded during its forward
            weights += sizes["llm_embeddings"][0] * 2
    gradients = trained_count * 4 / shard + (2 * max(b for _, b in trained) * 2 if strategy == "fsdp" else 0)
    return Estimate(stage=stage, strategy=strategy, gpus=gpus, micro_batch=micro, accumulation=accumulation,
                    trained_params=trained_count / 1e9, weights=weights / GiB, gradients=gradients / GiB,
                    optimizer=trained_count * 8 / shard / GiB, frozen=frozen * 2 / GiB,
                    activations=_activations(stage, micro, sizes) / GiB)


def table(gpu_counts: Iterable[int] = (8, 64)) -> List[Estimate]:
    sizes = component_sizes()
    return [estimate(stage, strategy, gpus, sizes) for stage in ("tokenizer", "llm", "pixel")
            for strategy in ("ddp", "fsdp") for gpus in gpu_counts]


def markdown(rows: List[Estimate]) -> str:
    lines = ["| stage | strategy | GPUs | micro-batch x accumulation | trained (B) | weights | grads | AdamW | "
             "frozen | activations | total GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.strategy.upper().replace('FSDP', 'FSDP2')} | {r.gpus} | {r.micro_batch} x "
                     f"{r.accumulation} | {r.trained_params:.2f} | {r.weights:.1f} | {r.gradients:.1f} | "
                     f"{r.optimizer:.1f} | {r.frozen:.1f} | {r.activations:.1f} | **{r.total:.1f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table()))
