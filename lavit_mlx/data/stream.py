"""`DataStream`: shuffled, rank-split, resumable samples from manifests and tar shards.

Per epoch every rank walks its plan (its shards, or its slice of each shard, in the
epoch's seeded shard order; `cursor.partition`), reading records into a shuffle buffer of
`shuffle_buffer` records and handing out one drawn at random (swap-remove), decoded only
then. The buffer drains at the end of an epoch, so every sample of epoch e is delivered
in epoch e. Nothing else is held: memory is the buffer plus the sample being decoded.

`state_dict()` is the rank's exact position (its unread plan, the buffered sample refs
in buffer order, the draw counter); `cursor.merge_states` joins the ranks' states for the
checkpoint, and `load_state_dict` resumes from it: the same sequence on the same number of
ranks, and on any other number the samples no rank delivered yet, split anew.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..errors import ImageError, LaVITError
from .cursor import (STATE_FORMAT, STATE_VERSION, CounterRNG, carried_plan, check_state,
                     clip_after, iter_sorted, merge_states, standard_plan)
from .samples import BAD_IMAGE, FILTERED, Sample, decode
from .shards import DataIndex, Source, build_index, find_files, read_shard

_END = object()  # the epoch (or the run) has no sample left
_SKIP = object()  # the drawn sample was unusable; draw again


def format_stats(stats: dict[str, int]) -> str:
    """One line for a log: "980 samples; skipped 20 (missing_image 3, bad_image 17)"."""
    skipped = {k: v for k, v in sorted(stats.items()) if k != "samples" and v}
    line = f"{stats.get('samples', 0)} samples"
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.items())
        line += f"; skipped {sum(skipped.values())} ({reasons})"
    return line


class DataStream:
    """Training samples from JSONL manifests and/or img2dataset tar shards.

    Rank r of w reads every w-th shard of the epoch's shard order; with fewer shards than
    ranks, every rank reads every shard and keeps every w-th sample of it (index modulo w).
    Ranks' shares can differ by a shard, so ranks end an epoch at different times and go
    on with the next one (`epoch` is per rank): leave `epochs` at None for data-parallel
    training and count steps, so that no rank stops while the others wait for it. The
    shard index (lengths, how manifests are cut) is counted on first use, or taken from a
    loaded cursor.

    Args:
        sources: a path, brace pattern (``data/{00000..00009}.tar``) or glob, or a list.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: fixes the shard order of every epoch and the buffer draws (same seed, same
            sequence, on any machine).
        shuffle_buffer: records held for shuffling (1: no shuffling within shards).
        shuffle_shards: shuffle the shard order anew each epoch.
        lines_per_shard: manifests are cut into shards of this many samples.
        epochs: stop after this many epochs (None: never stop).
        transform: called on each decoded `Sample`; its result is what the stream yields
            (None skips the sample, an `ImageError` counts it as a bad image).
        load_images: decode images (False: `Sample.image` is None and image files are not
            opened, e.g. for text-only stages or to count a data set).
        index: a shard index saved from `index_state()` (e.g. counted by rank 0 and sent to
            the others, or cached in a file), so that this rank does not count it again.
    """

    def __init__(self, sources: Union[Source, Sequence[Source]], *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 shuffle_shards: bool = True, lines_per_shard: int = 1000,
                 epochs: Optional[int] = None,
                 transform: Optional[Callable[[Sample], Any]] = None,
                 load_images: bool = True, index: Optional[dict] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise LaVITError(f"rank {rank} is not one of world_size {world_size} ranks")
        if shuffle_buffer < 1 or lines_per_shard < 1 or (epochs is not None and epochs < 1):
            raise LaVITError("shuffle_buffer, lines_per_shard and epochs must be at least 1")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.lines_per_shard, self.epochs, self.transform = lines_per_shard, epochs, transform
        self.load_images = load_images
        self._files = find_files(sources)  # os.stat only; the index pass waits for first use
        self._index: Optional[DataIndex] = None
        if index is not None:
            self._index = DataIndex.from_state(index)
            self._index.check_files(self._files)
        self._epoch = 0
        self._plan: Optional[deque] = None  # None: not started
        self._reader: Optional[Iterator] = None
        self._last_read = -1
        self._buffer: list[tuple[int, int, Any]] = []  # (shard pos, index, Record)
        self._rng: Optional[CounterRNG] = None
        self._future: dict[int, list] = {}  # carried-over plans of later epochs
        self._stats: dict[str, int] = {"samples": 0}
        self._delivered = 0  # in this epoch
        self._empty_epochs = 0

    # ----- what the trainer reads ---------------------------------------------------

    @property
    def index(self) -> DataIndex:
        if self._index is None:
            self._index = build_index(self._files, self.lines_per_shard)
        return self._index

    def index_state(self) -> dict:
        """The shard index (JSON), for another rank's or a later run's `index=` argument."""
        return self.index.to_state()

    @property
    def shard_ids(self) -> list[str]:
        return [self.index.shard_id(pos) for pos in range(len(self.index.lengths))]

    def epoch_length(self) -> int:
        """Samples per epoch over all ranks, as indexed (skipped ones included)."""
        return sum(self.index.lengths)

    __len__ = epoch_length  # mlx-lm's trainer sizes its validation loop with len()

    @property
    def epoch(self) -> int:
        """The epoch (0-based) of the sample handed out last; it moves on with the next one."""
        return self._epoch

    @property
    def stats(self) -> dict[str, int]:
        """Samples delivered ("samples") and skipped, by reason, on this rank."""
        return dict(self._stats)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> Any:
        sample = self._next(advance=True)
        if sample is _END:
            raise StopIteration
        return sample

    def epoch_samples(self) -> Iterator[Any]:
        """The samples left in the current epoch (the next one's, if it is used up)."""
        self._start()
        if not self._buffer and not self._plan and not self._next_epoch():
            return
        while (sample := self._next(advance=False)) is not _END:
            yield sample

    # ----- the loop -----------------------------------------------------------------

    def _start(self) -> None:
        if self._plan is None:
            if self.epoch_length() == 0:
                where = self._files.paths[0] if len(self._files.paths) == 1 else (
                    f"{len(self._files.paths)} data files ({self._files.paths[0]}, ...)")
                raise LaVITError(f"{where}: no samples to train on")
            self._begin_epoch(self._epoch)

    def _begin_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        plan = self._future.pop(epoch, None)
        if plan is None:
            plan = standard_plan(self.index.lengths, self.seed, epoch, self.shuffle_shards,
                                 self.world_size, self.rank)
        self._plan = deque(plan)
        self._close_reader()
        self._rng = CounterRNG("buffer", self.seed, epoch, self.world_size, self.rank)
        self._delivered = 0

    def _next_epoch(self) -> bool:
        self._empty_epochs = self._empty_epochs + 1 if self._delivered == 0 else 0
        if self._empty_epochs >= 2:
            raise LaVITError(
                f"rank {self.rank} of {self.world_size}: two epochs running without a usable "
                f"sample ({format_stats(self._stats)}); fix the data or use fewer ranks"
            )
        if self.epochs is not None and self._epoch + 1 >= self.epochs:
            return False
        self._begin_epoch(self._epoch + 1)
        return True

    def _next(self, advance: bool) -> Any:
        self._start()
        while True:
            self._fill()
            if not self._buffer:
                if not advance or not self._next_epoch():
                    return _END
                continue
            slot = self._rng.below(len(self._buffer))
            pos, index, record = self._buffer[slot]
            self._buffer[slot] = self._buffer[-1]
            self._buffer.pop()
            result = self._deliver(pos, index, record)
            if result is not _SKIP:
                return result

    def _fill(self) -> None:
        while len(self._buffer) < self.shuffle_buffer:
            item = self._pull()
            if item is None:
                return
            if isinstance(item[2], str):
                self._count(item[2])  # unusable before decoding: a missing key, no image...
            else:
                self._buffer.append(item)

    def _pull(self) -> Optional[tuple[int, int, Any]]:
        while self._plan:
            pos, ranges = self._plan[0]
            if self._reader is None:
                self._reader = read_shard(self._files, self.index, pos, iter_sorted(ranges))
                self._last_read = -1
            item = next(self._reader, None)
            if item is not None:
                self._last_read = item[0]
                return pos, item[0], item[1]
            self._plan.popleft()
            self._close_reader()
        return None

    def _deliver(self, pos: int, index: int, record: Any) -> Any:
        sample = decode(record, self.index.shard_id(pos), index, self.load_images)
        if isinstance(sample, str):
            self._count(sample)
            return _SKIP
        if self.transform is not None:
            try:
                sample = self.transform(sample)
            except ImageError:
                self._count(BAD_IMAGE)
                return _SKIP
            if sample is None:
                self._count(FILTERED)
                return _SKIP
        self._delivered += 1
        self._stats["samples"] += 1
        return sample

    def _count(self, reason: str) -> None:
        self._stats[reason] = self._stats.get(reason, 0) + 1

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()  # closes the shard's file now, not at garbage collection
            self._reader = None

    # ----- the cursor ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's exact position, JSON-serialisable; merge all ranks' with `merge_states`."""
        self._start()
        plan = [[pos, [list(r) for r in ranges]] for pos, ranges in self._plan]
        if self._reader is not None and plan:
            plan[0][1] = clip_after(plan[0][1], self._last_read)
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer, "shuffle_shards": self.shuffle_shards,
            "index": self.index.to_state(), "world_size": self.world_size, "rank": self.rank,
            "epoch": self._epoch, "plan": [entry for entry in plan if entry[1]],
            "buffer": [[pos, index] for pos, index, _ in self._buffer],
            "draws": self._rng.draws, "delivered": self._delivered,
            "future": [[e, p] for e, p in sorted(self._future.items())],
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from a merged cursor (or, on one rank, from its own state).

        Same number of ranks and the same seed and shuffle settings: each rank continues
        exactly where it stopped. Otherwise the samples of the current epoch that no rank
        delivered are split among the ranks anew (none repeated, none skipped), and later
        epochs follow this stream's settings.
        """
        check_state(state)
        own = None
        if "ranks" not in state:
            own, state = state, (merge_states([state]) if state["world_size"] == 1 else None)
        header = state or own
        index = DataIndex.from_state(header["index"])
        index.check_files(self._files)
        self._index = index
        self._close_reader()
        self._buffer, self._empty_epochs = [], 0
        settings = (header["world_size"], header["seed"], header["shuffle_buffer"],
                    header["shuffle_shards"])
        if settings == (self.world_size, self.seed, self.shuffle_buffer, self.shuffle_shards):
            mine = state["ranks"][self.rank] if state is not None else own
            if mine["rank"] == self.rank:
                self._restore(mine)
                return
        if state is None:
            raise LaVITError(
                f"this is rank {own['rank']}'s own cursor of {own['world_size']} ranks; "
                "resume from merge_states() of all ranks' states"
            )
        self._repartition(state)

    def _restore(self, mine: dict) -> None:
        self._future = {e: p for e, p in mine["future"]}
        self._begin_epoch(mine["epoch"])
        self._plan = deque(mine["plan"])
        self._rng.draws, self._delivered = mine["draws"], mine["delivered"]
        self._stats = dict(mine["stats"])
        # The buffered records are read again from their shards, one pass per shard.
        wanted: dict[int, set] = {}
        for pos, index in mine["buffer"]:
            wanted.setdefault(pos, set()).add(index)
        records = {}
        for pos, indices in wanted.items():
            for index, record in read_shard(self._files, self.index, pos, iter(sorted(indices))):
                records[pos, index] = record
        for pos, index in mine["buffer"]:
            record = records.get((pos, index))
            if record is None or isinstance(record, str):
                raise LaVITError(f"{self.index.shard_id(pos)}: sample {index} of the data cursor "
                                 "is no longer readable; the data changed since the checkpoint")
            self._buffer.append((pos, index, record))

    def _repartition(self, merged: dict) -> None:
        lengths = self.index.lengths
        plans = {
            epoch: carried_plan(dict((pos, r) for pos, r in per_shard), lengths, self.seed,
                                epoch, self.shuffle_shards, self.world_size, self.rank)
            for epoch, per_shard in merged["remaining"]
        }
        self._future = plans
        self._begin_epoch(min(plans))
        # The run's counts so far live on rank 0 only, so that the next merge adds them once.
        self._stats = dict(merged["stats"]) if self.rank == 0 else {"samples": 0}
