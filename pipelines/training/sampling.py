"""Seeded, resumable sampling: which source each sample comes from, and which record.

* ``MixSampler`` draws a source name per sample with probability proportional to ``--mix``.
* ``EpochCursor`` walks a map-style source (gold, detection) in a fresh permutation per
  epoch, each worker taking its own stride of it (like ``DistributedSampler``).
* ``PseudoStream`` streams pseudo-label shards: each worker reads its own shards (or, with
  fewer shards than workers, its own stride of the samples), through a shuffle buffer.

Every piece has ``state_dict``/``load_state_dict`` holding plain Python values, so a resumed
run draws exactly what the interrupted one would have drawn next.

The shards are WebDataset tars; they are read through ``storage.shards.iter_shard_samples``
rather than the ``webdataset`` package so that there is one reader of the format, with the
same counted skips (truncated tars, bad members) everywhere. The split by worker and the
shuffle buffer are the webdataset ideas (``split_by_node``, ``shuffle``), made resumable.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from storage.errors import InputError
from storage.records import GroundedSample
from storage.skips import StageCounts

# Stream identifiers mixed into every seed so that sources never share random numbers.
_MIX, _CURSOR, _SHARD_ORDER, _SHUFFLE = 1, 2, 3, 4


class MixSampler:
    """Draws source names with the given weights (sources with weight 0 are never drawn)."""

    def __init__(self, weights: dict[str, float], seed: int, rank: int = 0):
        self.names = [n for n, w in weights.items() if w > 0]
        if not self.names:
            raise ValueError("every source has weight 0")
        total = sum(weights[n] for n in self.names)
        self.probabilities = np.array([weights[n] / total for n in self.names])
        self.rng = np.random.default_rng([seed, rank, _MIX])

    def next(self) -> str:
        return self.names[int(self.rng.choice(len(self.names), p=self.probabilities))]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class EpochCursor:
    """Indices into a source of ``size`` records: a new permutation each epoch, shared by
    all workers (same seed), worker ``rank`` taking positions ``rank, rank + world, ...``.

    A source smaller than the number of workers is read whole by every worker.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, tag: int = 0):
        if size < 1:
            raise ValueError("empty source")
        self.size, self.seed, self.rank, self.world, self.tag = size, seed, rank, world, tag
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, _CURSOR, self.tag, self.epoch]).permutation(self.size)
        return perm[self.rank::self.world] if self.size >= self.world else perm

    def next(self) -> int:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        index = int(self._order[self.position])
        self.position += 1
        return index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Yield ``items`` in a locally shuffled order using a buffer of ``buffer_size``."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


ShardReader = Callable[[list[str], StageCounts], Iterator[tuple[GroundedSample, bytes]]]


def _default_reader(paths: list[str], counts: StageCounts) -> Iterator[tuple[GroundedSample, bytes]]:
    from storage.shards import iter_shard_samples
    return iter_shard_samples(paths, counts)


class PseudoStream:
    """An endless, resumable stream of ``(sample, image bytes)`` from pseudo-label shards.

    Epoch ``e`` visits the shards in an order seeded by (seed, e) that every worker shares;
    with at least as many shards as workers, worker ``rank`` reads shards ``rank::world``
    (the shard is the unit of IO), else every worker reads all shards and keeps samples
    ``rank::world``. Resuming replays the current epoch's reads up to the saved position
    without decoding images (the cost is reading those tar bytes once more).

    ``counts`` collects the shard reader's skips (truncated tars, bad members).
    """

    def __init__(self, files: list[str], seed: int, rank: int = 0, world: int = 1,
                 buffer_size: int = 256, counts: StageCounts | None = None,
                 reader: ShardReader = _default_reader):
        if not files:
            raise ValueError("no shard files")
        self.files, self.seed, self.rank, self.world = list(files), seed, rank, world
        self.buffer_size, self.reader = buffer_size, reader
        self.counts = counts if counts is not None else StageCounts()
        self.epoch, self.position = 0, 0
        self._items: Iterator | None = None
        self._replay: tuple[StageCounts, StageCounts] | None = None

    def _epoch_items(self, epoch: int, counts: StageCounts) -> Iterator[tuple[GroundedSample, bytes]]:
        order = [self.files[i] for i in np.random.default_rng([self.seed, _SHARD_ORDER, epoch]).permutation(len(self.files))]
        if len(order) >= self.world:
            mine, stride = order[self.rank::self.world], None
        else:
            mine, stride = order, self.world

        def read() -> Iterator[tuple[GroundedSample, bytes]]:
            for i, item in enumerate(self.reader(mine, counts)):
                if stride is None or i % stride == self.rank:
                    yield item

        return shuffled(read(), self.buffer_size, np.random.default_rng([self.seed, _SHUFFLE, self.rank, epoch]))

    def _start_epoch(self, skip: int = 0) -> None:
        if not skip:
            self._items = self._epoch_items(self.epoch, self.counts)
            return
        # Replay: the reads before ``skip`` were counted by the run that made them, so this
        # epoch reads into a scratch counter and only what comes after the replay is added.
        scratch = StageCounts(max_logged=0)
        self._items = self._epoch_items(self.epoch, scratch)
        for _ in range(skip):
            next(self._items, None)
        self._replay = (scratch, StageCounts.from_dict(scratch.to_dict()))

    def reader_counts(self) -> StageCounts:
        """The shard reader's counts for this stream (replayed reads not counted twice)."""
        total = StageCounts.from_dict(self.counts.to_dict())
        if self._replay is not None:
            scratch, baseline = self._replay
            total.read += scratch.read - baseline.read
            total.written += scratch.written - baseline.written
            total.skipped.update(scratch.skipped - baseline.skipped)
        return total

    def next(self) -> tuple[GroundedSample, bytes]:
        if self._items is None:
            self._start_epoch()
        for _attempt in range(2):
            item = next(self._items, None)
            if item is not None:
                self.position += 1
                return item
            if self.position == 0:
                break
            self.epoch, self.position = self.epoch + 1, 0
            self._fold_replay()
            self._start_epoch()
        raise InputError(f"pseudo-label shards yield no sample for worker {self.rank} "
                         f"({len(self.files)} shard files; skipped: {dict(self.reader_counts().skipped)})")

    def _fold_replay(self) -> None:
        if self._replay is not None:
            self.counts = self.reader_counts()
            self._replay = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._replay = None
        self._start_epoch(skip=self.position)

