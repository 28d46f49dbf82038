"""Stage 1 in PyTorch: the visual tokenizer (paper section 3.1, reference section 5 item 1).

The loss is the MLX tokenizer stage's (`lavit_mlx/training/stages/tokenizer.py`), term for
term, on the `lavit_train.models` mirrors:

    loss = mean_patches(w * (1 - cos(decoded, target)))  summed over the trained decoders
         + keep_weight * (mean keep fraction - keep_ratio)^2
         + decision_weight * mean(p_keep * (1 - p_keep))
         + commitment * ||z - sg(e)||^2                  (kept tokens)
         + codebook_weight * ||sg(z) - e||^2             (kept tokens; `codebook: gradient` only)

target = the frozen EVA's patch features (last block before the final norm, CLS dropped),
centred (`center_features`: the mean feature of the first `init_batches` batches is folded
into the last block's `mlp.fc2.bias`, exactly, and the shifted EVA is exported); the
selection is a straight-through hard Gumbel-softmax draw (`gumbel_tau`), the decision term
pushes each keep probability away from 1/2 (so that inference's deterministic rule keeps
about `keep_ratio`); the codebook lookup is straight-through; the decoders read the kept
codes in place with the position of their rank among the kept ones, the straight-through
keep mask weighting their cross-attention's softmax (`VQDecoder.decode_features(policy=...)`),
their UNet heads frozen (trained in stage 3). The codebook is BEiT-v2's norm-EMA (counts and
sums all-reduced over ranks, so every rank keeps the same codebook) or trained by gradient
and re-normalised; both start from spherical k-means on the tokenizer's outputs for the
first `init_batches` batches; a code unused for `dead_after` steps is re-drawn from the
step's kept encoder outputs (the same draw on every rank).

Re-quantization as the MLX stage (`model.tokenizer_init`, `model.frozen`, `loss.projection_init`,
`loss.kmeans_on`; its docstring says why): `tokenizer_init` is a folder in the released layout
(or an MLX folder) whose tokenizer and decoders this run starts from.

One difference from the MLX stage, only with several ranks: the mean keep fraction and the
kept-token counts that normalise the codebook terms are the global batch's (all-reduced;
the keep fraction differentiably), so that N ranks compute the step of one process on the
concatenated batch. On one rank both are the same.
"""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from lavit_mlx.config import LaVITConfig, TokenizerConfig, VQDecoderConfig, check_heads, mlp_width
from lavit_mlx.errors import LaVITError
from lavit_mlx.layout import RELEASE_FILES
from lavit_mlx.training.stages.tokenizer import pca_projection, whitening

from .. import checkpoint as release
from ..data import StreamLoader, eval_loader, even_batches, stack
from ..distributed import World, assign_full, full_tensor, unsharded
from ..loop import Launch, Stage
from ..models.visual_tokenizer import DynamicVisualTokenizer, gumbel_noise, l2_normalize
from ..models.vq_decoder import VQDecoder
from ..sections import DECODERS, TokenizerLoss, TokenizerModel
from . import image_example, save_release, stage_builder

INIT_STD = 0.02  # query and position embeddings (as the MLX stage initialises them)


# ----------------------------------------------------------------------------- codebook mechanics
def code_statistics(codes: torch.Tensor, z: torch.Tensor, kept: torch.Tensor, codebook_size: int):
    """Per code: how many kept tokens chose it (K,) and the sum of their z (K, d)."""
    codes, kept = codes.reshape(-1), kept.reshape(-1).float()
    z = z.reshape(codes.shape[0], -1).float()
    counts = torch.zeros(codebook_size, device=z.device).index_add_(0, codes, kept)
    sums = torch.zeros(codebook_size, z.shape[-1], device=z.device).index_add_(0, codes, z * kept[:, None])
    return counts, sums


def norm_ema_update(codebook: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, decay: float) -> torch.Tensor:
    """BEiT-v2's norm-EMA step: each used code moves to the l2-normalised mean of its
    assignments with `decay`, then is re-normalised; unused codes stay."""
    centroid = l2_normalize(sums / counts.clamp_min(1.0)[:, None])
    moved = l2_normalize(decay * codebook + (1.0 - decay) * centroid)
    return torch.where((counts > 0)[:, None], moved, codebook)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code usage: 1 when one code takes everything, K when all are equal."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), 0.0).sum())


def spherical_kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k unit centroids of unit `points` (n, d) by cosine k-means; empty clusters keep their centroid."""
    n = points.shape[0]
    if n >= k:
        start = torch.randperm(n, generator=generator, device=generator.device)[:k]
    else:
        start = torch.randint(0, n, (k,), generator=generator, device=generator.device)
    centroids = points[start.to(points.device)]
    ones = torch.ones(n, device=points.device)
    for _ in range(iters):
        assign = (points @ centroids.T).argmax(dim=-1)
        counts, sums = code_statistics(assign, points, ones, k)
        centroids = torch.where((counts > 0)[:, None], l2_normalize(sums), centroids)
    return centroids


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (l2_normalize(a) * l2_normalize(b)).sum(dim=-1)


def patch_weights(target: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-patch weights (B, N) of the reconstruction term, mean 1 in each image: 1 everywhere
    (`uniform`), or each (centred) target feature's length (`norm`), as the MLX stage."""
    if mode == "uniform":
        return target.new_ones(target.shape[:2])
    length = target.norm(dim=-1)
    return length / length.mean(dim=1, keepdim=True).clamp_min(1e-6)


def kept_positions(kept: torch.Tensor) -> torch.Tensor:
    """Each token's rank among the kept ones of its image (B, N): the decoder position it has at inference."""
    return (torch.cumsum(kept, dim=1) - 1).clamp_min(0).long()


# ----------------------------------------------------------------------------- the training module
class TokenizerTraining(nn.Module):
    """The frozen EVA, the tokenizer and the decoder(s), whose forward is the stage's loss."""

    def __init__(self, eva: nn.Module, tokenizer: DynamicVisualTokenizer, decoders: Dict[str, VQDecoder],
                 loss: TokenizerLoss, world: World, steps: int):
        super().__init__()
        self.eva = eva
        self.tokenizer = tokenizer
        for name, decoder in decoders.items():
            setattr(self, name, decoder)
        self.decoder_names = list(decoders)
        self.loss_config, self.world, self.steps = loss, world, steps
        self.codebook_size = tokenizer.config.codebook_size
        self.register_buffer("idle", torch.zeros(self.codebook_size, dtype=torch.int64))  # steps since last use
        width = tokenizer.config.width
        # loss.target_space whitened: set from the init batches' features (`before_training`)
        self.register_buffer("whiten_mean", torch.zeros(width))
        self.register_buffer("whiten", torch.eye(width))
        self.codebook_frozen = False  # model.frozen: codebook (set by the stage)

    def target_space(self, features: torch.Tensor) -> torch.Tensor:
        """Features as the reconstruction compares them: as they are, or PCA-whitened (the MLX stage's)."""
        if self.loss_config.target_space == "raw":
            return features
        return (features - self.whiten_mean) @ self.whiten

    def train(self, mode: bool = True):
        """Training mode for what trains; the frozen encoders stay in inference mode."""
        super().train(mode)
        for frozen in (self.eva,):
            frozen.eval()
        return self

    def targets(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dtype = self.eva.patch_embed.proj.weight.dtype
            return self.eva(pixels.to(dtype))[:, 1:].float()  # (B, N, width), CLS dropped

    def forward(self, batch: Dict[str, torch.Tensor]):
        cfg, world = self.loss_config, self.world
        target = self.targets(batch["pixels"])
        B, N = target.shape[:2]
        # the Gumbel noise of the global batch, this rank's rows: any world size draws the same per
        # sample (none in inference mode: the deterministic rule)
        noise = gumbel_noise((world.size * B, N, 2), device=target.device)[world.rank_slice(B)] \
            if self.tokenizer.training else None
        out = self.tokenizer(target, noise=noise, tau=cfg.gumbel_tau)
        kept = out.keep.detach()  # the forward values: exactly 0 or 1
        positions = kept_positions(kept)
        weights = patch_weights(target, cfg.patch_weights)
        compared = self.target_space(target)
        metrics = {}
        loss = target.new_zeros(())
        for name in self.decoder_names:
            decoded = getattr(self, name).decode_features(out.quantized, kept, positions, policy=out.keep)
            term = (weights * (1.0 - cosine(self.target_space(decoded.float()), compared))).mean()
            metrics[f"{name.split('_')[0]}_reconstruction"] = term
            loss = loss + term
        kept_sum = world.global_sum(kept.sum())
        # mean keep fraction of the global batch; the gradient reaches every rank's selector
        keep_fraction = world.differentiable_sum(out.keep.sum()) / (world.size * B * N)
        ratio = (keep_fraction - cfg.keep_ratio) ** 2
        keep_probability = out.logprobs[..., 0].exp()
        indecision = (keep_probability * (1.0 - keep_probability)).mean()
        count = kept_sum.clamp_min(1.0) / world.size  # DDP averages: sum over ranks / global count
        rows = self.tokenizer.quantize.embedding(out.codes)
        commitment = (kept * ((out.z - rows.detach()) ** 2).sum(dim=-1)).sum() / count
        loss = loss + cfg.keep_weight * ratio + cfg.commitment * commitment + cfg.decision_weight * indecision
        if cfg.codebook == "gradient":
            codebook = (kept * ((out.z.detach() - rows) ** 2).sum(dim=-1)).sum() / count
            loss = loss + cfg.codebook_weight * codebook
            metrics["codebook"] = codebook
        metrics.update({
            "keep_ratio_loss": ratio, "indecision": indecision, "commitment": commitment,
            "keep_fraction": keep_fraction, "tokens_per_image": kept_sum / (world.size * B),
            "dead_codes": (self.idle >= cfg.dead_after).sum(),
            # tensors for `after_step` (not logged)
            "codes": out.codes, "z": out.z.detach(), "kept": kept,
        })
        return loss, metrics

    @torch.no_grad()
    def update_codebook(self, metrics: Dict[str, torch.Tensor], seed: int) -> None:
        """The step's codebook statistics (all-reduced) -> norm-EMA or re-normalisation, idle
        counters, dead-code restarts (the MLX stage's `update`)."""
        cfg, world = self.loss_config, self.world
        weight = self.tokenizer.quantize.embedding.weight
        counts, sums = code_statistics(metrics["codes"], metrics["z"], metrics["kept"], self.codebook_size)
        counts, sums = world.global_sum(counts), world.global_sum(sums)
        metrics["perplexity"] = perplexity(counts)
        metrics["codes_used"] = (counts > 0).sum()
        if self.codebook_frozen:  # model.frozen: codebook: the rows stay as they started
            return
        codebook = full_tensor(weight).float()
        if cfg.codebook == "ema":
            codebook = norm_ema_update(codebook, counts, sums, cfg.ema_decay)
        else:
            codebook = l2_normalize(codebook)
        idle = torch.where(counts > 0, 0, self.idle + 1)
        if cfg.restart_dead:
            dead = idle >= cfg.dead_after
            if bool(dead.any()):
                z = world.all_gather(metrics["z"].reshape(-1, metrics["z"].shape[-1]).float())
                kept = world.all_gather(metrics["kept"].reshape(-1))
                generator = torch.Generator(device=z.device).manual_seed(seed)
                # one kept encoder output per code, uniformly (all of them if none is kept)
                weights = kept if bool((kept > 0).any()) else torch.ones_like(kept)
                drawn = z[torch.multinomial(weights.float(), self.codebook_size, replacement=True,
                                            generator=generator)]
                codebook = torch.where(dead[:, None], drawn, codebook)
                idle = torch.where(dead, 0, idle)
        self.idle.copy_(idle)
        assign_full(weight, codebook)


def init_decoder(decoder: VQDecoder) -> None:
    """Random query and position embeddings (the module's zeros are placeholders for loading)."""
    with torch.no_grad():
        decoder.pos_embed.normal_(0.0, INIT_STD)
        decoder.query_embed.normal_(0.0, INIT_STD)
        if decoder.config.highres:
            decoder.unet_attnpool.positional_embedding.normal_(0.0, decoder.config.feature_dim ** -0.5)


def tokenizer_part(tokenizer: DynamicVisualTokenizer, part: str) -> nn.Module:
    """The module of a `model.frozen` part."""
    return {"selector": tokenizer.token_predictor, "merger": tokenizer.causal_encoder,
            "projection": tokenizer.encode_task_layer, "codebook": tokenizer.quantize}[part]


def freeze_unet_heads(decoder: VQDecoder) -> None:
    """The UNet projections are trained with the pixel decoder (stage 3), not here."""
    for name in ("unet_proj", "unet_proj_1", "unet_proj_2", "unet_attnpool"):
        if hasattr(decoder, name):
            getattr(decoder, name).requires_grad_(False)


def tokenizer_config(model: TokenizerModel, vision) -> LaVITConfig:
    """The sizes of the tokenizer and decoders from the `model:` section and EVA's config."""
    tokenizer = TokenizerConfig(width=vision.width, merger_depth=model.merger_depth, num_heads=model.num_heads,
                                mlp_dim=model.mlp_dim or mlp_width(vision.width), codebook_size=model.codebook_size,
                                code_dim=model.code_dim)
    check_heads(vision.width, model.num_heads, "token merger", "model.num_heads")
    config = LaVITConfig(vision=vision, tokenizer=tokenizer)
    for name in model.decoders:
        section = getattr(model, DECODERS[name])
        check_heads(section.width, section.num_heads, "VQ decoder", f"model.{DECODERS[name]}.num_heads")
        if name == "highres":
            check_heads(vision.width, section.num_heads, "VQ decoder pooling", f"model.{DECODERS[name]}.num_heads")
        setattr(config, DECODERS[name], VQDecoderConfig(
            highres=name == "highres", width=section.width, depth=section.depth, num_heads=section.num_heads,
            mlp_dim=section.mlp_dim or mlp_width(section.width), code_dim=model.code_dim,
            num_patches=vision.num_patches, feature_dim=vision.width, context_dims=tuple(section.context_dims),
            pooled_dim=section.pooled_dim if name == "highres" else 0))
    return config


# ----------------------------------------------------------------------------- the stage
@stage_builder("tokenizer")
class TokenizerStage(Stage):
    """`python -m lavit_train tokenizer`: LaVIT's stage 1 (see the module docstring)."""

    name = "tokenizer"

    def __init__(self, config, world: World, launch: Launch):
        super().__init__(config, world, launch)
        self.model_config: TokenizerModel = config.model
        self.loss_config: TokenizerLoss = config.loss
        self.init_folder = Path(self.model_config.init).expanduser()
        # frozen, in float32 (its last bias carries the centring; autocast computes in bf16 on CUDA)
        eva = release.load_eva(self.init_folder, launch.vision_heads).requires_grad_(False).eval()
        self.lavit_config = tokenizer_config(self.model_config, eva.config)
        tokenizer = DynamicVisualTokenizer(self.lavit_config.tokenizer, quantizer=True)
        with torch.no_grad():
            tokenizer.quantize.embedding.weight.copy_(l2_normalize(tokenizer.quantize.embedding.weight))
        decoders = {}
        for name in self.model_config.decoders:
            decoders[DECODERS[name]] = decoder = VQDecoder(self.lavit_config.component(DECODERS[name]))
            init_decoder(decoder)
        if self.model_config.tokenizer_init:
            self._start_from(Path(self.model_config.tokenizer_init).expanduser(), tokenizer, decoders)
        for decoder in decoders.values():
            freeze_unet_heads(decoder)
        if self.loss_config.codebook == "ema":
            tokenizer.quantize.requires_grad_(False)  # moved by `after_step`, not by the optimizer
        for part in self.model_config.frozen:
            tokenizer_part(tokenizer, part).requires_grad_(False)
        self.module = TokenizerTraining(eva, tokenizer, decoders, self.loss_config, world,
                                        config.train.steps).to(world.device)
        self.module.codebook_frozen = "codebook" in self.model_config.frozen
        self.module.eva.eval()
        self.data = self._loader(config.data.train)

    def _start_from(self, folder: Path, tokenizer: DynamicVisualTokenizer, decoders: Dict[str, VQDecoder]) -> None:
        """`model.tokenizer_init`: the folder's tokenizer replaces the fresh one, and its decoders
        the fresh ones where it has them; the sizes must match (as the MLX stage)."""
        if not folder.is_dir():
            raise LaVITError(f"model.tokenizer_init {folder}: no such folder")
        if not release.has_component(folder, "tokenizer"):
            raise LaVITError(f"model.tokenizer_init {folder}: holds no tokenizer")
        loaded = {"tokenizer": (tokenizer, release.load_tokenizer(folder, self.launch.vision_heads))}
        for name, decoder in decoders.items():
            if release.has_component(folder, name):
                loaded[name] = (decoder, release.load_decoder(folder, name == "highres_decoder", self.launch.vision_heads))
        for name, (ours, theirs) in loaded.items():
            for size in ("width", "merger_depth", "num_heads", "mlp_dim", "codebook_size", "code_dim", "depth",
                         "context_dims", "pooled_dim", "feature_dim", "num_patches"):
                a, b = getattr(ours.config, size, None), getattr(theirs.config, size, None)
                if a is not None and b is not None and tuple(np.atleast_1d(a)) != tuple(np.atleast_1d(b)):
                    raise LaVITError(f"model.tokenizer_init {folder}: its {name} has {size} {b}, this run's "
                                     f"model section {a}")
            ours.load_state_dict(theirs.state_dict(), strict=True)

    def _loader(self, sources, epochs: Optional[int] = None, shuffle: bool = True, workers: Optional[int] = None):
        data = self.config.data
        return StreamLoader(sources, self.world, self.config.train.batch_size, image_example(data.image_size),
                            stack, workers=self.launch.workers if workers is None else workers,
                            seed=self.config.train.seed, shuffle_buffer=data.shuffle_buffer,
                            lines_per_shard=data.lines_per_shard, epochs=epochs, shuffle=shuffle)

    # ----- the model
    def blocks(self) -> List[nn.Module]:
        module = self.module
        return [*module.tokenizer.causal_encoder.blocks,
                *(block for name in module.decoder_names for block in getattr(module, name).blocks)]

    def frozen(self) -> List[nn.Module]:
        return [self.module.eva]

    def saved_keys(self, key: str) -> bool:
        """Trained parameters, the codebook (moved by `after_step` in EMA mode), the code idle
        counters and the EVA bias that carries the centring."""
        return (super().saved_keys(key) or key in ("tokenizer.quantize.embedding.weight", "idle", self.centring_key))

    @property
    def centring_key(self) -> str:
        return f"eva.blocks.{len(self.module.eva.blocks) - 1}.mlp.fc2.bias"

    # ----- data
    def batches(self):
        return iter(self.data)

    def data_state(self) -> dict:
        return self.data.state_dict()

    def load_data_state(self, state: dict) -> None:
        if state:
            self.data.load_state_dict(state)

    # ----- the step's edges
    @torch.no_grad()
    def before_training(self) -> None:
        """From the encoder's outputs on the first `init_batches` training batches: the feature
        mean folded into EVA's last bias (`center_features`), then spherical k-means of the
        tokenizer's outputs (every position, deterministic selection). A second loader reads them,
        so the training cursor does not move; they are all-gathered so that every rank does the same."""
        cfg = self.loss_config
        if cfg.init_batches <= 0:
            return
        module = self.module
        loader = self._loader(self.config.data.train, workers=0)
        features = torch.cat([module.targets(batch["pixels"].to(self.world.device))
                              for batch in islice(iter(loader), cfg.init_batches)])
        features = self.world.all_gather(features)
        if cfg.center_features:
            mean = features.mean(dim=(0, 1))
            fc2 = module.eva.blocks[-1].mlp.fc2
            fc2.bias.sub_(mean.to(fc2.bias.dtype))  # the residual stream ends with this bias: EVA's output - mean
            features = features - mean
        if cfg.target_space == "whitened":
            mean, matrix = whitening(features.double().cpu().numpy())
            module.whiten_mean.copy_(torch.from_numpy(mean))
            module.whiten.copy_(torch.from_numpy(matrix))
        if cfg.projection_init != "pca" and cfg.kmeans_iters <= 0:
            return
        tokenizer = module.tokenizer
        tokenizer.eval()
        out = tokenizer(features)
        kept = out.keep.reshape(-1) > 0.5
        if not bool(kept.any()):
            kept = torch.ones_like(kept)  # a selector that keeps nothing yet: every position
        if cfg.projection_init == "pca":
            merged = out.merged.reshape(-1, out.merged.shape[-1])[kept]
            arrays = pca_projection(merged.double().cpu().numpy(), self.lavit_config.tokenizer.code_dim)
            first, last = tokenizer.encode_task_layer[0], tokenizer.encode_task_layer[2]
            for target, array in zip((first.weight, first.bias, last.weight, last.bias), arrays):
                assign_full(target, torch.from_numpy(array).to(target.device, target.dtype))
            out = tokenizer(features, keep=out.keep)
        tokenizer.train()
        if cfg.kmeans_iters > 0:
            z = out.z.reshape(-1, out.z.shape[-1])
            if cfg.kmeans_on == "kept":
                z = z[kept]
            generator = torch.Generator(device=z.device).manual_seed(self.config.train.seed + 1)
            centroids = spherical_kmeans(z, module.codebook_size, cfg.kmeans_iters, generator)
            tokenizer.quantize.embedding.weight.copy_(centroids)

    @torch.no_grad()
    def after_step(self, model, metrics, step: int) -> None:
        from ..loop import step_seed

        self.module.update_codebook(metrics, step_seed(self.config.train.seed + 7, step))

    # ----- evaluation and export
    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        """Over `train.eval_batches` eval batches per rank, with inference's deterministic
        selection: reconstruction (1 - cos) per decoder, kept fraction, mean tokens per image by
        object count (`tokens_objects_N`, from the manifest's `num_objects`), distinct codes used."""
        module = self.module
        sources = self.config.data.eval if self.config.data.eval is not None else self.config.data.train
        data = self.config.data
        loader = eval_loader(sources, self.world, self.config.train.batch_size, image_example(data.image_size), stack,
                             data.lines_per_shard)
        sums: Dict[str, float] = {}
        tokens: Dict[int, list] = {}
        used = torch.zeros(module.codebook_size, dtype=torch.bool, device=self.world.device)
        batches = 0
        was_training = module.training
        module.eval()
        with unsharded(model):
            for batch, counted in even_batches(loader, self.world, self.config.train.eval_batches):
                target = module.targets(batch["pixels"].to(self.world.device))
                out = module.tokenizer(target)
                positions = kept_positions(out.keep)
                decoded = {name: getattr(module, name).decode_features(out.quantized, out.keep, positions)
                           for name in module.decoder_names}
                if not counted:
                    continue  # run for the other ranks' collectives
                for name in module.decoder_names:
                    key = f"{name.split('_')[0]}_reconstruction"
                    compared = cosine(module.target_space(decoded[name].float()), module.target_space(target))
                    sums[key] = sums.get(key, 0.0) + float((1.0 - compared).mean())
                sums["keep_fraction"] = sums.get("keep_fraction", 0.0) + float(out.keep.mean())
                keep = out.keep > 0.5
                for count, objects in zip(keep.sum(dim=1).tolist(), batch["num_objects"].tolist()):
                    tokens.setdefault(int(objects), []).append(int(count))
                used[out.codes[keep]] = True
                batches += 1
        module.train(was_training)
        module.eva.eval()
        parts = self.world.gather_objects((sums, tokens, batches))
        used = self.world.global_sum(used.long()) > 0
        total = sum(n for _, _, n in parts)
        result = {key: sum(s.get(key, 0.0) for s, _, _ in parts) / max(total, 1) for key in sums}
        merged: Dict[int, list] = {}
        for _, part, _ in parts:
            for objects, counts in part.items():
                merged.setdefault(objects, []).extend(counts)
        result.update({f"tokens_objects_{n}": float(np.mean(v)) for n, v in sorted(merged.items())})
        result["codes_used"] = float(used.sum())
        return result

    def export(self, folder: Path, state: Dict[str, torch.Tensor]) -> None:
        """`out/model` in the released layout: the init folder's encoder, the tokenizer
        (`tokenizer_encoder.bin`) and the trained decoders, float32 (`lavit convert` takes it)."""
        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)  # an earlier export of this run
        parts = {"eva": "eva.", "tokenizer": "tokenizer."}
        parts.update({name: f"{name}." for name in self.module.decoder_names})
        for component, prefix in parts.items():
            save_release(folder / RELEASE_FILES[component],
                         {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def close(self) -> Optional[str]:
        return f"tokenizer data: {self.data.summary()}"
