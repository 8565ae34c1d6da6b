"""Loaders and subsets that every task shares: seeded, resumable, data-parallel, and calibration batches.

A training loader takes this rank's equal share of a per-epoch seeded
permutation (:class:`~quantbench.training.distributed.ShardSampler`) and draws
each sample's augmentation from (seed, epoch, index)
(:class:`~quantbench.training.distributed.EpochSeeded`), so a run resumed
mid-epoch, or run by several processes, sees the same images transformed the
same way. Subsets (a fraction of a split, the calibration images) are seeded
draws in file order.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from quantbench.progress import progress
from quantbench.training.distributed import EpochSeeded, ShardSampler

__all__ = [
    "CalibrationBatches",
    "available_cpus",
    "calibration_subset",
    "fraction_subset",
    "make_loader",
    "seeded_indices",
    "start_epoch",
]

log = logging.getLogger(__name__)


def seeded_indices(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` drawn by a generator seeded with ``seed``, sorted (file order)."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def fraction_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A seeded random ``fraction`` of ``dataset`` (all of it when 1.0)."""
    if fraction >= 1.0:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    return Subset(dataset, seeded_indices(n, max(1, round(n * fraction)), seed))


def calibration_subset(dataset: Dataset, size: int, seed: int) -> Subset:
    """``size`` seeded samples of ``dataset`` (fewer if it is smaller), in file order."""
    n = len(dataset)  # type: ignore[arg-type]
    return Subset(dataset, seeded_indices(n, min(size, n), seed))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


_CLAMPED: set[tuple[int, int]] = set()


def _workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most one per available CPU (more only compete for them).

    torch warns about more workers than CPUs on every loader; this says it
    once, at INFO, and uses as many workers as there are CPUs.
    """
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _CLAMPED:
        _CLAMPED.add((requested, cpus))
        log.info("data.num_workers=%d but only %d CPUs are available: using %d DataLoader workers",
                 requested, cpus, cpus)
    return cpus


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A DataLoader whose order and augmentation follow ``seed`` (and the epoch; call ``sampler.set_epoch``).

    A shuffled (training) loader is sharded over the ranks and seeded per
    epoch and sample, and drops the last partial batch when there is at least
    one full batch: a trailing batch of one breaks BatchNorm in training mode,
    and odd-sized channels-last batches crashed torch 2.13's CPU conv
    backward. ``shard=True`` gives an unshuffled loader this rank's disjoint
    share (evaluation under torchrun, whose counts are then summed).
    ``num_workers`` is capped at the CPUs this process may use
    (:func:`available_cpus`); the order and augmentation do not depend on it.
    """
    num_workers = _workers(num_workers)
    sampler = None
    if shuffle:
        sampler = ShardSampler(len(dataset), shuffle=True, seed=seed, even=True, with_epoch=True)  # type: ignore[arg-type]
        dataset = EpochSeeded(dataset, seed)
    elif shard:
        sampler = ShardSampler(len(dataset), shuffle=False, even=False)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=shuffle and len(sampler) > batch_size,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


def start_epoch(loader: Any, epoch: int, skip_batches: int = 0) -> Iterable:
    """The loader positioned at batch ``skip_batches`` of ``epoch`` (seeded samplers skip without loading)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        if skip_batches and getattr(loader, "batch_size", None):
            sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
            return loader
        sampler.set_epoch(epoch)
    return itertools.islice(loader, skip_batches, None) if skip_batches else loader


def _len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


class CalibrationBatches:
    """Re-iterable input batches for calibration, with a progress bar.

    Yields only the input tensors of ``(inputs, targets)`` batches (the engine
    accepts either) and skips ``None`` batches (every image skipped as corrupt).
    """

    def __init__(self, loader: Iterable[Any], desc: str = "calibrate") -> None:
        self.loader = loader
        self.desc = desc

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in progress(self.loader, self.desc, total=_len(self.loader)):
            if batch is not None:
                yield batch[0]
