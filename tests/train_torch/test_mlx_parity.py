"""The same YAML trains in MLX (`lavit train`) and in PyTorch (`python -m lavit_train`): with the
same initial weights loaded into both and the same first batch (both read the data with the
same cursor), the first step's losses agree.

Needs the MLX stage modules (`lavit_mlx/training/stages/`); skipped where they are not in
the tree. The tokenizers compare in inference mode: the frameworks draw different Gumbel
noise, and without it the training forward's values are the inference ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import builders
from harness import write_config


def mlx_stage(name: str, config_path):
    """The MLX stage `name` built from the YAML (skips when this tree has no such stage)."""
    try:
        stages = pytest.importorskip(f"lavit_mlx.training.stages.{name}")
    except Exception as exc:  # an MLX stage module that does not import here
        pytest.skip(f"the MLX {name} stage does not import: {exc}")
    from lavit_mlx.training.config import load_run_config
    from lavit_mlx.training.loop import World
    from lavit_mlx.training.stages import build_stage

    del stages
    return build_stage(load_run_config(name, config_path), World())


def torch_stage(config_path):
    from lavit_train.distributed import World
    from lavit_train.loop import Launch
    from lavit_train.sections import load_run_config
    from lavit_train.stages import build_stage

    return build_stage(load_run_config(None, config_path), World.init("cpu"), Launch(tensorboard=False))


def copy_weights(source: dict, module: torch.nn.Module, rename=lambda k: k, skip=("eva.",)) -> int:
    """MLX arrays (flattened names) -> the torch module's parameters of the same names."""
    state = module.state_dict()
    copied = 0
    for key, value in source.items():
        name = rename(key)
        if name is None or name.startswith(skip) or name not in state:
            continue
        target = state[name]
        array = torch.from_numpy(np.array(value.astype(value.dtype)).astype(np.float32))
        assert tuple(array.shape) == tuple(target.shape), name
        with torch.no_grad():
            target.copy_(array)
        copied += 1
    return copied


def close(a, b, rel=1e-4) -> bool:
    return abs(float(a) - float(b)) <= rel * max(abs(float(b)), 1e-8)


@pytest.mark.parametrize("patch_weights, target_space", [("uniform", "raw"), ("norm", "raw"), ("uniform", "whitened")])
def test_tokenizer_first_step_loss_agrees(folders, tmp_path, patch_weights, target_space):
    from mlx.utils import tree_flatten

    config = write_config(tmp_path / "tokenizer.yaml", {
        "stage": "tokenizer", "out": str(tmp_path / "run"), "model": {"init": str(folders["mlx"]), **builders.TOKENIZER_MODEL},
        "data": {"train": str(folders["data"]), "image_size": 28, "shuffle_buffer": 4, "lines_per_shard": 5},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1},
        "loss": {"init_batches": 0, "codebook": "gradient", "patch_weights": patch_weights, "target_space": target_space,
                 # whitened: the whitening is fitted on the first batch (nothing else is initialised)
                 **({"init_batches": 1, "kmeans_iters": 0, "center_features": False} if target_space == "whitened" else {})},
    })
    theirs = mlx_stage("tokenizer", config)
    ours = torch_stage(config)
    copied = copy_weights(dict(tree_flatten(theirs.model.parameters())), ours.module)
    trained = [k for k, p in ours.module.named_parameters() if not k.startswith("eva.")]
    assert copied >= len(trained)
    mlx_batch = next(theirs.batches())
    ours.before_training()
    torch_batch = next(ours.batches())
    assert np.array_equal(np.array(mlx_batch["pixels"]), torch_batch["pixels"].numpy())
    if target_space == "whitened":  # the same whitening, up to the eigenvectors' signs
        mlx_white, torch_white = np.array(theirs.state["whiten"]), ours.module.whiten.numpy()
        assert np.allclose(mlx_white @ mlx_white.T, torch_white @ torch_white.T, rtol=1e-3, atol=1e-3)
        assert not np.allclose(torch_white, np.eye(len(torch_white)))
    theirs.model.tokenizer.eval()
    mlx_loss, mlx_metrics = theirs.loss(theirs.model, mlx_batch)
    ours.module.train()
    ours.module.tokenizer.eval()
    with torch.no_grad():
        loss, metrics = ours.module(torch_batch)
    assert float(loss) > 0.01 and close(loss, mlx_loss), (float(loss), float(mlx_loss))
    for key in ("highres_reconstruction", "keep_ratio_loss", "commitment", "codebook", "keep_fraction",
                "indecision"):
        assert close(metrics[key], mlx_metrics[key], 1e-3), key


def test_llm_first_step_loss_agrees(folders, tmp_path):
    from mlx.utils import tree_flatten

    config = write_config(tmp_path / "llm.yaml", {
        "stage": "llm", "out": str(tmp_path / "run"),
        "model": {"init": str(folders["mlx"]), "text_tokenizer": str(folders["text"]), "max_length": 64,
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2}},
        "data": {"train": str(folders["data"]), "image_size": 28, "shuffle_buffer": 4, "lines_per_shard": 10},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1},
    })
    theirs = mlx_stage("llm", config)
    ours = torch_stage(config)

    def rename(key: str):
        # MLX: llm (LanguageModel) . model (mlx-lm Model) . {model.*, lm_head}; torch: llm . {model.*, lm_head}
        return "llm." + key[len("llm.model."):] if key.startswith("llm.model.") else key

    copied = copy_weights(dict(tree_flatten(theirs.model.parameters())), ours.module, rename,
                          skip=("eva.", "tokenizer."))
    assert copied == len([k for k, _ in ours.module.named_parameters() if k.startswith(("llm.", "understanding."))])
    mlx_batch = next(theirs.batches())
    torch_batch = next(ours.batches())
    mlx_loss, mlx_metrics = theirs.loss(theirs.model, mlx_batch)
    ours.module.train()
    with torch.no_grad():
        loss, metrics = ours.module(torch_batch)
    assert float(loss) > 0.01 and close(loss, mlx_loss), (float(loss), float(mlx_loss))
    for key in ("text_loss", "image_loss"):
        assert close(metrics[key], mlx_metrics[key], 1e-3), key
