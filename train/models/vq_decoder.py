"""LaVIT's VQ decoders in PyTorch: visual codes -> conditioning for the diffusion UNet.

Mirror of `lavit_mlx.models.vq_decoder` (same names, same semantics) for the training
path (reconstructing the frozen ViT's features from the kept, quantised tokens); both
follow the official `LaVIT/models/modeling_decoder.py` (`VQDecoder`, `HighresVQDecoder`).
Both share one trunk: codebook rows -> `in_proj` + `pos_embed`, then `query_embed`
(one query per ViT patch) goes through `depth` blocks of self-attention, cross-attention
to the (padded) code sequence and MLP, `norm`, `decode_task_layer` back to ViT-like
1408-d features. The low-res head projects them to 768-d (SD-1.5 context); the high-res
head to 768 || 1280 = 2048-d prompt embeddings plus a 1280-d pooled vector from an
attention pool (SDXL's text_embeds).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from lavit_mlx.config import VQDecoderConfig

from .layers import CrossAttention, Mlp, SelfAttention, merge_heads, split_heads

PAD_BIAS = -10000.0  # added to the scores of padded code positions, as the release does


def padded_attend(bias: torch.Tensor):
    """Softmax attention with an additive (B, 1, 1, T) bias on the keys."""

    def attend(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)

    return attend


def policy_attend(visible: torch.Tensor):
    """Softmax attention weighted by `visible` (B, 1, 1, T) on the keys (training's straight-through
    keep mask; the merger's rule with the release's epsilon terms)."""
    from .visual_tokenizer import policy_attend as merger_attend

    return merger_attend(visible)


class DecoderBlock(nn.Module):
    def __init__(self, config: VQDecoderConfig):
        super().__init__()
        w = config.width
        self.norm0 = nn.LayerNorm(w, eps=config.eps)
        self.self_attn = SelfAttention(w, config.num_heads)
        self.norm1 = nn.LayerNorm(w, eps=config.eps)
        self.cross_attn = CrossAttention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=config.eps)
        self.mlp = Mlp(w, config.mlp_dim)

    def forward(self, queries, codes, attend):
        queries = queries + self.self_attn(self.norm0(queries))
        queries = queries + self.cross_attn(self.norm1(queries), codes, attend)
        return queries + self.mlp(self.norm2(queries))


class AttentionPool(nn.Module):
    """`unet_attnpool`: one multi-head attention over [mean token, tokens] + positions,
    keeping the mean token's output (CLIP's AttentionPool2d on a token sequence)."""

    def __init__(self, num_tokens: int, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.zeros(num_tokens + 1, dim))
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        h = self.num_heads
        scale = (x.shape[-1] // h) ** -0.5
        query = split_heads(self.q_proj(x[:, :1]), h)  # only the mean token's output is kept
        out = F.scaled_dot_product_attention(query, split_heads(self.k_proj(x), h), split_heads(self.v_proj(x), h),
                                             scale=scale)
        return self.c_proj(merge_heads(out))[:, 0]


class VQDecoder(nn.Module):
    """The low-res (`highres=False`) or high-res VQ decoder, named as the checkpoint."""

    def __init__(self, config: VQDecoderConfig):
        super().__init__()
        self.config = config
        w, n = config.width, config.num_patches
        self.in_proj = nn.Linear(config.code_dim, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, w))
        self.query_embed = nn.Parameter(torch.zeros(1, n, w))
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w, eps=config.eps)
        self.decode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.feature_dim))
        if config.highres:
            self.unet_proj_1 = nn.Linear(config.feature_dim, config.context_dims[0])
            self.unet_proj_2 = nn.Linear(config.feature_dim, config.context_dims[1])
            self.unet_attnpool = AttentionPool(n, config.feature_dim, config.num_heads, config.pooled_dim)
        else:
            self.unet_proj = nn.Linear(config.feature_dim, config.context_dims[0])

    def forward(self, code_rows: Sequence[torch.Tensor]) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Decode the codebook rows of each image (a list of (T_i, code_dim) tensors).

        Returns:
            low-res: context (B, num_patches, 768);
            high-res: (prompt_embeds (B, num_patches, 2048), pooled (B, 1280)).
        """
        lengths = [int(rows.shape[0]) for rows in code_rows]
        longest = max(lengths)
        if longest == 0:
            raise ValueError("no visual tokens to decode")
        if longest > self.config.num_patches:
            raise ValueError(f"{longest} visual tokens exceed the decoder's {self.config.num_patches} positions")
        dtype = self.in_proj.weight.dtype
        padded = torch.stack([F.pad(rows.to(dtype), (0, 0, 0, longest - length))
                              for rows, length in zip(code_rows, lengths)])  # (B, T, code_dim)
        valid = (torch.arange(longest, device=padded.device)[None, :]
                 < torch.tensor(lengths, device=padded.device)[:, None]).to(dtype)
        return self.unet_condition(self.decode_features(padded, valid))

    def decode_features(self, codes: torch.Tensor, mask: torch.Tensor, positions: Optional[torch.Tensor] = None,
                        policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The trunk and `decode_task_layer` on a padded batch: ViT-like features (B, num_patches, feature_dim).

        Args:
            codes: (B, T, code_dim) codebook rows (anything where `mask` is 0).
            mask: (B, T) 1 for a code, 0 for padding (its keys get PAD_BIAS, as the release's).
            positions: (B, T) index into `pos_embed` of each code; default 0..T-1, the
                inference layout. Training passes each kept token's rank among the kept ones
                with the tokens left in place: cross-attention does not depend on the order
                of its keys, so this equals the compacted sequence.
            policy: training only: the keep mask with its straight-through gradient, used as
                weights on the keys' softmax instead of the padding bias (the merger's rule).
                Its forward values are `mask`'s, so the result equals the padded one (up to
                that rule's 1e-6 epsilon), and the gradient tells the selector what each
                token's code is worth to the reconstruction.
        """
        T = codes.shape[1]
        tokens = self.in_proj(codes)
        if policy is None:
            tokens = tokens * mask[..., None].to(codes.dtype)  # padded rows are zero + position
            attend = padded_attend(torch.where(mask > 0, 0.0, PAD_BIAS)[:, None, None, :])  # (B, 1, 1, T)
        else:
            attend = policy_attend(policy[:, None, None, :])
        if positions is None:
            tokens = tokens + self.pos_embed[:, :T]
        else:
            tokens = tokens + self.pos_embed[0][positions]
        x = self.query_embed.expand(codes.shape[0], *self.query_embed.shape[1:])
        for block in self.blocks:
            x = block(x, tokens, attend)
        return self.decode_task_layer(self.norm(x))  # (B, num_patches, feature_dim)

    def unet_condition(self, features: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The UNet heads on decoded features: low-res context, or high-res (prompt_embeds, pooled)."""
        if not self.config.highres:
            return self.unet_proj(features)
        prompt_embeds = torch.cat([self.unet_proj_1(features), self.unet_proj_2(features)], dim=-1)
        return prompt_embeds, self.unet_attnpool(features)
