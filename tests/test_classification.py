"""Classification adapter: ImageFolder data, model registry, metrics, training, baseline cache.

Everything runs offline on a 16x16 digits tree written to a temporary dir and on
tiny models; the slow test at the end trains the real ResNet-18/MobileNet-V2
digits baselines and checks the >= 97 % top-1 target.
"""

from __future__ import annotations

import logging
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tasks.classification import (
    ClassificationTask,
    DataNotFoundError,
    DeviceNotAvailableError,
    QatConfig,
    WeightsNotFoundError,
    build_model,
    evaluate,
    list_models,
    recipes,
    topk_correct,
    write_digits_imagefolder,
)
from tasks.classification import adapter as adapter_mod
from tasks.classification import models as models_mod
from tasks.classification.cache import BaselineCache

SMALL = {"image_size": 16, "resize_size": 16}


def _task(
    root: Path, cache: Path, data=None, train=None, model="test_resnet", **kwargs
) -> ClassificationTask:
    return ClassificationTask(
        name="digits",
        data={"root": str(root), **SMALL, **(data or {})},
        model={"name": model},
        train={"epochs": 1, "batch_size": 32, **(train or {})},
        cache_dir=cache,
        device="cpu",
        **kwargs,
    )


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A digits tree written by the adapter itself on first use (the ``make sweep`` path)."""
    root = tmp_path_factory.mktemp("data") / "digits"
    assert not root.exists()
    task = _task(root, tmp_path_factory.mktemp("cache"))
    assert task.classes == [str(i) for i in range(10)]
    return root


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def test_digits_tree_is_seeded_stratified_imagefolder(digits_root, tmp_path):
    files = _files(digits_root)
    train = [f for f in files if f.startswith("train/")]
    assert (len(train), len(files) - len(train)) == (1437, 360)
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == [str(i) for i in range(10)]
    with Image.open(digits_root / files[0]) as img:
        assert (img.size, img.mode) == ((16, 16), "RGB")
    again = write_digits_imagefolder(tmp_path / "again", size=8, seed=0)
    assert _files(again) == files
    with pytest.raises(FileExistsError):
        write_digits_imagefolder(again)


def test_loaders_fractions_calibration_and_determinism(digits_root, tmp_path):
    data = {"train_fraction": 0.1, "val_fraction": 0.25, "calib_size": 20, "calib_batch_size": 8}
    task = _task(digits_root, tmp_path, data=data)
    assert (len(task._splits.train), len(task._splits.val)) == (144, 90)
    assert len(task.train_loader()) == 144 // 32, "training drops the last partial batch"
    calib = list(task.calib_loader())
    assert [len(b) for b in calib] == [8, 8, 4] and calib[0].shape[1:] == (3, 16, 16)
    assert list(task.calib_loader())[0].equal(calib[0]), "calib_loader must be re-iterable"
    (example,) = task.example_inputs()
    assert example.shape == (2, 3, 16, 16)
    twin = _task(digits_root, tmp_path, data=data)
    assert torch.equal(torch.cat(list(twin.calib_loader())), torch.cat(calib))
    assert twin._splits.train.indices == task._splits.train.indices
    x1, y1 = next(iter(task.train_loader()))
    x2, y2 = next(iter(twin.train_loader()))
    assert torch.equal(y1, y2)
    other = _task(digits_root, tmp_path, data={**data, "seed": 1})
    assert not torch.equal(torch.cat(list(other.calib_loader())), torch.cat(calib))


def test_hydra_style_mappings_are_converted_and_checked(digits_root, tmp_path):
    from omegaconf import OmegaConf

    data = OmegaConf.create({"root": str(digits_root), "mean": [0.5, 0.5, 0.5], **SMALL})
    task = ClassificationTask(name="digits", data=data, model=OmegaConf.create({"name": "test_mobilenet"}))
    assert task.data_config.mean == (0.5, 0.5, 0.5) and task.data_config.generate == "digits"
    with pytest.raises(TypeError, match="'lrr'"):
        ClassificationTask(name="digits", train={"lrr": 0.1})


def test_missing_imagenet_is_one_line_data_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    for task in (
        ClassificationTask(name="imagenet"),
        ClassificationTask(name="imagenet", data={"root": str(tmp_path / "x")}),
    ):
        with pytest.raises(DataNotFoundError) as exc:
            task.build_model()
        message = _one_line(exc)
        assert isinstance(exc.value, FileNotFoundError)
        assert "data.root" in message and "IMAGENET_ROOT" in message and "TASK=digits" in message
    (tmp_path / "imnet" / "train" / "n01").mkdir(parents=True)
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imnet"))
    with pytest.raises(DataNotFoundError, match="val/"):
        ClassificationTask(name="imagenet").evaluate(lambda x: x)


def test_model_registry_names_sources_and_errors():
    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet18", "tv:mobilenet_v2", "timm:test_resnet", "test_resnet", "test_mobilenet"):
        model = build_model(name, num_classes=10)
        assert not model.training
        assert model(x).shape == (2, 10), name
    assert list_models("test_*") == ["test_mobilenet", "test_resnet"]
    assert "resnet18" in list_models("resnet*")
    with pytest.raises(KeyError, match="resnet18"):
        build_model("resnet_nonexistent", 10)
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


def test_same_metrics_for_torch_and_numpy_predict_functions(digits_root, tmp_path):
    """The float model, a GraphModule and an ORT session all go through ``evaluate``."""
    task = _task(digits_root, tmp_path, data={"val_fraction": 0.3})
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


def test_float_baseline_is_cached_by_config_and_rebuilt_when_corrupt(
    digits_root, tmp_path, monkeypatch, caplog
):
    data = {"train_fraction": 0.1, "val_fraction": 0.2}
    calls = []
    real_train_float = adapter_mod.train_float

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train_float(*args, **kwargs)

    monkeypatch.setattr(adapter_mod, "train_float", counting)
    first = _task(digits_root, tmp_path, data=data).build_model()
    files = sorted((tmp_path / "baselines").glob("*.pt"))
    assert len(calls) == 1 and len(files) == 1 and files[0].with_suffix(".json").is_file()

    second = _task(digits_root, tmp_path, data={**data, "num_workers": 0, "eval_batch_size": 7}).build_model()
    assert len(calls) == 1, "same config: the cached checkpoint must be loaded"
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    changed = _task(digits_root, tmp_path, data=data, train={"lr": 1e-2})
    key = BaselineCache(tmp_path / "baselines", "digits", "test_resnet", changed.baseline_key()).path
    assert key != files[0], "another recipe must not reuse the baseline"

    files[0].write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        _task(digits_root, tmp_path, data=data).build_model()
    assert len(calls) == 2 and "unusable" in caplog.text
    assert isinstance(torch.load(files[0], weights_only=True), dict)


def test_float_training_by_steps_keeps_best_and_returns_eval_model(digits_root, tmp_path):
    task = _task(digits_root, tmp_path, data={"train_fraction": 0.1, "val_fraction": 0.2})
    torch.manual_seed(0)
    result = task.train(build_model("test_resnet", 10), {"steps": 7, "keep_best": "disk"}, qat=False)
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
    return types.SimpleNamespace(
        train_mode=lambda m: m.train(),
        eval_mode=lambda m: m.eval(),
        quantizer_parameters=lambda m: [m.scale],
        weight_parameters=lambda m: list(m.parameters()),
        set_observers=lambda m, enabled: events.append(("observers", enabled, m.train_forwards)),
        set_bn_frozen=lambda m, frozen: events.append(("bn", frozen, m.train_forwards)),
    )


def test_qat_loop_freezes_at_the_configured_steps(digits_root, tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setattr(recipes, "load_qat_api", lambda: _fake_qat_api(events))
    task = _task(digits_root, tmp_path, data={"train_fraction": 0.1, "val_fraction": 0.2})
    recipe = {"steps": 8, "batch_size": 32, "freeze_observers_after": 0.4, "freeze_bn_after": 1.0}
    result = task.train(_FakeQatModel(), recipe, qat=True)  # 144 images / 32 = 4 full batches per epoch
    first = {kind: (value, step) for kind, value, step in reversed(events)}
    assert first == {"observers": (False, 2), "bn": (True, 4)}
    assert all(not enabled for kind, enabled, _ in events if kind == "observers"), "frozen stays frozen"
    assert len(result.history) == 2 and not result.model.training


def test_qat_param_groups_have_their_own_lr_and_decay():
    model = _FakeQatModel()
    cfg = QatConfig(
        lr=1e-3, quant_lr=1e-2, lr_decay=0.5, lr_decay_steps=2, quant_lr_decay=0.1, quant_lr_decay_steps=1
    )
    groups = [
        {"params": [p for n, p in model.named_parameters() if n != "scale"], "lr": cfg.lr, "weight_decay": 1e-4,
         "decay": cfg.lr_decay, "decay_steps": cfg.lr_decay_steps},
        {"params": [model.scale], "lr": cfg.quant_lr, "weight_decay": 0.0, "decay": cfg.quant_lr_decay,
         "decay_steps": cfg.quant_lr_decay_steps},
    ]  # fmt: skip
    optimizer, scheduler = recipes.make_optimizer(groups, cfg, steps_per_epoch=10)
    assert isinstance(optimizer, torch.optim.Adam)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([1e-3 * 0.5, 1e-2 * 0.01])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]


def test_qat_with_the_engine_or_a_clear_error_without_it(digits_root, tmp_path):
    task = _task(digits_root, tmp_path, data={"train_fraction": 0.1, "val_fraction": 0.2, "calib_size": 32})
    torch.manual_seed(0)
    model = build_model("test_resnet", 10)
    try:
        from quantbench.engine import ModelQuantizer, capture, presets, qat
    except ImportError:
        with pytest.raises(NotImplementedError, match="issue 3"):
            task.train(model, None, qat=True)
        return
    qmodel = ModelQuantizer(presets.get("qat_lsq")).quantize_model(capture(model, task.example_inputs()),
                                                                    task.calib_loader())  # fmt: skip
    assert qat.quantizer_parameters(qmodel), "LSQ learns its steps"
    result = task.train(qmodel, {"steps": 3, "batch_size": 32, "freeze_observers_after": 0.5}, qat=True)
    assert result.model is qmodel and not qat.is_training(qmodel)
    assert [h["step"] for h in result.history] == [3]
    assert task.evaluate(qmodel)["top1"] == pytest.approx(result.best_metric)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_one_line():
    with pytest.raises(DeviceNotAvailableError) as exc:
        ClassificationTask(device="cuda")
    assert "device=cpu" in _one_line(exc)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_digits_float_baselines_reach_97_percent(model, tmp_path):
    """The digits preset recipe (what ``make sweep TASK=digits`` trains once and caches)."""
    torch.set_num_threads(2)
    task = ClassificationTask(name="digits", data={"root": str(tmp_path / "digits")}, model={"name": model},
                              cache_dir=tmp_path / "cache")  # fmt: skip
    task.prepare()  # writes the tree outside the timed part
    start, cpu = time.perf_counter(), time.process_time()
    float_model = task.build_model()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    metrics = task.evaluate(float_model)
    logging.getLogger(__name__).warning(
        "%s digits float: %s in %.0f s (%.0f s CPU)", model, metrics, seconds, cpu
    )
    assert metrics["top1"] >= 97.0
