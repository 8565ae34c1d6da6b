"""Nothing lost: training checkpoints resume to the exact result, runs are deterministic on CPU.

Real QAT of a tiny model on a slice of the real digits data; the interruption is a
training loader that fails part-way through an epoch (a power cut as the loop sees it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from harness_overrides import DEPLOY_FAST
from omegaconf import OmegaConf

from quantbench.engine import ModelQuantizer, capture, presets
from quantbench.harness.config import compose_config
from quantbench.harness.run import run
from quantbench.harness.tracking import Store, is_timed
from quantbench.training.checkpoint import TrainingCheckpoint
from tasks.classification import ClassificationTask, build_model


class _Outage(RuntimeError):
    pass


class _PowerCut:
    """The training loader, until it fails after ``after`` batches (the rest of it is the real loader)."""

    def __init__(self, loader, after: int) -> None:
        self.loader, self.left = loader, after

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            if self.left == 0:
                raise _Outage("power cut")
            self.left -= 1
            yield batch


@pytest.fixture
def task(digits_overrides, task_factory) -> ClassificationTask:
    """The digits run of conftest on a seeded slice (144 train, 72 val images); no float baseline needed."""
    return task_factory(*digits_overrides, "data.train_fraction=0.1", "data.val_fraction=0.2",
                        "data.calib_size=32")


def _qmodel(task: ClassificationTask, preset: str):
    torch.manual_seed(0)
    model = build_model("test_resnet", 10).eval()
    return ModelQuantizer(presets.get(preset)).quantize_model(capture(model, task.example_inputs()),
                                                              task.calib_loader())


def _train(task: ClassificationTask, qmodel, recipe: dict, cut_after: int | None = None):
    """QAT through the task's own loop; ``cut_after``: its training loader fails after that many batches."""
    if cut_after is None:
        return task.train(qmodel, recipe, qat=True)
    loader = task.train_loader
    task.train_loader = lambda cfg=None: _PowerCut(loader(cfg), after=cut_after)
    try:
        return task.train(qmodel, recipe, qat=True)
    finally:
        del task.train_loader


@pytest.mark.parametrize("preset", [pytest.param("qat_pow2", marks=pytest.mark.slow), "qat_lsq"])  # one in the fast tier
def test_interrupted_qat_resumes_to_the_uninterrupted_result(task, tmp_path, preset, caplog):
    recipe = {"epochs": 2, "steps": None, "batch_size": 32, "freeze_observers_after": 1.0, "freeze_bn_after": 1.5,
              "checkpoint_steps": 3, "lr": 1e-3, "quant_lr": 1e-3}  # 144 images / 32: 4 steps per epoch
    straight = _train(task, _qmodel(task, preset), {**recipe, "resume_dir": str(tmp_path / "a")})

    resume_dir = str(tmp_path / "b")
    with pytest.raises(_Outage):  # cut during step 7 of 8: the last checkpoint is step 6, mid-epoch 2
        _train(task, _qmodel(task, preset), {**recipe, "resume_dir": resume_dir}, cut_after=6)
    saved = torch.load(Path(resume_dir) / "last.pt", weights_only=True)
    assert saved["step"] == 6 and saved["extra"]["partial"]["steps"] == 2 and len(saved["extra"]["history"]) == 1

    with caplog.at_level(logging.INFO):
        resumed = _train(task, _qmodel(task, preset), {**recipe, "resume_dir": resume_dir})
    assert "resuming from" in caplog.text and "at step 6" in caplog.text
    keys = ("epoch", "step", "train_loss", "train_top1", "val_top1", "val_top5", "lr")
    assert [{k: h[k] for k in keys} for h in resumed.history] == [{k: h[k] for k in keys} for h in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"resumed weights / quantizer state differ: {differ[:5]}"


def test_loading_a_quantizer_state_keeps_its_parameters(task):
    """An optimizer built before ``load_state_dict`` (a resumed run) must still own the model's LSQ steps."""
    qmodel = _qmodel(task, "qat_lsq")
    before = {name: p for name, p in qmodel.named_parameters()}
    state = {k: v.clone() + (0.5 if k.endswith(".scale") else 0.0) for k, v in qmodel.state_dict().items()}
    qmodel.load_state_dict(state)
    after = dict(qmodel.named_parameters())
    scales = [n for n in after if n.endswith(".scale")]
    assert scales and all(after[n] is before[n] for n in after), "parameters were replaced on load"
    assert all(torch.equal(after[n].detach(), state[n]) for n in scales)


@pytest.fixture
def saved(tmp_path):
    """A model and optimizer one step in, checkpointed at step 5 by ``ckpt``."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    ckpt = TrainingCheckpoint(tmp_path / "run", model, optimizer, fingerprint={"lr": 0.1})
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt.save(5, history=[{"val_top1": 50.0}])
    return SimpleNamespace(model=model, optimizer=optimizer, ckpt=ckpt)


def test_checkpoint_is_written_atomically_and_restores_the_run(saved, tmp_path):
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"], "no temporary file left behind"
    weights = {k: v.clone() for k, v in saved.model.state_dict().items()}
    with torch.no_grad():
        saved.model.weight.zero_()
    state = TrainingCheckpoint(tmp_path / "run", saved.model, saved.optimizer, fingerprint={"lr": 0.1}).load()
    assert state == {"step": 5, "history": [{"val_top1": 50.0}]}
    assert torch.equal(saved.model.weight, weights["weight"]) and saved.optimizer.state_dict()["state"][0]["step"] == 1


def test_checkpoint_of_another_run_is_ignored_and_removed(saved, tmp_path, caplog):
    other = TrainingCheckpoint(tmp_path / "run", saved.model, saved.optimizer, fingerprint={"lr": 0.2})
    with caplog.at_level(logging.WARNING):
        assert other.load() is None
    assert "written for another run" in caplog.text and not other.path.exists()


def test_truncated_or_code_carrying_checkpoint_is_refused(saved, caplog):
    ckpt = saved.ckpt
    ckpt.path.write_bytes(ckpt.path.read_bytes()[:100])  # truncated: a disk that filled up, say
    with caplog.at_level(logging.WARNING):
        assert ckpt.load() is None
    assert "unusable" in caplog.text and str(ckpt.path) in caplog.text and not ckpt.path.exists()

    class Code:  # a pickle that would run code on load is refused by weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "payload": Code()}, ckpt.path)
    assert ckpt.load() is None and not ckpt.path.exists()


def test_corrupt_qat_checkpoint_is_detected_and_rebuilt(task, tmp_path, caplog):
    recipe = {"steps": 3, "batch_size": 32, "resume_dir": str(tmp_path / "r")}
    first = _train(task, _qmodel(task, "qat_lsq"), recipe)
    (tmp_path / "r" / "last.pt").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        again = _train(task, _qmodel(task, "qat_lsq"), recipe)
    assert "unusable" in caplog.text
    assert [h["val_top1"] for h in again.history] == [h["val_top1"] for h in first.history]
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 3, "rebuilt"


@pytest.mark.slow  # 8 s: two full runs
def test_same_config_and_seed_give_identical_metrics(digits_overrides, run_overrides, tmp_path):
    overrides = [*digits_overrides, *run_overrides, "scheme=qat_lsq", "data.val_fraction=0.15",
                 "data.calib_size=32", "data.calib_batch_size=16", "train.qat.steps=3", "scheme.calib_batches=1",
                 "run.latency_iters=1", *DEPLOY_FAST, "run.latency_batch=2", "run.force=true"]
    first = run(compose_config(overrides))
    second = run(compose_config(overrides))
    assert first.status == second.status == "FINISHED", (first.error, second.error)
    assert first.run_id != second.run_id, "run.force=true computed it twice"

    def computed(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not is_timed(k)}

    assert {"quant/top1", "onnx/top1", "quant/sqnr_db", "onnx/max_lsb_err"} <= set(computed(first.metrics))
    assert "time/qat_s" in first.metrics, "a QAT scheme runs end to end through the harness"
    assert computed(first.metrics) == computed(second.metrics)
    store = Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))
    logged = [computed(store.client.get_run(r.run_id).data.metrics) for r in (first, second)]
    assert "qat/train_loss" in logged[0] and "qat/val_top1" in logged[0]
    curve = store.client.get_metric_history(first.run_id, "qat/val_top1")
    assert [m.step for m in curve] == [1], "the QAT curve is logged per epoch (3 steps: one epoch)"
    assert logged[0] == logged[1], "everything logged, QAT curves included, is the same"
    assert not list((tmp_path / "resume").glob("*")), "a FINISHED run leaves no checkpoint behind"
    tree = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert tree["train"]["qat"]["resume_dir"] is None, "the harness picks the resume dir itself"
