"""Nothing lost: training checkpoints resume to the exact result, runs are deterministic on CPU.

Real QAT of a tiny model on a slice of the real digits data; the interruption is a
training loader that fails part-way through an epoch (a power cut as the loop sees it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from quantbench.cli import main
from quantbench.engine import ModelQuantizer, capture, presets
from quantbench.harness.checkpoint import TrainingCheckpoint
from quantbench.harness.config import compose_config
from quantbench.harness.run import run
from quantbench.harness.tracking import Store
from tasks.classification import ClassificationTask, build_model, recipes
from tasks.classification.config import QatConfig, coerce


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


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "digits"
    assert main(["data", "digits", "--out", str(root), "--size", "16"]) == 0
    return root


def _task(root: Path, cache: Path) -> ClassificationTask:
    data = {"root": str(root), "image_size": 16, "resize_size": 16, "train_fraction": 0.1, "val_fraction": 0.2,
            "calib_size": 32}
    return ClassificationTask(name="digits", data=data, model={"name": "test_resnet"},
                              train={"epochs": 0}, cache_dir=cache, device="cpu")


def _qmodel(task: ClassificationTask, preset: str):
    torch.manual_seed(0)
    model = build_model("test_resnet", 10).eval()
    return ModelQuantizer(presets.get(preset)).quantize_model(capture(model, task.example_inputs()),
                                                              task.calib_loader())


def _train(task, qmodel, recipe: dict, loader=None):
    cfg = coerce(QatConfig, recipe, task.qat_config)
    return recipes.train_qat(qmodel, loader or task.train_loader(cfg), task.val_loader(), cfg, task.device)


@pytest.mark.parametrize("preset", ["qat_pow2", "qat_lsq"])
def test_interrupted_qat_resumes_to_the_uninterrupted_result(digits_root, tmp_path, preset, caplog):
    task = _task(digits_root, tmp_path / "cache")
    recipe = {"epochs": 2, "batch_size": 32, "freeze_observers_after": 1.0, "freeze_bn_after": 1.5,
              "checkpoint_steps": 3, "lr": 1e-3, "quant_lr": 1e-3}  # 144 images / 32: 4 steps per epoch
    straight = _train(task, _qmodel(task, preset), {**recipe, "resume_dir": str(tmp_path / "a")})

    resume_dir = str(tmp_path / "b")
    cfg = coerce(QatConfig, {**recipe, "resume_dir": resume_dir}, task.qat_config)
    with pytest.raises(_Outage):  # cut during step 7 of 8: the last checkpoint is step 6, mid-epoch 2
        _train(task, _qmodel(task, preset), {**recipe, "resume_dir": resume_dir},
               loader=_PowerCut(task.train_loader(cfg), after=6))
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


def test_loading_a_quantizer_state_keeps_its_parameters(digits_root, tmp_path):
    """An optimizer built before ``load_state_dict`` (a resumed run) must still own the model's LSQ steps."""
    task = _task(digits_root, tmp_path / "cache")
    qmodel = _qmodel(task, "qat_lsq")
    before = {name: p for name, p in qmodel.named_parameters()}
    state = {k: v.clone() + (0.5 if k.endswith(".scale") else 0.0) for k, v in qmodel.state_dict().items()}
    qmodel.load_state_dict(state)
    after = dict(qmodel.named_parameters())
    scales = [n for n in after if n.endswith(".scale")]
    assert scales and all(after[n] is before[n] for n in after), "parameters were replaced on load"
    assert all(torch.equal(after[n].detach(), state[n]) for n in scales)


def test_checkpoint_is_atomic_safe_and_rejects_foreign_or_corrupt_files(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    ckpt = TrainingCheckpoint(tmp_path / "run", model, optimizer, fingerprint={"lr": 0.1})
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt.save(5, history=[{"val_top1": 50.0}])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"], "no temporary file left behind"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    state = TrainingCheckpoint(tmp_path / "run", model, optimizer, fingerprint={"lr": 0.1}).load()
    assert state == {"step": 5, "history": [{"val_top1": 50.0}]}
    assert torch.equal(model.weight, weights["weight"]) and optimizer.state_dict()["state"][0]["step"] == 1

    other = TrainingCheckpoint(tmp_path / "run", model, optimizer, fingerprint={"lr": 0.2})
    with caplog.at_level(logging.WARNING):
        assert other.load() is None
    assert "written for another run" in caplog.text and not other.path.exists()

    ckpt.save(5)
    ckpt.path.write_bytes(ckpt.path.read_bytes()[:100])  # truncated: a disk that filled up, say
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ckpt.load() is None
    assert "unusable" in caplog.text and str(ckpt.path) in caplog.text and not ckpt.path.exists()

    class Code:  # a pickle that would run code on load is refused by weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "payload": Code()}, ckpt.path)
    assert ckpt.load() is None and not ckpt.path.exists()


def test_corrupt_qat_checkpoint_is_detected_and_rebuilt(digits_root, tmp_path, caplog):
    task = _task(digits_root, tmp_path / "cache")
    recipe = {"steps": 3, "batch_size": 32, "resume_dir": str(tmp_path / "r")}
    first = _train(task, _qmodel(task, "qat_lsq"), recipe)
    (tmp_path / "r" / "last.pt").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        again = _train(task, _qmodel(task, "qat_lsq"), recipe)
    assert "unusable" in caplog.text
    assert [h["val_top1"] for h in again.history] == [h["val_top1"] for h in first.history]
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"] == 3, "rebuilt"


def test_same_config_and_seed_give_identical_metrics(digits_root, tmp_path, tracking_overrides, monkeypatch):
    monkeypatch.setenv("CI", "true")
    overrides = [*tracking_overrides, "model=test_resnet", "scheme=qat_lsq", f"data.root={digits_root}",
                 "data.generate=null", "data.image_size=16", "data.resize_size=16", "data.val_fraction=0.15",
                 "data.calib_size=32", "data.calib_batch_size=16", f"task.cache_dir={tmp_path}/cache",
                 "task.device=cpu", "train.baseline.steps=6", "train.qat.steps=3", "scheme.calib_batches=1",
                 "run.latency_iters=1", "run.latency_batch=2", "run.fp32_onnx_cache=null", "run.force=true",
                 f"run.resume_root={tmp_path}/resume"]
    first = run(compose_config(overrides))
    second = run(compose_config(overrides))
    assert first.status == second.status == "FINISHED", (first.error, second.error)
    assert first.run_id != second.run_id, "run.force=true computed it twice"

    def computed(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.startswith(("time/", "latency/", "qat/seconds"))}

    assert {"quant/top1", "onnx/top1", "quant/sqnr_db", "onnx/max_lsb_err"} <= set(computed(first.metrics))
    assert computed(first.metrics) == computed(second.metrics)
    store = Store.from_config(OmegaConf.to_container(compose_config(overrides).tracking, resolve=True))
    logged = [computed(store.client.get_run(r.run_id).data.metrics) for r in (first, second)]
    assert "qat/train_loss" in logged[0] and "qat/val_top1" in logged[0]
    assert logged[0] == logged[1], "everything logged, QAT curves included, is the same"
    assert not list((tmp_path / "resume").glob("*")), "a FINISHED run leaves no checkpoint behind"
    tree = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert tree["train"]["qat"]["resume_dir"] is None, "the harness picks the resume dir itself"
