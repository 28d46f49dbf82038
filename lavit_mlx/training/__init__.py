"""LaVIT's training in MLX: the three stages of the paper (tokenizer, unified LLM, pixel
decoder), the small encoder and VAE a new world needs, LoRA fine-tuning, one loop.

    lavit train tokenizer --config run.yaml --set train.steps=100

`config.py` reads the run's YAML, `loop.py` trains any `Stage`, `checkpoints.py` saves
and resumes, `stages/` holds one module per stage.
"""

from .config import RunConfig, load_run_config
from .loop import Stage, World, train

__all__ = ["RunConfig", "Stage", "World", "load_run_config", "run", "train"]


def run(stage: str, config_path=None, overrides=(), resume: bool = True) -> dict:
    """Load the run config, build the stage and train it (the `lavit train` command)."""
    from .stages import build_stage

    config = load_run_config(stage, config_path, list(overrides))
    world = World.init()
    return train(build_stage(config, world), config, resume=resume)
