"""A random transformers LLaMA saved to a folder: the LLM tests' reference."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lavit_mlx.config import TokenIds

TINY_IDS = TokenIds.for_vocab(98, codebook_size=32)  # 64 text ids, [IMG]=64, [/IMG]=65, codes 66..97


@lru_cache(maxsize=None)
def tiny_llama(folder: str, intermediate: int = 96, eos_lean: float = 7.0, image_end_lean: float = 4.0):
    """A random transformers LlamaForCausalLM (hidden 64, 2 layers, vocab 98) saved as model.safetensors.

    Weights are scaled up so that next-token distributions are peaked (no near-ties
    between the two implementations); the MLP width 96 is not a multiple of the
    quantization group (64), so `down_proj` stays unquantized.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_IDS.vocab_size, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=TINY_IDS.bos, eos_token_id=TINY_IDS.eos, pad_token_id=TINY_IDS.pad,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 if name == "lm_head.weight" else 0.15)
        # Lean eos and [/IMG] towards the mean final hidden state, so that sequences end now and then.
        probe = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 12, 64)).astype(np.float32))
        mean = model.model(inputs_embeds=probe).last_hidden_state.mean((0, 1))
        mean = mean / mean.norm()
        model.lm_head.weight[TINY_IDS.eos] += eos_lean * mean
        model.lm_head.weight[TINY_IDS.image_end] += image_end_lean * mean
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path, model
