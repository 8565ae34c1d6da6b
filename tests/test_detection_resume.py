"""Detection training that loses nothing: checkpoints resume to the exact result, and torchrun-style
data-parallel QAT keeps every rank's weights and quantizers identical.

The tiny detector trains on a tiny generated shapes set through the task's own loader (seeded per
epoch and sample); the interruption is a training loader that fails part-way through an epoch, as
in test_resume.py. The data-parallel test starts two real CPU processes joined by gloo.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_resume import _Outage, _PowerCut

from quantbench.engine import ModelQuantizer, capture, presets
from quantbench.harness.run import build_task
from quantbench.training import distributed
from tasks.detection.adapter import DetectionTask
from tasks.detection.model import build_detector

# 16 images / 4: 4 steps per epoch. keep_best=none: the returned weights are the last ones (the EMA's in
# float), so the comparison sees every step; a tiny detector's mAP is too flat to pick a best epoch.
# Each recipe is the conf/ one (train.qat, train.baseline of conf/train/shapes.yaml) with these on top.
QAT = {"epochs": 2, "batch_size": 4, "lr": 1e-4, "quant_lr": 1e-3, "freeze_observers_after": 1.0,
       "freeze_bn_after": 1.5, "checkpoint_steps": 3, "keep_best": "none"}
FLOAT = {"steps": None, "epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0.5, "ema": True,
         "ema_tau": 4.0, "eval_every": 1, "checkpoint_steps": 3, "keep_best": "none"}


@pytest.fixture
def task(shapes_tiny_overrides, task_factory) -> DetectionTask:
    """The tiny detector on conftest's tiny shapes set, built as a run builds it."""
    return task_factory(*shapes_tiny_overrides)


def _float_model(task: DetectionTask) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector("yolo_nas_test", len(task.class_names))


def _qmodel(task: DetectionTask) -> torch.nn.Module:
    model = _float_model(task).eval().reparameterize()
    return ModelQuantizer(presets.get("qat_pow2")).quantize_model(capture(model, task.example_inputs()),
                                                                  task.calib_loader())


def _computed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert differ == [], f"weights / quantizer state differ: {differ[:5]}"


# The loop is the classification task's too (test_resume.py resumes its QAT in the fast tier); here the
# fast tier resumes the detector's float training with its EMA, the QAT variant is slow.
@pytest.mark.parametrize("qat", [pytest.param(True, id="qat_pow2", marks=pytest.mark.slow),
                                 pytest.param(False, id="float_ema")])
def test_interrupted_detection_training_resumes_to_the_uninterrupted_result(task, tmp_path, qat, monkeypatch,
                                                                            caplog):
    if qat:
        quantized = _qmodel(task)  # captured and calibrated once; every run trains its own copy
        build, recipe = (lambda task: copy.deepcopy(quantized)), QAT
    else:
        build, recipe = _float_model, FLOAT
    straight = task.train(build(task), {**recipe, "resume_dir": str(tmp_path / "a")}, qat=qat)

    resume_dir = tmp_path / "b"
    loader = task.train_loader
    with monkeypatch.context() as m, pytest.raises(_Outage):  # cut in step 7 of 8: last checkpoint at step 6
        m.setattr(task, "train_loader", lambda cfg=None: _PowerCut(loader(cfg), after=6))
        task.train(build(task), {**recipe, "resume_dir": str(resume_dir)}, qat=qat)
    saved = torch.load(resume_dir / "last.pt", weights_only=True)["extra"]
    assert saved["partial"]["steps"] == 2 and len(saved["history"]) == 1
    assert (saved["ema"] is not None) == (not qat)

    with caplog.at_level(logging.INFO):
        resumed = task.train(build(task), {**recipe, "resume_dir": str(resume_dir)}, qat=qat)
    assert "resuming from" in caplog.text and "at step 6" in caplog.text
    assert "val_map50_95" in resumed.history[-1]
    assert _computed(resumed.history) == _computed(straight.history)
    assert resumed.best_metric == straight.best_metric
    _assert_same(straight.model, resumed.model)


def test_foreign_or_corrupt_checkpoint_is_ignored_and_training_starts_over(task, tmp_path, caplog):
    recipe = {"steps": 2, "batch_size": 4, "ema": False, "resume_dir": str(tmp_path / "r")}
    task.train(_float_model(task), {**recipe, "lr": 1e-2}, qat=False)  # leaves another recipe's checkpoint
    with caplog.at_level(logging.INFO):
        first = task.train(_float_model(task), recipe, qat=False)
    assert "written for another run" in caplog.text and "resuming from" not in caplog.text

    (tmp_path / "r" / "last.pt").write_bytes(b"\x00garbage")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = task.train(_float_model(task), recipe, qat=False)
    assert "unusable" in caplog.text and "resuming from" not in caplog.text
    assert _computed(again.history) == _computed(first.history)
    _assert_same(first.model, again.model)
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 2, "rebuilt"


def test_float_baseline_is_cached_and_its_resume_dir_removed(shapes_tiny_overrides, task_factory, tmp_path):
    own = (*shapes_tiny_overrides, f"task.cache_dir={tmp_path / 'cache'}", "train.baseline.steps=2",
           "train.baseline.batch_size=4", "train.baseline.ema=false")
    task = task_factory(*own)
    trained = task.build_model()
    entries = sorted(p.name for p in (tmp_path / "cache" / "baselines").iterdir())
    assert [e for e in entries if e.endswith(".pt")] and not [e for e in entries if e.endswith(".resume")], entries
    assert not {"checkpoint_dir", "resume_dir", "checkpoint_steps"} & set(task.baseline_key()["train"])
    again = task_factory(*own, "train.baseline.checkpoint_steps=1").build_model()
    _assert_same(trained, again)  # a cache hit: where checkpoints go is not part of the key


def _rank_main(rank: int, world: int, port: int, tree: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    task = build_task(tree)  # joins the gloo group that the environment describes
    # BatchNorm statistics move until the end: the ranks agree only if rank 0's are kept everywhere
    recipe = {**QAT, "freeze_bn_after": None, "checkpoint_steps": 1, "resume_dir": str(Path(out) / "resume")}
    result = task.train(_qmodel(task), recipe, qat=True)  # 16 images / 2 ranks / 4: 2 steps per epoch
    torch.save({"state": result.model.state_dict(), "quant": distributed.quantizer_state(result.model),
                "history": _computed(result.history), "world": distributed.current().world_size},
               Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.slow  # two spawned ranks; the fast tier's data-parallel check is test_distributed.py
def test_data_parallel_detection_qat_keeps_ranks_identical(shapes_tiny_overrides, compose_tree, free_port,
                                                           tmp_path):
    tree = compose_tree(*shapes_tiny_overrides, f"task.cache_dir={tmp_path / 'cache'}")  # what each rank builds
    mp.start_processes(_rank_main, args=(2, free_port(), tree, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["quant"].numel() > 10 and torch.equal(r0["quant"], r1["quant"]), "quantizers agree"
    assert r0["state"].keys() == r1["state"].keys()
    assert [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])] == []
    assert r0["history"] == r1["history"] and [h["step"] for h in r0["history"]] == [2, 4]
    assert all(h["ddp_quantizer_spread"] == 0.0 for h in r0["history"])
    assert torch.load(tmp_path / "resume" / "last.pt", weights_only=True)["step"] == 4, "rank 0 checkpointed"
