"""Where curvature passes get their batches.

- `CalibrationStream`: endless batches from any iterable (a DataLoader is re-iterated only when
  exhausted, never rebuilt per draw).
- `SeededBatches`: batches drawn from a map-style dataset with a generator seeded by (seed, step), so
  the curvature data at optimizer step s is the same in an interrupted-and-resumed run as in an
  uninterrupted one — the condition for resuming with identical masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import RecipeError

Batch = Mapping[str, Any]


class CalibrationStream:
    """Endless batches from an iterable."""

    def __init__(self, source: Iterable[Batch]) -> None:
        self.source = source
        self._iterator: Iterator[Batch] | None = None

    def next(self) -> Batch:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.source)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        if iter(self.source) is self.source:  # an iterator, not an iterable: it cannot start over
            raise RecipeError(
                "calibration batches ran out: they came from a one-pass iterator, which curvature passes cannot "
                "re-iterate; pass a DataLoader or a list of batches"
            )
        raise RecipeError("empty calibration dataloader: it yielded no batch; curvature needs data")

    def take(self, n: int) -> list[Batch]:
        return [self.next() for _ in range(n)]

    def __iter__(self) -> Iterator[Batch]:
        """Endless: consumers stop when they have what they need (`num_batches`, `num_grads`)."""
        while True:
            yield self.next()


def as_stream(batches: Iterable[Batch] | CalibrationStream) -> CalibrationStream:
    return batches if isinstance(batches, CalibrationStream) else CalibrationStream(batches)


class SeededBatches:
    """Random batches of a map-style dataset, reproducible per optimizer step.

    Args:
        dataset: supports `len()` and integer indexing (the Trainer's processed train dataset).
        collate_fn: turns a list of examples into a batch (the Trainer's data collator).
        batch_size: examples per batch.
        seed: base seed; add the process rank so data-parallel ranks see different data.
    """

    def __init__(
        self, dataset: Sequence[Any], collate_fn: Callable[[list[Any]], Batch], batch_size: int, seed: int
    ) -> None:
        if len(dataset) == 0:
            raise RecipeError("empty calibration dataset: curvature needs at least one example")
        self.dataset, self.collate_fn, self.batch_size, self.seed = dataset, collate_fn, batch_size, seed

    def stream(self, step: int) -> CalibrationStream:
        return CalibrationStream(self._batches(step))

    def _batches(self, step: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        while True:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            for start in range(0, max(len(order) - self.batch_size + 1, 1), self.batch_size):
                yield self.collate_fn([self.dataset[i] for i in order[start : start + self.batch_size]])
