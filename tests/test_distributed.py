"""Data-parallel helpers: sharded seeded sampling, and fake-quant observers that agree across ranks.

The process-group tests start two real CPU processes joined by gloo (``torch.multiprocessing``,
the same collectives torchrun uses); the end-to-end torchrun run is in test_cluster.py (slow).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from quantbench.training.distributed import (
    EpochSeeded,
    ShardSampler,
    all_reduce_sum,
    current,
    max_spread,
    quantizer_spread,
    quantizer_state,
    sync_quantizers,
    wrap_ddp,
)


def test_shards_cover_the_epoch_once_and_evenly():
    shards = [list(ShardSampler(103, shuffle=True, seed=3, rank=r, world_size=4)) for r in range(4)]
    assert {len(s) for s in shards} == {103 // 4}, "training shares are equal: DDP needs the same step count"
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == 100
    evals = [list(ShardSampler(103, shuffle=False, even=False, rank=r, world_size=4)) for r in range(4)]
    assert sorted(i for s in evals for i in s) == list(range(103)), "evaluation drops and repeats nothing"


def test_epoch_order_is_fixed_by_seed_and_epoch_and_resumable():
    sampler = ShardSampler(50, shuffle=True, seed=1, rank=0, world_size=1)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) != epoch2
    sampler.set_epoch(2, skip=20)
    assert list(sampler) == epoch2[20:] and len(sampler) == 30
    again = ShardSampler(50, shuffle=True, seed=1, rank=0, world_size=1)
    again.set_epoch(2)
    assert list(again) == epoch2
    one_process = ShardSampler(50, shuffle=True, seed=1, rank=0, world_size=1)
    one_process.set_epoch(2)
    halves = [ShardSampler(50, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.set_epoch(2)
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(one_process), "ranks split one permutation"


class _Noise(Dataset):
    """A sample is a random draw: what an augmentation is."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_epoch_seeded_augmentation_does_not_depend_on_who_loads_or_when():
    data = EpochSeeded(_Noise(), seed=7)
    first = data[(5, 1)]
    torch.rand(100)  # whatever else drew from the global generator in between
    assert torch.equal(data[(5, 1)], first)
    assert not torch.equal(data[(5, 2)], first) and not torch.equal(data[(6, 1)], first)
    state = torch.get_rng_state()
    data[(3, 0)]
    assert torch.equal(torch.get_rng_state(), state), "the global generator (dropout) is left alone"
    sampler = ShardSampler(16, shuffle=True, seed=7, with_epoch=True, rank=0, world_size=1)
    sampler.set_epoch(1)
    loaded = torch.cat(list(DataLoader(data, batch_size=4, sampler=sampler, num_workers=2)))
    expected = torch.stack([data[key] for key in sampler])
    assert torch.equal(loaded, expected), "worker processes draw the same augmentations"


def test_single_process_helpers_are_no_ops():
    assert current().world_size == 1 and current().is_main
    assert all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert max_spread(torch.ones(3)) == 0.0
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model) is model


def _fake_quant_model():
    from quantbench.engine import ModelQuantizer, capture, presets, qat
    from tasks.classification.models import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", 10, width=4).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = ModelQuantizer(presets.get("qat_pow2")).quantize_model(capture(model, (x,)), [x])
    qat.train_mode(qmodel)
    return qmodel


def _train(sync: bool, rank: int) -> dict:
    qmodel = _fake_quant_model()
    net = wrap_ddp(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    for step in range(3):  # every rank sees its own data, with its own range
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(100 * rank + step)) * (1 + rank)
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if sync:
            sync_quantizers(qmodel)
    return {"state": quantizer_state(qmodel), "spread": quantizer_spread(qmodel)}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {"synced": _train(True, rank), "unsynced": _train(False, rank)}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # 5-8 s: two gloo processes (the torchrun tests of the slow tier run DDP end to end too)
def test_static_qat_observers_agree_across_ranks_only_when_synced(tmp_path, free_port):
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    synced, unsynced = (r0["synced"], r1["synced"]), (r0["unsynced"], r1["unsynced"])
    assert synced[0]["state"].numel() > 10
    assert torch.equal(synced[0]["state"], synced[1]["state"]), "synced ranks end with identical scales"
    assert synced[0]["spread"] == synced[1]["spread"] == 0.0
    assert not torch.equal(unsynced[0]["state"], unsynced[1]["state"]), "the test can tell: unsynced ranks differ"
    assert unsynced[0]["spread"] == unsynced[1]["spread"] > 0.0
