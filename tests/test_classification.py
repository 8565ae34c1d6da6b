"""Classification adapter: ImageFolder data, model registry, metrics, training, baseline cache.

Everything runs offline on the session's 16x16 digits tree and on tiny models. Tasks are built
as a run builds them (conftest ``make_task``: the config composed from conf/ with the test's
overrides on top); the slow test at the end trains the real ResNet-18/MobileNet-V2 digits
baselines with the conf/ recipe and checks the >= 97 % top-1 target.
"""

from __future__ import annotations

import logging
import os
import re
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from quantbench.cli import main
from quantbench.errors import (
    BadInputError,
    ConfigError,
    DataError,
    DataNotFoundError,
    DeviceUnavailableError,
    WeightsNotFoundError,
)
from quantbench.registry import UnknownNameError
from quantbench.training import LoopConfig, ModelConfig, QatConfig, qat_schedule
from quantbench.training import optim as optim_mod
from quantbench.training.cache import BaselineCache
from tasks.classification import (
    ClassificationTask,
    DataConfig,
    build_model,
    evaluate,
    list_models,
    topk_correct,
    write_digits_imagefolder,
)
from tasks.classification import adapter as adapter_mod
from tasks.classification import models as models_mod

#: A seeded tenth of train (144 images) and a fifth of val: seconds per training test.
SLICE = ("data.train_fraction=0.1", "data.val_fraction=0.2")


@pytest.fixture
def digits_task(digits_overrides, task_factory):
    """``(*overrides) -> ClassificationTask``, built as a run builds it: conftest's digits run + ``overrides``."""
    return lambda *extra: task_factory(*digits_overrides, *extra)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message.strip(), message
    return message


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def test_digits_tree_is_seeded_stratified_imagefolder(digits16_root):
    files = _files(digits16_root)
    train = [f for f in files if f.startswith("train/")]
    assert (len(train), len(files) - len(train)) == (1437, 360)
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits16_root / split).iterdir()) == [str(i) for i in range(10)]
    with Image.open(digits16_root / files[0]) as img:
        assert (img.size, img.mode) == ((16, 16), "RGB")


def test_the_task_writes_the_same_tree_on_first_use(digits16_root, digits_task, tmp_path):
    """The ``make sweep`` path: ``data.generate=digits`` and a missing root write the tree at the task's size."""
    root = tmp_path / "digits"
    task = digits_task(f"data.root={root}", "data.generate=digits", "data.image_size=8", "data.resize_size=8")
    assert not root.exists(), "constructing a task opens no data"
    assert task.classes == [str(i) for i in range(10)]
    assert _files(root) == _files(digits16_root), "the same seeded split, whatever the size"
    with Image.open(next(root.rglob("*.png"))) as img:
        assert img.size == (8, 8)
    with pytest.raises(FileExistsError):
        write_digits_imagefolder(root)


def test_cli_writes_the_digits_tree(digits16_root, tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "digits", "--out", str(out), "--size", "8"]) == 0
    assert _files(out) == _files(digits16_root)
    assert main(["data", "digits", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


LOADERS = ("data.train_fraction=0.1", "data.val_fraction=0.25", "data.calib_size=20", "data.calib_batch_size=8",
           "train.baseline.batch_size=32")


def test_loaders_fractions_and_calibration_batches(digits_task):
    task = digits_task(*LOADERS)
    assert (len(task._splits.train), len(task._splits.val)) == (144, 90)
    assert len(task.train_loader()) == 144 // 32, "training drops the last partial batch"
    calib = list(task.calib_loader())
    assert [len(b) for b in calib] == [8, 8, 4] and calib[0].shape[1:] == (3, 16, 16)
    assert list(task.calib_loader())[0].equal(calib[0]), "calib_loader must be re-iterable"
    (example,) = task.example_inputs()
    assert example.shape == (2, 3, 16, 16)


def test_subsets_and_order_follow_the_seed(digits_task):
    task, twin = digits_task(*LOADERS), digits_task(*LOADERS)
    calib = torch.cat(list(task.calib_loader()))
    assert torch.equal(torch.cat(list(twin.calib_loader())), calib)
    assert twin._splits.train.indices == task._splits.train.indices
    x1, y1 = next(iter(task.train_loader()))
    x2, y2 = next(iter(twin.train_loader()))
    assert torch.equal(y1, y2)
    other = digits_task(*LOADERS, "data.seed=1")
    assert not torch.equal(torch.cat(list(other.calib_loader())), calib)


def test_hydra_style_mappings_are_converted_and_checked(digits16_root):
    from omegaconf import OmegaConf

    data = OmegaConf.create({"root": str(digits16_root), "mean": [0.5, 0.5, 0.5], "image_size": 16,
                             "resize_size": 16})
    task = ClassificationTask(name="digits", data=data, model=OmegaConf.create({"name": "test_mobilenet"}),
                              device="cpu")
    assert task.data_config.mean == (0.5, 0.5, 0.5) and task.model_config.name == "test_mobilenet"
    with pytest.raises(ConfigError, match="'lrr'") as exc:
        ClassificationTask(name="digits", train={"lrr": 0.1})
    assert isinstance(exc.value, ValueError) and "lr" in _one_line(exc)
    for bad, key in ((dict(data={"val_fraction": 0.0}), "data.val_fraction"),
                     (dict(data={"image_size": 64, "resize_size": 32}), "data.image_size"),
                     (dict(data={"on_corrupt": "ignore"}), "data.on_corrupt"),
                     (dict(train={"batch_size": 0}), "train.baseline.batch_size"),
                     (dict(qat={"keep_best": "best"}), "keep_best")):
        with pytest.raises(ConfigError, match=re.escape(key)) as exc:
            ClassificationTask(name="digits", **bad)
        assert isinstance(exc.value, (ValueError, BadInputError)) and _one_line(exc)


def test_without_a_config_the_task_starts_from_neutral_defaults():
    """The recipes live in conf/ only (test_configs checks that a run's task gets exactly them)."""
    task = ClassificationTask(name="digits", device="cpu")
    assert (task.data_config, task.model_config) == (DataConfig(), ModelConfig())
    assert (task.train_config, task.qat_config) == (LoopConfig(), QatConfig())
    assert task.data_config.generate is None, "no digits preset hidden in code"


def test_unknown_names_are_config_errors_listing_close_matches(digits_task):
    task = digits_task("data.train_augment=pad_crap")
    with pytest.raises(UnknownNameError, match="did you mean pad_crop") as exc:
        task.load_data()
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, KeyError)
    assert "data.train_augment" in _one_line(exc)
    with pytest.raises(UnknownNameError, match="adamw"):
        digits_task(*SLICE).train(build_model("test_resnet", 10), {"steps": 1, "optimizer": "adamww"}, qat=False)


def test_missing_imagenet_is_one_line_data_not_found(tmp_path, monkeypatch, task_factory):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    for where in ((), (f"data.root={tmp_path / 'x'}",)):
        task = task_factory("task=imagenet", "task.device=cpu", *where)
        with pytest.raises(DataNotFoundError) as exc:
            task.build_model()
        message = _one_line(exc)
        assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, DataError)
        assert "data.root" in message and "IMAGENET_ROOT" in message and "TASK=digits" in message
    (tmp_path / "imnet" / "train" / "n01").mkdir(parents=True)
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imnet"))
    with pytest.raises(DataNotFoundError, match="val/"):
        task_factory("task=imagenet", "task.device=cpu").evaluate(lambda x: x)


def test_model_registry_names_sources_and_errors():
    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet18", "tv:mobilenet_v2", "timm:test_resnet", "test_resnet", "test_mobilenet"):
        model = build_model(name, num_classes=10)
        assert not model.training
        assert model(x).shape == (2, 10), name
    assert list_models("test_*") == ["test_mobilenet", "test_resnet"]
    assert "resnet18" in list_models("resnet*")
    with pytest.raises(KeyError, match="did you mean .*resnet18") as exc:
        build_model("resnt18", 10)
    assert isinstance(exc.value, UnknownNameError) and isinstance(exc.value, ConfigError)
    with pytest.raises(KeyError, match=r"model.name='resnet_nonexistent': not a torchvision or local model; "
                                       r"did you mean 'resnet101'") as exc:
        build_model("resnet_nonexistent", 10)  # one short line: close matches, never the whole list
    assert len(str(exc.value)) < 400 and "alexnet" not in str(exc.value)
    with pytest.raises(KeyError, match="timm"):
        build_model("foo:bar", 10)
    with pytest.raises(ValueError, match="already registered"):
        models_mod.MODELS.register(models_mod.test_resnet)


def test_local_checkpoint_loads_plain_and_wrapped_state_dicts(tmp_path):
    torch.manual_seed(1)
    source = build_model("test_resnet", 10)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    x = torch.randn(2, 3, 16, 16)
    for path in (plain, wrapped):
        torch.manual_seed(2)
        model = build_model("test_resnet", 10, pretrained=True, checkpoint=str(path))
        assert torch.equal(model(x), source(x))
    with pytest.raises(WeightsNotFoundError) as exc:
        build_model("test_resnet", 10, checkpoint=str(tmp_path / "missing.pt"))
    assert "missing.pt" in _one_line(exc)


def test_pretrained_offline_is_one_line_and_cache_is_used(tmp_path, monkeypatch):
    """No network: the download function is replaced by one that fails like a machine offline."""
    downloads = []

    def offline(url, *args, **kwargs):
        downloads.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsNotFoundError) as exc:
        build_model("resnet18", 10, pretrained=True)
    message = _one_line(exc)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "model.checkpoint=PATH" in message and cached.name in message and str(cached.parent) in message
    assert len(downloads) == 1

    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    reference = build_model("resnet18", 1000)
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", 10, pretrained=True)
    assert len(downloads) == 1, "a cached file must not be downloaded again"
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and model.fc.out_features == 10


def test_timm_pretrained_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as exc:
        build_model("timm:test_resnet", 10, pretrained=True)
    assert "timm:test_resnet" in _one_line(exc)


def test_topk_is_exact_and_clamped_to_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 1, 0]), (1, 2, 5)) == [1, 2, 3]


def test_same_metrics_for_torch_and_numpy_predict_functions(digits_task):
    """The float model, a GraphModule and an ORT session all go through ``evaluate``."""
    task = digits_task("data.val_fraction=0.3")
    torch.manual_seed(0)
    model = build_model("test_resnet", 10)
    from_torch = task.evaluate(model)
    ort_like = task.evaluate(lambda x: model(x).numpy().astype(np.float32))  # what an ORT session returns
    batch = torch.export.Dim("batch", min=2)
    graph = torch.export.export(model, task.example_inputs(), dynamic_shapes=({0: batch},)).module()
    assert from_torch == ort_like == task.evaluate(graph)
    assert set(from_torch) == {"top1", "top5"} and 0.0 <= from_torch["top1"] <= from_torch["top5"] <= 100.0
    ranked = torch.arange(10, 0, -1.0)  # class 0 first, class 9 last
    batches = [(torch.stack([ranked, ranked]), torch.tensor([0, 3])), (ranked[None], torch.tensor([9]))]
    assert evaluate(lambda x: x, batches) == {"top1": 100 / 3, "top5": 200 / 3}


def test_float_baseline_is_cached_by_config_and_rebuilt_when_corrupt(digits_task, tmp_path, monkeypatch, caplog):
    own = (f"task.cache_dir={tmp_path}", *SLICE, "train.baseline.steps=3")
    calls = []
    real_train_float = adapter_mod.train_float

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train_float(*args, **kwargs)

    monkeypatch.setattr(adapter_mod, "train_float", counting)
    first = digits_task(*own).build_model()
    files = sorted((tmp_path / "baselines").glob("*.pt"))
    assert len(calls) == 1 and len(files) == 1 and files[0].with_suffix(".json").is_file()
    assert not list((tmp_path / "baselines").glob("*.resume")), "the baseline's checkpoints are removed"

    second = digits_task(*own, "data.num_workers=0", "data.eval_batch_size=7", "data.calib_size=9").build_model()
    assert len(calls) == 1, "same config: the cached checkpoint must be loaded"
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    files[0].write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        digits_task(*own).build_model()
    assert len(calls) == 2 and "unusable" in caplog.text
    assert isinstance(torch.load(files[0], weights_only=True), dict)


def test_baseline_key_changes_with_what_changes_the_weights_only(digits_task, digits16_root, tmp_path):
    def path(*extra: str):
        task = digits_task(*SLICE, *extra)
        return BaselineCache(tmp_path, "digits", task.model_config.name, task.baseline_key()).path

    base = path()
    (tmp_path / "copy").symlink_to(digits16_root)
    for same in (f"data.root={tmp_path / 'copy'}", "data.num_workers=0", "data.eval_batch_size=7",
                 "data.calib_size=9", "data.calib_batch_size=3", "data.on_corrupt=skip",
                 f"train.baseline.resume_dir={tmp_path}", "train.baseline.checkpoint_steps=2", "task.device=cpu"):
        assert path(same) == base, f"{same} does not change the weights"
    for other in ("train.baseline.lr=1e-2", "train.baseline.steps=11", "train.baseline.seed=1",
                  "data.train_fraction=0.2", "data.val_fraction=0.3", "data.train_augment=affine", "model=test_mobilenet",
                  "data.pad=2"):
        assert path(other) != base, f"{other} must not reuse the baseline"


def test_float_training_by_steps_keeps_best_and_returns_eval_model(digits_task):
    task = digits_task(*SLICE)
    torch.manual_seed(0)
    result = task.train(build_model("test_resnet", 10), {"steps": 7, "batch_size": 32, "keep_best": "disk"},
                        qat=False)  # 144 images / 32: 4 steps per epoch
    assert [h["step"] for h in result.history] == [4, 7]
    assert result.best_metric == max(h["val_top1"] for h in result.history)
    assert not result.model.training and result.seconds > 0


class _FakeQatModel(nn.Module):
    """Stands in for the engine's fake-quant GraphModule: one learnable 'quantizer' scale."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("test_resnet", 10)
        self.scale = nn.Parameter(torch.ones(()))
        self.train_forwards = 0

    def forward(self, x):
        self.train_forwards += int(self.training)
        return self.net(x) * self.scale


def _fake_qat_api(events: list) -> types.SimpleNamespace:
    """The engine's QAT API as the training layer calls it, recording the freeze calls."""
    return types.SimpleNamespace(
        train_mode=lambda m: m.train(),
        eval_mode=lambda m: m.eval(),
        quantizer_parameters=lambda m: [m.scale],
        weight_parameters=lambda m: list(m.parameters()),
        set_observers_frozen=lambda m, frozen: events.append(("observers", frozen, m.train_forwards)),
        set_bn_frozen=lambda m, frozen: events.append(("bn", frozen, m.train_forwards)),
    )


def test_qat_loop_freezes_at_the_configured_steps(digits_task, monkeypatch):
    events: list = []
    api = _fake_qat_api(events)
    monkeypatch.setattr(qat_schedule, "qat_api", api)
    monkeypatch.setattr(optim_mod, "qat_api", api)
    task = digits_task(*SLICE)
    recipe = {"steps": 8, "batch_size": 32, "freeze_observers_after": 0.4, "freeze_bn_after": 1.0}
    result = task.train(_FakeQatModel(), recipe, qat=True)  # 144 images / 32 = 4 full batches per epoch
    # observers freeze before step round(0.4 * 4) = 2, BatchNorm before step 4; frozen stays frozen when
    # epoch 2 switches back to training after validation (the observers are frozen again at once)
    assert [e for e in events if e[0] == "observers"] == [("observers", True, 2), ("observers", True, 4)]
    assert [e for e in events if e[0] == "bn"] == [("bn", True, 4)]
    assert len(result.history) == 2 and not result.model.training


def test_qat_param_groups_have_their_own_lr_and_decay(monkeypatch):
    monkeypatch.setattr(optim_mod, "qat_api", _fake_qat_api([]))
    model = _FakeQatModel()
    cfg = QatConfig(optimizer="adam", scheduler="step", lr=1e-3, weight_decay=1e-4, quant_lr=1e-2, lr_decay=0.5,
                    lr_decay_steps=2, quant_lr_decay=0.1, quant_lr_decay_steps=1, quant_weight_decay=0.0)
    groups = optim_mod.qat_param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["weights", "quantizers"]
    assert groups[1]["params"] == [model.scale] and all(p is not model.scale for p in groups[0]["params"])
    optimizer, scheduler = optim_mod.make_optimizer(groups, cfg, steps_per_epoch=10)
    assert type(optimizer) is torch.optim.Adam
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([1e-3 * 0.5, 1e-2 * 0.01])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    split = optim_mod.qat_param_groups(model, QatConfig(decay_norm_and_bias=False, weight_decay=0.05))
    assert [(g["name"], g["weight_decay"]) for g in split] == [("weights", 0.05), ("weights_no_decay", 0.0),
                                                               ("quantizers", 0.0)]
    assert all(p.dim() <= 1 for p in split[1]["params"]) and all(p.dim() > 1 for p in split[0]["params"])


def test_qat_with_the_engine(digits_task):
    from quantbench.engine import ModelQuantizer, capture, presets, qat

    task = digits_task(*SLICE, "data.calib_size=32")
    torch.manual_seed(0)
    model = build_model("test_resnet", 10)
    qmodel = ModelQuantizer(presets.get("qat_lsq")).quantize_model(capture(model, task.example_inputs()),
                                                                    task.calib_loader())  # fmt: skip
    assert qat.quantizer_parameters(qmodel), "LSQ learns its steps"
    result = task.train(qmodel, {"steps": 3, "batch_size": 32, "freeze_observers_after": 0.5}, qat=True)
    assert result.model is qmodel and not qat.is_training(qmodel)
    assert [h["step"] for h in result.history] == [3]
    assert task.evaluate(qmodel)["top1"] == pytest.approx(result.best_metric)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_one_line():
    with pytest.raises(DeviceUnavailableError) as exc:
        ClassificationTask(device="cuda")
    assert isinstance(exc.value, BadInputError) and "task.device=cpu" in _one_line(exc)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~2 min each on two cores
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_digits_float_baselines_reach_97_percent(model, digits_root, task_factory, tmp_path):
    """Exactly what ``make sweep TASK=digits`` trains once and caches: the conf/ recipe, only the places
    overridden. ``QUANTBENCH_TEST_CACHE`` names a cache to share with the sweep (CI); default: tmp."""
    torch.set_num_threads(2)  # the sweep's run.threads
    cache = os.environ.get("QUANTBENCH_TEST_CACHE") or str(tmp_path / "cache")
    task = task_factory("task=digits", f"model={model}", f"data.root={digits_root}", f"task.cache_dir={cache}")
    task.load_data()
    start, cpu = time.perf_counter(), time.process_time()
    float_model = task.build_model()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    metrics = task.evaluate(float_model)
    logging.getLogger(__name__).warning(
        "%s digits float: %s in %.0f s (%.0f s CPU)", model, metrics, seconds, cpu
    )
    assert metrics["top1"] >= 97.0
