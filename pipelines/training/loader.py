"""Batches for one training worker, decoded and augmented off the training thread.

A training worker's data is split over ``parts`` feeds (``feed.MixedFeed``): feed ``p`` of
worker ``rank`` is data reader ``rank * parts + p`` of ``world * parts``, so every reader of
the job streams its own shards. With ``loader_workers = L >= 1`` each feed runs in its own
``torch.utils.data.DataLoader`` worker process (prefetching ``prefetch`` batches), while the
training thread only steps the model; ``L = 0`` runs one feed in the training thread (the
path before this module, kept for measurements and debugging). ``L = 1`` and ``L = 0`` draw
the very same batches.

A DataLoader over an iterable dataset takes batches from its workers in a fixed round-robin
order, and each batch travels with the state of its feed right after it. ``state_dict``
is therefore exact at every step: every feed's state as of the last batch the loop took, and
whose turn is next. ``load`` continues from it; with another split (worker count or
``--loader-workers`` changed) each new feed takes its part of the shards every old one still
had to read (``MixedFeed.resplit``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.training.augment import TrainAugment
from pipelines.training.feed import MixedFeed, TrainExample
from pipelines.training.options import TrainOptions
from pipelines.training.sources import TrainingSources

log = logging.getLogger("glipctl.train")


@dataclass
class FeedSpec:
    """What it takes to build the feed of any data reader (picklable, small)."""
    sources: TrainingSources
    options: TrainOptions
    min_size: tuple[int, ...] | int
    max_size: int
    max_tokens: int
    fixed_prompt: dict | None = None      # tuning.fixed_category_prompt, for prompt-tune runs

    def build(self, reader: int, readers: int) -> MixedFeed:
        o = self.options
        return MixedFeed(self.sources, o.mix, TrainAugment(self.min_size, self.max_size, train=o.augment),
                         o.seed, reader, readers, pseudo_min_score=o.pseudo_min_score,
                         pseudo_unboxed=o.pseudo_unboxed, detection_negatives=o.detection_negatives,
                         shuffle_buffer=o.shuffle_buffer, max_tokens=self.max_tokens, group_shards=o.group_shards,
                         fixed_prompt=self.fixed_prompt)


class _FeedBatches(IterableDataset):
    """Endless ``(part, batch, feed state after it)``; DataLoader worker ``j`` runs part
    ``(j + first) % parts``, resumed from ``states[part]``."""

    def __init__(self, spec: FeedSpec, rank: int, world: int, batch_size: int, states: list[dict], first: int):
        self.spec, self.rank, self.world, self.batch_size = spec, rank, world, batch_size
        self.states, self.first = states, first

    def __iter__(self) -> Iterator[tuple[int, list[TrainExample], dict]]:
        info = get_worker_info()
        parts = len(self.states)
        part = ((info.id if info is not None else 0) + self.first) % parts
        feed = self.spec.build(self.rank * parts + part, self.world * parts)
        feed.load_state_dict(self.states[part])
        while True:
            batch = feed.next_batch(self.batch_size)
            yield part, batch, feed.state_dict()


def _no_collate(item):
    return item


@dataclass
class WorkerBatches:
    """The batches of training worker ``rank`` of ``world`` (module docstring)."""
    spec: FeedSpec
    rank: int
    world: int
    batch_size: int
    loader_workers: int
    prefetch: int = 2
    states: list[dict] = field(default_factory=list)
    next_part: int = 0

    def __post_init__(self) -> None:
        self.parts = max(1, self.loader_workers)
        self.states = [self.spec.build(self.rank * self.parts + p, self.world * self.parts).state_dict()
                       for p in range(self.parts)]
        self._iterator: Iterator | None = None

    # ----------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "world": self.world, "feeds": self.states, "next": self.next_part}

    def load(self, rank_states: list[dict[str, Any]]) -> None:
        """Continue from every rank's ``state_dict`` of a checkpoint (before the first batch)."""
        old = [s for s in rank_states if s]
        if not old:
            return
        if any("feeds" not in s for s in old):   # written before data positions were kept this way
            log.warning("the checkpoint's data position is in an older format: data order restarts")
            return
        if old[0].get("world") == self.world and old[0].get("parts") == self.parts and len(old) == self.world:
            self.states = [dict(s) for s in old[self.rank]["feeds"]]
            self.next_part = int(old[self.rank]["next"])
            return
        readers = [f for s in old for f in s["feeds"]]
        log.warning("data split changed (%s workers x %s feeds -> %d x %d): the shards left in the epoch "
                    "are split anew", old[0].get("world"), old[0].get("parts"), self.world, self.parts)
        for p in range(self.parts):
            feed = self.spec.build(self.rank * self.parts + p, self.world * self.parts)
            feed.resplit(readers, keep_counts=(self.rank == 0 and p == 0))
            self.states[p] = feed.state_dict()
        self.next_part = 0

    # ----------------------------------------------------------- batches

    def _start(self) -> Iterator:
        dataset = _FeedBatches(self.spec, self.rank, self.world, self.batch_size, self.states, self.next_part)
        if self.loader_workers == 0:
            return iter(dataset)
        # its own generator: starting the workers must not draw from the training process's
        # torch RNG (dropout draws from it, and a resumed run restores it before this)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.loader_workers,
                            prefetch_factor=self.prefetch, collate_fn=_no_collate, persistent_workers=False,
                            generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def next_batch(self) -> list[TrainExample]:
        if self._iterator is None:
            self._iterator = self._start()
        part, batch, state = next(self._iterator)
        if part != self.next_part:    # the round-robin is DataLoader's contract; check it, never trust it
            raise RuntimeError(f"data loader returned feed {part}'s batch, expected feed {self.next_part}'s")
        self.states[part] = state
        self.next_part = (part + 1) % self.parts
        return batch

    def counts(self) -> dict[str, dict]:
        """The summed counts of this worker's feeds, as of the last batch taken."""
        from pipelines.training.loop import merge_counts
        return merge_counts([s.get("counts") or {} for s in self.states])

    def close(self) -> None:
        """Stop and join the loader processes."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)   # DataLoader's own clean-up, also run by its __del__
        if shutdown is not None:
            shutdown()
