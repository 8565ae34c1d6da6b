"""Every file under conf/ composes against the schema; typos fail at compose, naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from quantbench.engine import presets
from quantbench.harness.config import CONF_DIR, compose_config, first_job_overrides, known_options, sweep_grid
from quantbench.harness.progress import count_jobs
from quantbench.harness.schema import register_configs
from quantbench.harness.schemes import SchemeError, engine_config
from quantbench.report.gate import load_gates

GROUPS = ("task", "data", "train", "model", "scheme", "tracking", "sweep", "experiment", "hydra/launcher")
SCHEMA_GROUPS = ("task", "data", "train", "model", "scheme", "tracking")


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
    if group in ("task", "model", "scheme"):
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
    ("train", "defaults:\n  - base_train\n  - _self_\nqat:\n  epoch: 3\n", "epoch"),
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
    assert known_options("sweep") == sorted(known_options("task"))
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


@pytest.mark.parametrize(("schema", "module", "target"), [
    ("ClassificationDataConf", "classification", "DataConfig"), ("ModelConf", "classification", "ModelConfig"),
    ("BaselineConf", "classification", "TrainConfig"), ("QatRecipeConf", "classification", "QatConfig"),
    ("DetectionDataConf", "detection", "DetDataConfig"), ("DetectionBaselineConf", "detection", "DetTrainConfig"),
    ("DetectionQatConf", "detection", "DetQatConfig")])
def test_schema_mirrors_the_task_dataclasses(schema, module, target):
    """conf/ is checked against the harness's schema; it must accept exactly what the task accepts."""
    import dataclasses
    import importlib

    from quantbench.harness import schema as schemas
    from quantbench.harness.run import HARNESS_ONLY

    task_config = importlib.import_module(f"tasks.{module}.config")

    def defaults(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    ours = {k: v for k, v in defaults(getattr(schemas, schema)).items() if k not in HARNESS_ONLY["model"]}
    theirs = defaults(getattr(task_config, target))
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != "???"} == {k: theirs[k] for k in ours if ours[k] != "???"}


def test_task_schema_matches_the_adapter_signature():
    import dataclasses
    import inspect

    from quantbench.harness.run import HARNESS_ONLY
    from quantbench.harness.schema import TaskConf
    from tasks.classification.adapter import ClassificationTask

    params = set(inspect.signature(ClassificationTask).parameters) - {"data", "model", "train", "qat"}
    fields = {f.name for f in dataclasses.fields(TaskConf)} - {"_target_", *HARNESS_ONLY["task"]}
    assert fields == params
