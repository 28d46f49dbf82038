"""lavit_train: LaVIT's PyTorch side, for pretraining on CUDA clusters and for references.

    models/        the PyTorch mirror of lavit_mlx/models (official state-dict keys)
    checkpoint.py  strict loaders from the released layout or an MLX folder
    sections.py    the run YAML's stage sections (pure Python, shared with the MLX trainers)
    loop.py        the training loop (DDP / FSDP2, accumulation, clipping, bf16, DCP checkpoints)
    stages/        tokenizer, llm, pixel: the three stages of the paper
    data.py        batches from lavit_mlx.data streams, with a cursor that reshards
    memory.py      memory per GPU of each stage at the release's sizes

Run `python -m lavit_train STAGE --config run.yaml` (under torchrun for several processes).
"""
