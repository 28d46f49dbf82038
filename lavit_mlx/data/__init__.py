"""Streaming training data for the LaVIT trainers (MLX and PyTorch): pure Python + numpy.

Sources are JSONL manifests of captions or VQA pairs and WebDataset tar shards in
img2dataset's layout. Samples are streamed (never all in memory), shuffled with a buffer
and a per-epoch shard order, split across data-parallel ranks by shard (or within shards
when there are fewer shards than ranks), and resumable from a per-shard cursor that is
exact on the same number of ranks and loses or repeats nothing on another.

    stream = DataStream("data/{00000..00009}.tar", rank=rank, world_size=world, seed=0,
                        transform=to_model_inputs)
    if checkpoint:
        stream.load_state_dict(checkpoint["data"])
    for step, batch in enumerate(batches(stream, 8, drop_last=True)):
        ...
        if step % save_every == 0:
            states = all_gather(stream.state_dict())   # every rank's, e.g. as JSON strings
            if rank == 0:
                save({"data": merge_states(states), ...})

Importing this package imports neither mlx nor torch (`tuner` imports mlx when used).
"""

from .batching import batches, bucket_length, pad_batch
from .cursor import merge_states
from .samples import Sample
from .shards import expand_braces
from .stream import DataStream, format_stats

__all__ = [
    "DataStream",
    "Sample",
    "batches",
    "bucket_length",
    "expand_braces",
    "format_stats",
    "merge_states",
    "pad_batch",
]
