"""Training batches for the PyTorch trainers, with a data cursor that reshards.

The samples come from `lavit_mlx.data.DataStream` (JSONL manifests and img2dataset tar
shards: KEY.jpg/.txt/.json, the parquet beside each tar ignored; unreadable images and
bad metadata skipped and counted by reason). Each (rank, data-loader worker) pair runs its
own stream as one *virtual rank* of `world_size x workers`, so shards are split across
nodes and workers (the stream's `partition`: every w-th shard, or every w-th sample when
shards are fewer) without PyTorch's data-loader state, which does not reshard.

Workers collate whole batches and send each with their stream's cursor after it; the
trainer keeps the cursor of the last batch it *consumed* from each virtual rank (batches
prefetched but not consumed are delivered again after a resume). A checkpoint holds
`merge_states` of every virtual rank's cursor: resumed with the same ranks and workers,
each stream continues exactly (the worker rotation is restored too, so the batch sequence
is the same); with any other number, the samples of the epoch that no virtual rank
delivered are split anew: none repeated, none skipped.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lavit_mlx.data import DataStream, batches, format_stats, merge_states

from .distributed import World

Collate = Callable[[list], Dict[str, torch.Tensor]]


def stack(examples: List[dict]) -> Dict[str, torch.Tensor]:
    """Examples of equal-shaped numpy fields -> a batch of tensors."""
    return {key: torch.from_numpy(np.stack([example[key] for example in examples])) for key in examples[0]}


def _compact(state: dict) -> dict:
    """A stream's cursor without the shard index (the same for every stream; added back on merge)."""
    return {k: v for k, v in state.items() if k != "index"}


class _Streams(IterableDataset):
    """The batches of one virtual rank per data-loader worker (see the module docstring)."""

    def __init__(self, loader: "StreamLoader"):
        self.loader = loader

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        loader = self.loader
        virtual = loader.virtual_rank((worker + loader.rotation) % loader.workers)
        stream = loader.stream(virtual)
        transform = loader.transform
        stream.transform = (lambda sample: transform(sample, stream)) if transform else None
        for group in batches(stream, loader.batch_size, drop_last=loader.drop_last):
            yield loader.collate(group), virtual, _compact(stream.state_dict())


class StreamLoader:
    """Endless training batches of this rank (or one pass, for evaluation), resumable.

    Args:
        sources: `data.train` (manifests, tar shards, brace patterns).
        world: the ranks.
        batch_size: examples per batch on this rank.
        transform: `(sample, stream) -> example` in the worker (None skips the sample; the
            stream gives its `epoch`, for choices that must be the same after a resume).
        collate: list of examples -> dict of tensors.
        workers: data-loader processes per rank (0: in the training process).
        seed, shuffle_buffer, lines_per_shard: as `DataStream`'s.
        epochs: None (endless, training) or a number of passes (evaluation).
        shuffle: False reads in order (evaluation).
        load_images: False for stages that read no pixels here.
        drop_last: drop an epoch's last, smaller batch (evaluation keeps it).
    """

    def __init__(self, sources, world: World, batch_size: int, transform, collate: Collate = stack,
                 workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, lines_per_shard: int = 1000,
                 epochs: Optional[int] = None, shuffle: bool = True, load_images: bool = True,
                 drop_last: bool = True):
        self.sources, self.world, self.batch_size = sources, world, batch_size
        self.transform, self.collate = transform, collate
        self.workers_requested = workers
        self.workers = max(1, workers)
        self.seed, self.shuffle_buffer, self.lines_per_shard = seed, shuffle_buffer if shuffle else 1, lines_per_shard
        self.epochs, self.shuffle, self.load_images, self.drop_last = epochs, shuffle, load_images, drop_last
        self.rotation = 0
        self.consumed = 0  # batches this rank took from the loader since the run began
        self.resume_state: Optional[dict] = None  # the merged cursor to start from
        self.index_state: Optional[dict] = None
        self.latest: Dict[int, dict] = {}  # virtual rank -> cursor after its last consumed batch
        self.stats: Dict[str, int] = {}

    # ----- the virtual ranks
    @property
    def virtual_world(self) -> int:
        return self.world.size * self.workers

    def virtual_rank(self, worker: int) -> int:
        return self.world.rank * self.workers + worker

    def stream(self, virtual: int) -> DataStream:
        """The stream of one virtual rank, at the cursor the run resumes from (if any)."""
        stream = DataStream(self.sources, rank=virtual, world_size=self.virtual_world, seed=self.seed,
                            shuffle_buffer=self.shuffle_buffer, shuffle_shards=self.shuffle,
                            lines_per_shard=self.lines_per_shard, epochs=self.epochs, load_images=self.load_images,
                            index=self.index())
        if self.resume_state is not None:
            stream.load_state_dict(self.resume_state)
        return stream

    def index(self) -> dict:
        """The shard index, counted once by rank 0 and sent to every rank (or the cursor's)."""
        if self.index_state is None:
            counted = None
            if self.world.main:
                counted = DataStream(self.sources, lines_per_shard=self.lines_per_shard).index_state()
            self.index_state = self.world.broadcast_object(counted)
        return self.index_state

    def epoch_length(self) -> int:
        """Samples in one epoch over all ranks and workers (skipped ones included)."""
        return sum(self.index()["lengths"])

    # ----- iteration
    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        self.index()
        dataset = _Streams(self)
        if self.workers_requested == 0:
            source = iter(dataset)
        else:
            # its own generator: the workers' seeds do not move the training's random state
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers_requested,
                                     persistent_workers=False, prefetch_factor=2,
                                     generator=torch.Generator().manual_seed(self.seed),
                                     multiprocessing_context="fork" if torch.multiprocessing.get_start_method(
                                         allow_none=True) in (None, "fork") else None))
        for batch, virtual, state in source:
            self.latest[virtual] = state
            self.consumed += 1
            yield batch

    # ----- the cursor
    def _initial_state(self, virtual: int) -> dict:
        """The cursor of a virtual rank that has not delivered a batch in this run yet."""
        merged = self.resume_state
        if merged is not None and merged["world_size"] == self.virtual_world and merged["seed"] == self.seed:
            own = dict(merged["ranks"][virtual])
            own.update({k: merged[k] for k in ("format", "version", "seed", "shuffle_buffer", "shuffle_shards",
                                               "world_size")})
            if own["shuffle_buffer"] == self.shuffle_buffer and own["shuffle_shards"] == self.shuffle:
                return _compact(own)
        stream = self.stream(virtual)
        return _compact(stream.state_dict())

    def state_dict(self) -> dict:
        """The merged cursor of every rank and worker (a collective: every rank calls it)."""
        mine = {v: self.latest.get(v) or self._initial_state(v)
                for v in (self.virtual_rank(w) for w in range(self.workers))}
        gathered = self.world.gather_objects((mine, self.consumed))
        states = [dict(state, index=self.index()) for part, _ in gathered for state in part.values()]
        merged = merge_states(states)
        merged["batches"] = [consumed for _, consumed in gathered]  # per rank, for the worker rotation
        return merged

    def load_state_dict(self, state: dict) -> None:
        """Start from a merged cursor (before iterating)."""
        self.resume_state = {k: v for k, v in state.items() if k != "batches"}
        self.index_state = state["index"]
        self.latest = {}
        same = state["world_size"] == self.virtual_world and len(state.get("batches", [])) == self.world.size
        self.consumed = state["batches"][self.world.rank] if same else 0
        self.rotation = self.consumed % self.workers if same else 0

    def summary(self) -> str:
        """Samples delivered and skipped over all ranks, by reason (a collective)."""
        states = [self.latest.get(v) or {} for v in (self.virtual_rank(w) for w in range(self.workers))]
        totals: Dict[str, int] = {}
        for part in self.world.gather_objects([s.get("stats", {}) for s in states]):
            for stats in part:
                for reason, count in stats.items():
                    totals[reason] = totals.get(reason, 0) + count
        return format_stats(totals)


# ----------------------------------------------------------------------------- evaluation
class _EvalEpoch:
    """What an evaluation transform sees as its stream: epoch 0."""

    epoch = 0


class EvalShards:
    """One ordered pass over img2dataset tar shards with WebDataset's pipeline, for evaluation.

    No cursor is needed for a pass that starts over each time, so webdataset's readers fit:
    the shard list is split over ranks and data-loader workers with `wds.split_by_node` and
    `wds.split_by_worker` (given explicitly), members are grouped by key (`tarfile_to_samples`),
    and a sample that does not decode (image, text or metadata) is skipped and counted by its
    error's type. `epoch_length()` is the number of samples read over all ranks (a collective).
    """

    def __init__(self, sources, world: World, batch_size: int, transform, collate: Collate = stack):
        from lavit_mlx.data.shards import find_files

        self.paths = find_files(sources).paths
        self.world, self.batch_size, self.transform, self.collate = world, batch_size, transform, collate
        self.errors: Dict[str, int] = {}
        self.read = 0

    def _skip(self, exc: Exception) -> bool:
        self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
        return True  # go on with the next sample

    def _sample(self, item: dict):
        import io
        import json

        from PIL import Image

        from lavit_mlx.data import Sample
        from lavit_mlx.image_processing import load_image

        name = next((e for e in ("jpg", "jpeg", "png", "webp") if e in item), None)
        if name is None:
            raise KeyError(f"{item.get('__key__')}: no image")
        meta = json.loads(item["json"]) if "json" in item else {}
        text = item["txt"].decode("utf-8") if "txt" in item else meta.get("caption")
        image = load_image(Image.open(io.BytesIO(item[name])))
        image.load()
        self.read += 1
        return Sample(key=item["__key__"], image=image, text=text, question=meta.pop("question", None),
                      answer=meta.pop("answer", None), meta=meta, shard=item.get("__url__", ""),
                      index=self.read - 1)

    def __iter__(self) -> Iterator:
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.paths),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._skip),
            wds.map(self._sample, handler=self._skip),
            wds.map(lambda sample: self.transform(sample, _EvalEpoch), handler=self._skip),
            wds.select(lambda example: example is not None),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=True),
        )
        return iter(pipeline)

    def epoch_length(self) -> int:
        """Samples read (decoded) over all ranks so far."""
        return int(self.world.global_sum(torch.tensor(self.read)))


def eval_loader(sources, world: World, batch_size: int, transform, collate: Collate = stack,
                lines_per_shard: int = 1000):
    """One ordered pass for evaluation, split over the ranks: WebDataset's pipeline for tar shards,
    a `StreamLoader` pass for manifests."""
    from lavit_mlx.data.shards import find_files

    if all(kind == "tar" for kind in find_files(sources).kinds):
        return EvalShards(sources, world, batch_size, transform, collate)
    return StreamLoader(sources, world, batch_size, transform, collate, epochs=1, shuffle=False,
                        lines_per_shard=lines_per_shard, drop_last=False)


def even_batches(loader, world: World, limit: int) -> List[tuple]:
    """Up to `limit` evaluation batches of this rank, padded so that every rank runs as many
    forward passes (FSDP2's all-gathers and the losses' global sums are collectives): a rank
    short of batches repeats one (the first rank's that has any, if it has none) marked not
    to be counted.

    Returns:
        [(batch, counted), ...], the same length on every rank.
    """
    from itertools import islice

    mine = list(islice(iter(loader), limit))
    counts = world.gather_objects(len(mine))
    most = max(counts)
    if most == 0:
        return []
    spare = mine[0] if mine else None
    if world.distributed and min(counts) == 0:
        import torch.distributed as dist

        box = [spare]
        dist.broadcast_object_list(box, src=next(r for r, n in enumerate(counts) if n))
        spare = spare if mine else box[0]
    return [(batch, True) for batch in mine] + [(spare, False)] * (most - len(mine))
