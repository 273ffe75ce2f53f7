"""Seeded, resumable sampling: which source each sample comes from, and which record.

* ``MixSampler`` draws a source name per sample with probability proportional to ``--mix``.
* ``ShardStream`` streams one source's shards (packed gold, packed detection, pseudo-labels)
  for one reader: each epoch visits the shards in a seeded order that every reader shares,
  reader ``rank`` of ``world`` taking shards ``rank::world`` (the shard is the unit of IO;
  with fewer shards than readers, each reads them all and keeps its stride of the samples).
  Its shards are read ``group_shards`` at a time, interleaved, through a shuffle buffer that
  is drained at the end of each group.

Because the buffer never outlives a group, a stream's position is small and exact:
``(epoch, the shards still to read this epoch, samples already taken from the current group)``.
Resuming re-reads only the current group up to that count (bounded by the group, whatever
the size of the dataset: no epoch replay), and a resume with another number of readers
re-splits the shards every old reader still had to read (``resplit``). Every piece has
``state_dict``/``load_state_dict`` holding plain Python values.

The shards are WebDataset tars; they are read through ``storage.shards.iter_shard_samples``
rather than the ``webdataset`` package so that there is one reader of the format, with the
same counted skips (truncated tars, bad members) everywhere. The split by reader and the
shuffle buffer are the webdataset ideas (``split_by_node``, ``shuffle``), made resumable.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from storage.errors import InputError
from storage.records import GroundedSample
from storage.skips import StageCounts

# Stream identifiers mixed into every seed so that sources never share random numbers.
_MIX, _SHARD_ORDER, _SHUFFLE = 1, 3, 4


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




ShardReader = Callable[[str, StageCounts], Iterator[tuple[GroundedSample, bytes]]]


def read_shard(path: str, counts: StageCounts) -> Iterator[tuple[GroundedSample, bytes]]:
    """``(sample, image bytes)`` of one shard file, bad members counted (``storage.shards``)."""
    from storage.shards import iter_shard_samples
    return iter_shard_samples([path], counts)


def interleaved(iterators: list[Iterator]) -> Iterator:
    """Round-robin over ``iterators`` until every one is exhausted."""
    live = list(iterators)
    while live:
        for it in list(live):
            item = next(it, None)
            if item is None:
                live.remove(it)
            else:
                yield item


class ShardStream:
    """An endless, resumable stream of ``(shard path, sample, image bytes)`` (module docstring).

    ``tag`` separates the random streams of sources that share a seed; ``counts`` collects the
    shard reader's counts (reads and skips), replayed reads not counted twice.
    """

    def __init__(self, files: list[str], seed: int, rank: int = 0, world: int = 1, tag: int = 0,
                 group_shards: int = 4, buffer_size: int = 256, counts: StageCounts | None = None,
                 reader: ShardReader = read_shard):
        if not files:
            raise ValueError("no shard files")
        if group_shards < 1:
            raise ValueError("group_shards must be >= 1")
        self.files, self.seed, self.rank, self.world, self.tag = list(files), seed, rank, world, tag
        self.group_shards, self.buffer_size, self.reader = group_shards, buffer_size, reader
        self.counts = counts if counts is not None else StageCounts()
        self.epoch, self.taken = 0, 0
        self.pending, self.stride = self._split(self._epoch_order(0))
        self._items: Iterator | None = None

    # --------------------------------------------------------------- the plan

    def _epoch_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, _SHARD_ORDER, self.tag, epoch])
        return [int(i) for i in rng.permutation(len(self.files))]

    def _split(self, shards: list[int]) -> tuple[list[int], bool]:
        """This reader's part of ``shards``: its own shards, or all of them read by stride."""
        if len(shards) >= self.world:
            return shards[self.rank::self.world], False
        return list(shards), True

    def _group_items(self) -> Iterator[tuple[str, GroundedSample, bytes]]:
        group = self.pending[:self.group_shards]
        counts = self.counts

        def read(i: int) -> Iterator:
            path = self.files[i]
            return ((path, sample, data) for sample, data in self.reader(path, counts))

        items = interleaved([read(i) for i in group])
        if self.stride:
            items = (item for n, item in enumerate(items) if n % self.world == self.rank)
        rng = np.random.default_rng([self.seed, _SHUFFLE, self.tag, self.rank, self.epoch, group[0]])
        return shuffled(items, self.buffer_size, rng)

    def _next_group(self) -> None:
        self.pending, self.taken = self.pending[self.group_shards:], 0
        if not self.pending:
            self.epoch += 1
            self.pending, self.stride = self._split(self._epoch_order(self.epoch))
        self._items = None

    # --------------------------------------------------------------- reading

    def next(self) -> tuple[str, GroundedSample, bytes]:
        empty_groups = 0
        while True:
            if self._items is None:
                self._items = self._group_items()
            item = next(self._items, None)
            if item is not None:
                self.taken += 1
                return item
            empty_groups = empty_groups + 1 if self.taken == 0 else 0
            if empty_groups > len(self.files) // max(1, self.group_shards) + 2:   # a whole epoch and more gave nothing
                raise InputError(f"shards yield no sample for reader {self.rank} of {self.world} "
                                 f"({len(self.files)} shard files, e.g. {self.files[0]}; "
                                 f"skipped: {dict(self.counts.skipped)})")
            self._next_group()

    # --------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pending": list(self.pending), "stride": self.stride, "taken": self.taken,
                "files": len(self.files)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken: re-read the current group up to ``taken``."""
        if int(state.get("files", len(self.files))) != len(self.files):
            raise InputError(f"the resumed run read {state.get('files')} shard files, this one {len(self.files)}: "
                             f"resume with the same inputs (or start over with --overwrite)")
        self.epoch, self.taken = int(state["epoch"]), 0
        self.pending, self.stride = [int(i) for i in state["pending"]], bool(state["stride"])
        self._items = None
        skip = int(state["taken"])
        if not skip or not self.pending:
            return
        # the skipped reads were counted by the run that made them: count them, then take them back
        before, logging = StageCounts.from_dict(self.counts.to_dict()), self.counts.max_logged
        self.counts.max_logged = 0
        self._items = self._group_items()
        for _ in range(skip):
            if next(self._items, None) is None:
                break
            self.taken += 1
        self.counts.read, self.counts.written, self.counts.skipped = before.read, before.written, before.skipped
        self.counts.max_logged = logging

    def resplit(self, states: list[dict]) -> None:
        """Take this reader's part of what every reader of another split (``states``, one per
        old reader) still had to read in its epoch; a shard begun but not finished is read whole."""
        if any(int(s.get("files", len(self.files))) != len(self.files) for s in states):
            raise InputError("the resumed run read another set of shard files: resume with the same inputs")
        left: list[int] = []
        for s in states:
            for i in s["pending"]:
                if int(i) not in left:
                    left.append(int(i))
        self.epoch = max(int(s["epoch"]) for s in states)
        self.taken, self._items = 0, None
        if left:
            self.pending, self.stride = self._split(left)
        else:
            self.epoch += 1
            self.pending, self.stride = self._split(self._epoch_order(self.epoch))
