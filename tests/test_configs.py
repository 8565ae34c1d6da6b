"""Every file under conf/ composes against the schema; typos fail at compose, naming the key."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from quantbench.engine import presets
from quantbench.harness.callbacks import count_jobs
from quantbench.harness.config import CONF_DIR, compose_config, first_job_overrides, known_options, sweep_grid
from quantbench.harness.preflight import sweep_tasks
from quantbench.harness.schema import register_configs
from quantbench.harness.schemes import SchemeError, engine_config
from quantbench.report.gate import load_gates
from quantbench.training import TASK_KINDS, ModelConfig

GROUPS = ("task", "data", "train", "model", "scheme", "tracking", "engine", "sweep", "experiment", "hydra/launcher")
SCHEMA_GROUPS = ("task", "data", "train", "model", "scheme", "tracking", "engine")


def _options() -> list[tuple[str, str]]:
    return [(g, stem) for g in GROUPS for stem in known_options(g)]


def test_every_group_has_files():
    for group in GROUPS:
        assert known_options(group), f"conf/{group} is empty"
    unknown = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {g.split("/")[0] for g in GROUPS} - {"gates"}
    assert not unknown, f"conf/ folders no test composes: {unknown}"


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: str(v))
def test_every_config_composes_and_resolves(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for g in SCHEMA_GROUPS:  # each group node was built from its dataclass schema
        assert OmegaConf.get_type(cfg[g]) is not dict, f"{group}={option}: {g} has no schema"
    if group in ("task", "model", "scheme", "engine"):
        assert cfg[group].name == option, f"conf/{group}/{option}.yaml names itself {cfg[group].name!r}"


def test_data_and_train_follow_the_task():
    cfg = compose_config(["task=imagenet"])
    assert cfg.data.image_size == 224 and cfg.train.qat.batch_size == 24
    assert compose_config(["sweep=imagenet"]).task.name == "imagenet"


def test_default_launcher_is_basic():
    cfg = compose_config([], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "basic"


@pytest.mark.parametrize("override", ["scheme.calib_bacthes=3", "scheme.weight.dtyp=int4", "modle=resnet18",
                                      "run.treads=1"])
def test_typo_override_fails_naming_the_key(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].replace(".", r"\.")):
        compose_config([override])


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["scheme.calib_batches=many"])
    assert "calib_batches" in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize(("group", "body", "key"), [
    ("scheme", "defaults:\n  - base_scheme\n  - _self_\nname: typo\nmethod: x\ncalib_bacthes: 3\n", "calib_bacthes"),
    ("scheme", "name: typo\nmethod: x\nweight:\n  obsever: mse\n", "obsever"),  # no defaults: the primary schema still checks
    ("data", "defaults:\n  - base_classification\n  - _self_\nroot: x\nimage_sise: 32\n", "image_sise"),
    ("train", "defaults:\n  - base_classification_train\n  - _self_\nqat:\n  epoch: 3\n", "epoch"),
    ("data", "defaults:\n  - base_detection\n  - _self_\nroot: x\nimage_szie: 64\n", "image_szie"),
    ("train", "defaults:\n  - base_detection_train\n  - _self_\nbaseline:\n  emma: true\n", "emma"),
])
def test_typo_in_a_file_fails_at_compose_naming_the_key(tmp_path: Path, group, body, key):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / group / "typo.yaml").write_text(body)
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose("config", overrides=[f"{group}=typo"])
    assert key in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("option", known_options("scheme"))
def test_every_scheme_names_an_engine_preset(option):
    scheme = OmegaConf.to_container(compose_config([f"scheme={option}"]).scheme, resolve=True)
    if not scheme["preset"]:
        with pytest.raises(SchemeError):
            engine_config(scheme)
        return
    if scheme["qat"] and scheme["preset"] not in presets.list():
        pytest.skip(f"engine QAT preset {scheme['preset']} not in this checkout yet")
    config = engine_config(scheme)
    assert config.global_quant_config.weight is not None


def test_scheme_overrides_replace_spec_fields():
    scheme = OmegaConf.to_container(compose_config(
        ["scheme=ptq_pow2", "scheme.weight.dtype=int4", "scheme.output_tensors.observer=mse",
         "scheme.fold_bn=false", "scheme.exclude=[fc]"]).scheme, resolve=True)
    base, config = presets.get("int8_pow2"), engine_config(scheme)
    assert config.global_quant_config.weight == base.global_quant_config.weight.replace(dtype="int4")
    assert config.global_quant_config.output_tensors.observer == "mse"
    assert config.global_quant_config.input_tensors == base.global_quant_config.input_tensors
    assert (config.fold_bn, config.exclude) == (False, ("fc",))


def test_sweeps_and_gates():
    assert sweep_tasks() == sorted(known_options("task"))  # conf/sweep/TASK_GRID.yaml: a task's named grids
    models, schemes = sweep_grid("digits")
    assert models == ["resnet18", "mobilenet_v2"]
    assert schemes == ["float", "ptq_float", "ptq_pow2", "ptq_pow2_mse", "qat_pow2", "qat_tqt", "qat_lsq"]
    for path in (CONF_DIR / "gates").glob("*.yaml"):
        assert load_gates(path).checks, path


def test_gate_file_typo_fails_naming_the_key(tmp_path: Path):
    bad = tmp_path / "g.yaml"
    bad.write_text("checks:\n  - metric: quant/top1\n    max_dorp: 1.0\n")
    with pytest.raises(Exception, match="max_dorp"):
        load_gates(bad)


def test_job_count_and_first_job():
    params = {"model": "resnet18,mobilenet_v2", "scheme": "float,ptq_float,qat_tqt"}
    assert count_jobs(params, ["sweep=digits"]) == 6
    assert count_jobs(params, ["model=resnet18", "scheme=ptq_pow2,qat_tqt"]) == 2
    assert first_job_overrides(["sweep=digits", "scheme=ptq_pow2,qat_tqt", "+x=1"]) == [
        "sweep=digits", "scheme=ptq_pow2", "+x=1"]


def _kind(cfg):
    """The task kind whose adapter ``task._target_`` names."""
    kinds = [TASK_KINDS.get(k) for k in TASK_KINDS if TASK_KINDS.get(k).adapter == cfg.task._target_]
    assert len(kinds) == 1, f"{cfg.task._target_} is the adapter of {len(kinds)} registered task kinds"
    return kinds[0]


def test_every_task_kind_is_registered_by_its_package():
    register_configs()
    assert TASK_KINDS.list() == ["classification", "detection"]
    for task in known_options("task"):
        assert _kind(compose_config([f"task={task}"])).adapter.startswith("tasks.")


@pytest.mark.parametrize("task", known_options("task"))
def test_each_group_is_typed_by_the_class_its_reader_builds(task):
    """One dataclass per group, owned by the code that reads it: nothing mirrored that could drift."""
    cfg = compose_config([f"task={task}"])
    kind = _kind(cfg)
    recipes = kind.train()
    assert OmegaConf.get_type(cfg.data) is kind.data
    assert OmegaConf.get_type(cfg.train) is kind.train
    assert OmegaConf.get_type(cfg.train.baseline) is type(recipes.baseline)
    assert OmegaConf.get_type(cfg.train.qat) is type(recipes.qat)
    assert OmegaConf.get_type(cfg.model) is kind.model is ModelConfig


def _as_built(value):
    """A composed value as the task's dataclasses hold it (sequences become tuples)."""
    if isinstance(value, dict):
        return {k: _as_built(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_as_built(v) for v in value)
    return value


@pytest.mark.parametrize("task", known_options("task"))
def test_the_task_gets_exactly_the_composed_config(task, compose_tree, task_factory):
    """No presets in code: every value the adapter holds is the one composed from conf/ (model display name too)."""
    overrides = [f"task={task}", "task.device=cpu"]
    tree, built = compose_tree(*overrides), task_factory(*overrides)  # building is cheap: data opens lazily
    assert type(built).__module__ + "." + type(built).__name__ == tree["task"]["_target_"]
    assert (built.name, str(built.cache_dir), built.device.type) == (task, tree["task"]["cache_dir"], "cpu")
    assert dataclasses.asdict(built.data_config) == _as_built(tree["data"])
    assert dataclasses.asdict(built.model_config) == _as_built(tree["model"])
    assert built.model_config.display_name and built.model_config.display_name != built.model_config.name
    assert dataclasses.asdict(built.train_config) == _as_built(tree["train"]["baseline"])
    assert dataclasses.asdict(built.qat_config) == _as_built(tree["train"]["qat"])


@pytest.mark.parametrize("task", known_options("task"))
def test_task_schema_matches_the_adapter_signature(task):
    from quantbench.harness.run import HARNESS_ONLY
    from quantbench.harness.schema import TaskConf

    module, name = _kind(compose_config([f"task={task}"])).adapter.rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), name)
    params = set(inspect.signature(adapter).parameters) - {"data", "model", "train", "qat"}
    fields = {f.name for f in dataclasses.fields(TaskConf)} - {"_target_", *HARNESS_ONLY["task"]}
    assert fields == params


def test_a_composed_config_is_reused_as_a_copy_until_a_conf_file_changes(tmp_path, monkeypatch):
    """compose_config keeps what it composed: the same overrides give an equal config that is a copy of
    its own (changing it changes nothing later), and an edited YAML file is read again."""
    from quantbench.harness import config as config_module

    conf = tmp_path / "conf"
    shutil.copytree(config_module.CONF_DIR, conf)
    monkeypatch.setattr(config_module, "CONF_DIR", conf)
    monkeypatch.setattr(config_module, "_COMPOSED", type(config_module._COMPOSED)())
    first = config_module.compose_config(["model=resnet18"])
    OmegaConf.set_struct(first, False)
    first.model.display_name = "changed by the caller"
    again = config_module.compose_config(["model=resnet18"])
    assert again.model.display_name == "ResNet-18" and again is not first and len(config_module._COMPOSED) == 1
    model = conf / "model" / "resnet18.yaml"
    model.write_text(model.read_text().replace("display_name: ResNet-18", "display_name: ResNet-18 (edited)"))
    assert config_module.compose_config(["model=resnet18"]).model.display_name == "ResNet-18 (edited)"
