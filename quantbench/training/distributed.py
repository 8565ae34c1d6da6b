"""Data-parallel training helpers shared by every task: torchrun env, DDP, sharded data, reductions.

A task's training loop stays the same code whether it runs as one process or
under ``torchrun --nproc_per_node=N``; these helpers are no-ops in a single
process::

    env = init_from_env(device)             # reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA
    sampler = ShardSampler(len(ds), shuffle=True, seed=0)   # this rank's share, a fixed order per epoch
    net = wrap_ddp(model, device)            # DistributedDataParallel when world_size > 1
    ...                                      # forward/backward through net, optimizer step
    sync_quantizers(model)                   # fake-quant models: observer ranges agree across ranks
    top1 = 100 * all_reduce_sum([correct, seen])...   # metrics over every rank's shard
    if is_main(): save(...)                  # only rank 0 logs and writes files

Why a sampler of our own rather than ``DistributedSampler``: it gives every
epoch a fixed order from ``(seed, epoch)`` whatever the world size, can start
an epoch part-way (resuming a checkpoint taken mid-epoch), and can tag each
index with its epoch so :class:`EpochSeeded` draws a sample's augmentation
from ``(seed, epoch, index)``. Augmentation then no longer depends on which
process or DataLoader worker loads a sample, or on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from quantbench.engine.qat import quantizer_state, sync_quantizers

__all__ = [
    "DistEnv",
    "EpochSeeded",
    "ShardSampler",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "current",
    "init_from_env",
    "is_main",
    "main_process_first",
    "main_rank_result",
    "max_spread",
    "quantizer_spread",
    "quantizer_state",
    "rank_zero_only",
    "shutdown",
    "sync_quantizers",
    "wrap_ddp",
]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a data-parallel job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistEnv:
    """The process group this process is in (``DistEnv()`` when none)."""
    if not _initialized():
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   dist.get_backend())


def _wants_cuda(device: str | torch.device | None) -> bool:
    if device in (None, "", "auto"):
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init_from_env(device: str | torch.device | None = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group that torchrun describes in the environment; a no-op without one.

    The backend follows the device: nccl for CUDA (each process on GPU
    ``LOCAL_RANK``), gloo on CPU. Idempotent: a second call returns the group
    already joined.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _initialized():
        return current()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if _wants_cuda(device):
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    env = current()
    log.info("joined a %s process group: rank %d of %d", backend, env.rank, env.world_size)
    return env


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); a no-op without one."""
    if _initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, and in a single process: the one that logs and writes files."""
    return current().is_main


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on rank 0 only; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main() else None

    return wrapper  # type: ignore[return-value]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if current().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (writes a data set, a cache entry), the other ranks after it."""
    env = current()
    if env.distributed and not env.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if env.distributed and env.is_main:
            dist.barrier()


def _comm_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    if current().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks (float64); the values themselves in a single process."""
    if not current().distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable value)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def main_rank_result(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 and broadcast to every rank (``fn()`` itself in a single process).

    For work that rank 0 alone can do, such as a COCO evaluation whose
    pycocotools state is not shardable, while every rank must act on its
    result (keep the same best checkpoint).
    """
    return broadcast_object(fn() if is_main() else None)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank, one collective per dtype; a no-op in a single process.

    Why: DDP broadcasts rank 0's buffers before each forward, but the forward
    then updates BatchNorm statistics from the rank's own batch, so between
    steps the ranks' buffers differ. The EMA, evaluation and checkpoints must
    see one model.
    """
    if not current().distributed:
        return
    buffers = list(model.buffers())
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        wire = flat.to(torch.uint8) if dtype == torch.bool else flat  # gloo has no bool
        dist.broadcast(wire, src=0)
        for b, chunk in zip(group, wire.to(dtype).split([b.numel() for b in group])):
            b.data.copy_(chunk.view_as(b))


def max_spread(t: torch.Tensor) -> float:
    """The largest element-wise difference between any rank's ``t`` and rank 0's (0.0 alone).

    Equal infinities count as equal, so an observer that has not seen data
    yet (``min = +inf``) on every rank does not read as a disagreement.
    """
    if not current().distributed:
        return 0.0
    local = t.detach().to(_comm_device(), torch.float64).reshape(-1)
    gathered = [torch.empty_like(local) for _ in range(current().world_size)]
    dist.all_gather(gathered, local)
    ref = gathered[0]
    spread = 0.0
    for other in gathered[1:]:
        diff = torch.where(other == ref, torch.zeros_like(ref), (other - ref).abs())
        spread = max(spread, float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0)
    return spread


def quantizer_spread(model: nn.Module) -> float:
    """How far the ranks' quantizer state (scales, zero points, observer ranges, LSQ/TQT) is apart."""
    return max_spread(quantizer_state(model))


def wrap_ddp(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` in a process group; ``model`` itself otherwise.

    DDP broadcasts rank 0's parameters and buffers when it wraps, averages
    gradients in backward, and broadcasts rank 0's buffers (BatchNorm running
    statistics) before every forward. Train through the wrapper, but switch
    modes, freeze, save and evaluate on ``model``.
    """
    if not current().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _mix(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (seed, epoch, index), far apart for neighbouring values (splitmix64 step)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) & (2**63 - 1)


class ShardSampler(Sampler):
    """This rank's share of ``range(size)``, in an order fixed by ``(seed, epoch)``.

    Args:
        size: Length of the data set.
        shuffle: A seeded permutation per epoch (training), else file order.
        seed: Seed of the permutations.
        even: Every rank gets ``size // world_size`` samples (the tail is
            dropped), so ranks run the same number of steps, as DDP needs.
            ``False`` (evaluation): rank r takes ``r, r + W, ...``, nothing
            dropped or repeated, so reduced counts are exact.
        with_epoch: Yield ``(index, epoch)`` for :class:`EpochSeeded`.
        rank, world_size: Default to the current process group.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, even: bool = True, with_epoch: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        env = current()
        self.size, self.shuffle, self.seed, self.even, self.with_epoch = size, shuffle, seed, even, with_epoch
        self.rank = env.rank if rank is None else rank
        self.world_size = env.world_size if world_size is None else world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use the order of ``epoch``, leaving out this rank's first ``skip`` samples (a resumed epoch)."""
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.even:
            order = order[: self.size // self.world_size * self.world_size]
        return order[self.rank::self.world_size][self.skip:]

    def __iter__(self) -> Iterator[Any]:
        for index in self._indices():
            yield (index, self.epoch) if self.with_epoch else index

    def __len__(self) -> int:
        share = self.size // self.world_size if self.even else len(range(self.rank, self.size, self.world_size))
        return max(0, share - self.skip)


class EpochSeeded(Dataset):
    """Draws each sample's random augmentation from ``(seed, epoch, index)``.

    Takes the ``(index, epoch)`` keys of ``ShardSampler(with_epoch=True)``.
    The global torch generator is forked around each sample, so the model's own
    randomness (dropout) is untouched and a resumed run sees the same
    augmentations as an uninterrupted one, whatever process loads the sample.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index + 1))
            return self.dataset[index]
