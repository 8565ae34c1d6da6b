"""Issue 12: a bad model name, a checkpoint that is not one or does not fit, a refused number, the
detection data errors: each is a BadInputError whose message is one line naming the key and the fix.

Every file is real (written under ``tmp_path``); configs are composed from ``conf/`` as a run does
(:func:`conftest.make_task`), so the key a message names is the one a user types.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings

import pytest
import torch
from conftest import make_task
from torch import nn
from torch.utils.data import TensorDataset

from quantbench.errors import (
    BadInputError,
    ConfigError,
    CorruptDataError,
    DataError,
    DataNotFoundError,
    WeightsError,
    WeightsNotFoundError,
)
from quantbench.registry import UnknownNameError
from quantbench.training import LoopConfig, QatConfig, load_weights
from quantbench.training.data import available_cpus, make_loader
from tasks.classification.config import DataConfig
from tasks.classification.models import build_model, check_name
from tasks.detection.data import CocoDetection, DetectionDataError, annotation_path, write_shapes_coco
from tasks.detection.model import build_detector

NAME_FIX = "timm:<name> for any timm model"


def _line(exc: pytest.ExceptionInfo, *, cls: type = BadInputError) -> str:
    """The message, checked: the right class, one line, not empty."""
    assert isinstance(exc.value, cls) and isinstance(exc.value, BadInputError), type(exc.value)
    message = str(exc.value)
    assert message.strip() and "\n" not in message and "\r" not in message, message
    return message


# --- model.name -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, close", [
    ("nosuchnet", None),
    ("resnet19", "'resnet18'"),
    ("tv:resnet19", "'tv:resnet18'"),
    ("resnet_nonexistent", "'resnet18'"),  # nothing close as a whole: names that share its leading word
    ("timm:nosuchnet", None),
    ("timm:resnet19", "'timm:resnet18'"),
    ("local:test_resnt", "'local:test_resnet'"),
    ("foo:resnet18", "timm:"),
])
def test_unknown_model_name_is_one_short_line_with_close_matches(name, close):
    with pytest.raises(UnknownNameError) as exc:
        check_name(name)
    message = _line(exc, cls=ConfigError)
    assert message.startswith(f"model.name={name!r}: ") and NAME_FIX in message and "model=<file>" in message
    assert len(message) < 300, len(message)
    assert "alexnet" not in message and "aimv2" not in message, "never the list of every model"
    if close:
        assert close in message
    else:
        assert "did you mean" not in message
    with pytest.raises(UnknownNameError) as again:  # building it says the same
        build_model(name, 10)
    assert str(again.value) == message


@pytest.mark.parametrize("task, model", [("digits", "test_resnet"), ("imagenet", "resnet18")])
def test_a_run_refuses_an_unknown_model_name_when_it_builds_the_task(task, model):
    """Refused when the task is built (before a run is recorded), not after data loading or training."""
    with pytest.raises(UnknownNameError) as exc:
        make_task(f"task={task}", f"model={model}", "task.device=cpu", "model.name=nosuchnet")
    message = _line(exc, cls=ConfigError)
    assert message.startswith("model.name='nosuchnet': not a torchvision or local model; ") and NAME_FIX in message
    assert len(message) < 300


def test_an_unknown_detector_name_is_one_line():
    """(A detection task is built with the default model too, so its name is checked when the model is built.)"""
    with pytest.raises(UnknownNameError) as exc:
        build_detector("yolo_nas_nan", 3)
    message = _line(exc, cls=ConfigError)
    assert message.startswith("model.name='yolo_nas_nan': not a detection model; did you mean 'yolo_nas_nano'")
    assert "model=<file>" in message and len(message) < 300


# --- model.checkpoint -----------------------------------------------------------------------------


def test_a_state_dict_of_another_model_is_one_line_with_counts_and_examples(tmp_path):
    other = tmp_path / "mobilenet.pt"
    torch.save(build_model("test_mobilenet", 10).state_dict(), other)
    with pytest.raises(WeightsError) as exc:
        build_model("test_resnet", 10, checkpoint=str(other))
    message = _line(exc, cls=WeightsError)
    assert message.startswith(f"model.checkpoint={other}: its state_dict does not fit test_resnet: ")
    assert "missing keys (e.g. " in message and "unexpected (e.g. " in message
    assert message.endswith("point model.checkpoint at weights for this model")
    assert "Error(s) in loading" not in message

    five = tmp_path / "five_classes.pt"
    torch.save(build_model("test_resnet", 5).state_dict(), five)
    with pytest.raises(WeightsError) as exc:
        build_model("test_resnet", 10, checkpoint=str(five))
    message = _line(exc, cls=WeightsError)
    assert "2 shape mismatches" in message and "7.weight [10,16] vs [5,16]" in message
    assert "missing" not in message and "model.num_classes" in message


def test_a_detector_checkpoint_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(build_model("test_resnet", 10).state_dict(), path)
    with pytest.raises(WeightsError) as exc:
        build_detector("yolo_nas_test", 3, str(path))
    message = _line(exc, cls=WeightsError)
    assert message.startswith(f"model.checkpoint={path}: its state_dict does not fit yolo_nas_test: ")


class _Custom:
    """A class that a safe (tensors-only) load must refuse to unpickle."""


def _write_not_checkpoints(tmp_path) -> dict[str, str]:
    files = {
        "text": lambda p: p.write_text("epoch,loss\n1,0.5\n"),
        "random": lambda p: p.write_bytes(os.urandom(256)),
        "empty": lambda p: p.write_bytes(b""),
        "plain_pickle": lambda p: p.write_bytes(pickle.dumps(_Custom())),
        "torch_object": lambda p: torch.save({"net": _Custom()}, p),
        "whole_module": lambda p: torch.save(nn.Linear(2, 2), p),
        "no_tensors": lambda p: torch.save({"epoch": 3, "best": 0.5}, p),
        "a_tensor": lambda p: torch.save(torch.zeros(3), p),
    }
    paths = {}
    for name, write in files.items():
        path = tmp_path / f"{name}.pt"
        write(path)
        paths[name] = str(path)
    return paths


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_never_advises_unsafe_loading(tmp_path):
    for kind, path in _write_not_checkpoints(tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing printed around the line either
            with pytest.raises(WeightsError) as exc:
                build_model("test_resnet", 10, checkpoint=path)
        message = _line(exc, cls=WeightsError)
        assert message.startswith(f"model.checkpoint={path}: "), (kind, message)
        assert "weights_only" not in message and "False" not in message, (kind, message)
        assert "torch.save(model.state_dict(), PATH)" in message, (kind, message)
        assert len(message) < 400, (kind, message)
    with pytest.raises(WeightsError, match="Linear"):
        build_model("test_resnet", 10, checkpoint=str(tmp_path / "whole_module.pt"))
    with pytest.raises(WeightsError, match=r"holds a dict without tensors \(keys: epoch, best\)"):
        build_model("test_resnet", 10, checkpoint=str(tmp_path / "no_tensors.pt"))


def test_a_missing_checkpoint_is_weights_not_found_naming_the_key(tmp_path):
    for where in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(WeightsNotFoundError) as exc:
            build_model("test_resnet", 10, checkpoint=str(where))
        message = _line(exc, cls=WeightsError)
        assert isinstance(exc.value, FileNotFoundError)
        assert message.startswith(f"model.checkpoint={where}: ") and "point model.checkpoint at" in message


def test_wrapped_checkpoints_are_unwrapped(tmp_path):
    torch.manual_seed(0)
    source = build_model("test_resnet", 10)
    state = source.state_dict()
    layouts = {
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "model_state_dict_ddp": {"model_state_dict": {f"module.{k}": v for k, v in state.items()}},
        "nested": {"checkpoint_format": 1, "model": {"state_dict": state}},
    }
    x = torch.randn(2, 3, 16, 16)
    for name, payload in layouts.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        torch.manual_seed(1)
        model = load_weights(build_model("test_resnet", 10), path).eval()
        assert torch.equal(model(x), source.eval()(x)), name


# --- numeric and choice config values -------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("train.baseline.batch_size=-1", "train.baseline.batch_size=-1: must be a positive integer"),
    ("train.qat.batch_size=0", "train.qat.batch_size=0: must be a positive integer"),
    ("train.baseline.epochs=-1", "train.baseline.epochs=-1: must be an integer >= 0"),
    ("train.baseline.lr=0", "train.baseline.lr=0.0: must be a number > 0"),
    ("train.qat.quant_lr=-1e-3", "train.qat.quant_lr=-0.001: must be a number > 0"),
    ("train.baseline.weight_decay=-1", "train.baseline.weight_decay=-1.0: must be a number >= 0"),
    ("train.qat.freeze_bn_after=-2", "train.qat.freeze_bn_after=-2.0: must be a number >= 0 or null"),
    ("train.baseline.steps=0", "train.baseline.steps=0: must be a positive integer or null"),
    ("data.eval_batch_size=-4", "data.eval_batch_size=-4: must be a positive integer"),
    ("data.calib_size=-1", "data.calib_size=-1: must be a positive integer"),
    ("data.calib_batch_size=0", "data.calib_batch_size=0: must be a positive integer"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in (0, 1]"),
    ("model.num_classes=0", "model.num_classes=0: must be a positive integer or null"),
    ("train.qat.keep_best=best", "train.qat.keep_best='best': must be one of memory, disk, none"),
    ("data.on_corrupt=skipp", "data.on_corrupt='skipp': must be one of fail, skip (did you mean 'skip'?)"),
])
def test_a_refused_classification_value_names_its_full_key(override, expected):
    with pytest.raises(ConfigError) as exc:
        make_task("task=digits", "model=test_resnet", "task.device=cpu", override)
    assert _line(exc, cls=ConfigError) == expected


@pytest.mark.parametrize("override, expected", [
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("train.baseline.batch_size=-8", "train.baseline.batch_size=-8: must be a positive integer"),
    ("train.qat.iou_threshold=0", "train.qat.iou_threshold=0.0: must be in (0, 1]"),
    ("data.image_size=100", "data.image_size=100: must be a positive multiple of 32 (the detector's stride)"),
])
def test_a_refused_detection_value_names_its_full_key(override, expected):
    with pytest.raises(ConfigError) as exc:
        make_task("task=shapes", "model=yolo_nas_test", "task.device=cpu", override)
    assert _line(exc, cls=ConfigError) == expected


def test_on_corrupt_is_a_plain_string_refused_by_the_task_not_by_compose():
    """``data.on_corrupt`` is a ``str`` field: Hydra composes ``skipp``; the task's dataclass refuses it."""
    from conftest import compose

    assert compose("task=digits", "data.on_corrupt=skipp")["data"]["on_corrupt"] == "skipp"
    with pytest.raises(ConfigError) as exc:
        DataConfig(on_corrupt="skipp")
    assert _line(exc, cls=ConfigError).startswith("data.on_corrupt='skipp': must be one of fail, skip")


def test_configs_built_in_code_are_checked_the_same_way():
    for cls, kwargs, expected in (
        (LoopConfig, {"batch_size": 0}, "train.baseline.batch_size=0: must be a positive integer"),
        (QatConfig, {"lr": -1.0}, "train.qat.lr=-1.0: must be a number > 0"),
        (LoopConfig, {"batch_size": "8"}, "train.baseline.batch_size='8': must be a positive integer"),
        (LoopConfig, {"epochs": True}, "train.baseline.epochs=True: must be an integer >= 0"),
        (DataConfig, {"calib_size": -1}, "data.calib_size=-1: must be a positive integer"),
    ):
        with pytest.raises(ConfigError) as exc:
            cls(**kwargs)
        assert _line(exc, cls=ConfigError) == expected
    assert LoopConfig(steps=None, grad_clip=None, checkpoint_steps=None).steps is None  # null where allowed


# --- DataLoader workers ---------------------------------------------------------------------------


def test_loader_workers_are_capped_at_the_cpus_said_once_not_warned(caplog):
    cpus = available_cpus()
    data = TensorDataset(torch.arange(8.0))
    with caplog.at_level(logging.DEBUG, logger="quantbench.training.data"):
        loaders = [make_loader(data, 4, shuffle=False, seed=0, num_workers=cpus + 97) for _ in range(2)]
    assert [loader.num_workers for loader in loaders] == [cpus, cpus]
    said = [r for r in caplog.records if "num_workers" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and f"{cpus} CPUs" in said[0].getMessage()
    assert make_loader(data, 4, shuffle=False, seed=0, num_workers=0).num_workers == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "suggested max number of worker" warning
        loader = make_loader(data, 4, shuffle=False, seed=0, num_workers=min(cpus, 2) + 5)
        assert torch.equal(torch.cat([b[0] for b in loader]), torch.arange(8.0))
        del loader


# --- detection and ImageNet data ------------------------------------------------------------------


@pytest.fixture
def small_coco(tmp_path):
    return write_shapes_coco(tmp_path / "coco", n_train=2, n_val=2, min_size=40, max_size=48, seed=1)


@pytest.mark.parametrize("task, model, env", [("coco", "yolo_nas_nano", "COCO_ROOT"),
                                              ("imagenet", "resnet18", "IMAGENET_ROOT")])
def test_missing_data_root_names_data_root_and_the_env_variable(task, model, env, tmp_path, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    for where in ((), (f"data.root={tmp_path / 'nowhere'}",)):
        task_ = make_task(f"task={task}", f"model={model}", "task.device=cpu", *where)
        with pytest.raises(DataNotFoundError) as exc:
            task_.load_data()
        message = _line(exc, cls=DataError)
        assert "data.root" in message and env in message, message
        if where:
            assert str(tmp_path / "nowhere") in message


def test_detection_data_errors_are_data_errors_naming_the_file(small_coco, tmp_path):
    json_path = annotation_path(small_coco, "val")
    good = json_path.read_text()

    json_path.unlink()
    with pytest.raises(DataNotFoundError) as exc:
        make_task("task=shapes", "model=yolo_nas_test", "task.device=cpu", f"data.root={small_coco}",
                  "data.generate=null").load_data()
    assert "instances_val.json" in _line(exc, cls=DataError) and "data.root" in str(exc.value)

    json_path.write_text('{\n  "images": [\n    {"id": 1,\n  ]\n}')
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(small_coco, "val")
    message = _line(exc, cls=CorruptDataError)
    assert str(json_path) in message and "line 4" in message and "not valid JSON" in message

    json_path.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(small_coco, "val")
    assert "'images', 'annotations'" in _line(exc, cls=CorruptDataError)

    json_path.write_text(good)
    first = json.loads(good)["images"][0]
    (small_coco / "val" / first["file_name"]).unlink()
    with pytest.raises(DetectionDataError) as exc:
        CocoDetection(small_coco, "val")[0]
    message = _line(exc, cls=CorruptDataError)
    assert first["file_name"] in message and "is missing" in message and str(json_path) in message


def test_data_writers_leave_the_success_line_to_the_cli(tmp_path, caplog):
    """``quantbench data NAME`` prints one line; the writer itself logs below INFO."""
    with caplog.at_level(logging.INFO):
        write_shapes_coco(tmp_path / "s", n_train=2, n_val=1, min_size=40, max_size=48, seed=0)
    assert not [r for r in caplog.records if r.name.startswith("tasks.") and "wrote" in r.getMessage()]
