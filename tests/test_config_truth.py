"""One source of truth for configs: what the tests train is what ``make sweep`` trains.

Each config group has one dataclass, owned by the code that reads it and
registered in Hydra's ConfigStore; the recipe values live only in
``conf/*.yaml``. So a task built from the composed config (as the tests'
:func:`conftest.make_task` builds it) has exactly the YAML's values, and the
same float-baseline cache key as the job that ``make sweep`` runs.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import compose, make_task
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from quantbench.harness.config import CONF_DIR, compose_config, sweep_grid
from quantbench.harness.run import build_task, resolve_tree
from quantbench.harness.schema import register_configs
from quantbench.training import TASK_KINDS, BaselineCache, LoopConfig, ModelConfig
from tasks.classification.config import DataConfig
from tasks.detection.config import DetDataConfig, DetectionTrainConfig


def _sweep_job(task: str, model: str, scheme: str, *extra: str) -> dict:
    """The config of one job of ``make sweep TASK=<task>`` (``quantbench sweep`` composes ``sweep=<task>``)."""
    return resolve_tree(compose_config([f"sweep={task}", f"model={model}", f"scheme={scheme}", *extra]))


def _yaml(path) -> dict:
    """A conf file as Hydra reads it (OmegaConf's YAML: ``4e-3`` is a float)."""
    return OmegaConf.to_container(OmegaConf.load(path))


def _comparable(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "tracking"}


@pytest.mark.parametrize("task", ["digits", "shapes"])
def test_a_test_composes_the_sweeps_config(task):
    models, schemes = sweep_grid(task)
    for model in models:
        assert _comparable(compose(f"task={task}", f"model={model}", f"scheme={schemes[0]}")) == \
            _comparable(_sweep_job(task, model, schemes[0]))


def test_the_task_gets_the_yaml_recipe_value_for_value():
    task = make_task("task=digits", "model=resnet18")
    recipe = _yaml(CONF_DIR / "train" / "digits.yaml")
    for key, value in recipe["baseline"].items():
        assert getattr(task.train_config, key) == pytest.approx(value), f"train.baseline.{key}"
    for key, value in recipe["qat"].items():
        assert getattr(task.qat_config, key) == pytest.approx(value), f"train.qat.{key}"
    data = _yaml(CONF_DIR / "data" / "digits.yaml")
    for key in ("resize_size", "image_size", "train_augment", "pad", "calib_size", "calib_batch_size"):
        assert getattr(task.data_config, key) == data[key], f"data.{key}"


def test_tests_and_the_sweep_train_the_same_baseline(digits_root, tmp_path):
    """Same resolved config, same cache entry: a baseline a test trains is the one the sweep loads."""
    where = (f"data.root={digits_root}", f"task.cache_dir={tmp_path}")
    for model in sweep_grid("digits")[0]:
        in_test = make_task("task=digits", f"model={model}", *where)
        in_sweep = build_task(_sweep_job("digits", model, "qat_lsq", *where))
        key = in_test.baseline_key()
        assert key == in_sweep.baseline_key()
        cache = BaselineCache(tmp_path, "digits", model, key)
        assert cache.key == BaselineCache(tmp_path, "digits", model, in_sweep.baseline_key()).key
        assert key["train"]["epochs"] == _yaml(CONF_DIR / "train" / "digits.yaml")[
            "baseline"]["epochs"]


def test_each_group_schema_is_the_class_its_code_reads():
    """No mirror: the ConfigStore holds the very dataclasses the tasks and the training layer build."""
    register_configs()
    repo = ConfigStore.instance().repo

    def schema(group: str, name: str) -> type:
        return OmegaConf.get_type(repo[group][f"{name}.yaml"].node)

    assert schema("data", "base_classification") is DataConfig
    assert schema("data", "base_detection") is DetDataConfig
    assert schema("train", "base_detection_train") is DetectionTrainConfig
    assert schema("model", "base_model") is ModelConfig
    for kind in TASK_KINDS.list():
        assert schema("data", f"base_{kind}") is TASK_KINDS.get(kind).data
        assert schema("train", f"base_{kind}_train") is TASK_KINDS.get(kind).train


def test_every_recipe_file_sets_the_recipe_and_nothing_is_left_to_python_defaults():
    """The numbers that define a recipe are written in conf/train/*.yaml, for both recipes of every task."""
    defining = ("epochs", "batch_size", "optimizer", "lr", "weight_decay")
    for path in sorted((CONF_DIR / "train").glob("*.yaml")):
        recipe = _yaml(path)
        for part in ("baseline", "qat"):
            missing = [k for k in defining if k not in recipe[part]]
            assert missing == [], f"{path.name}: {part} does not set {missing}"
        for key in ("quant_lr", "freeze_observers_after", "freeze_bn_after"):
            assert key in recipe["qat"], f"{path.name}: qat does not set {key}"
    assert {f.name for f in dataclasses.fields(LoopConfig)} >= {"ema", "grad_clip", "eval_every"}
