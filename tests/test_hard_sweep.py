"""A shrunk hard sweep end to end: the advanced-PTQ schemes through real Hydra multiruns, MLflow,
the exported ONNX checked in onnxruntime, and the hard report that reads them back."""

from __future__ import annotations

import pytest
from harness_overrides import DEPLOY_FAST
from omegaconf import OmegaConf

from quantbench.harness.config import compose_config
from quantbench.harness.sweep import sweep
from quantbench.harness.tracking import Store
from quantbench.report import write_report

#: The tiny Test-ResNet on a slice of digits, the learned-rounding steps shortened for every scheme at once.
SHRUNK = ("data.val_fraction=0.15", "data.calib_size=32", "data.calib_batch_size=16", "train.qat.steps=2",
          "run.latency_iters=1", *DEPLOY_FAST, "run.latency_batch=2",
          "scheme.algorithm_options={adaround:{iters:100},brecq:{iters:100}}")
SCHEMES = ("ptq_w4a8", "ptq_w4a8_adaround", "ptq_pow2_cle_bc", "ptq_w4a4_brecq", "ptq_mixed")


@pytest.mark.slow  # about a minute on 2 cores
def test_a_shrunk_hard_sweep_runs_end_to_end_and_reports(digits_overrides, run_overrides, tmp_path):
    common = [*digits_overrides, *run_overrides, *SHRUNK]
    args = [*common, f"scheme={','.join(SCHEMES)}"]
    outcome = sweep("digits", args, sweep_id="hard-e2e", grid="hard")
    assert outcome.exit_code == 0 and len(outcome.finished) == len(SCHEMES), outcome
    tracking = OmegaConf.to_container(compose_config(["sweep=digits_hard", *common]).tracking, resolve=True)
    runs = {r.data.tags["scheme"]: r.data for r in Store.from_config(tracking).sweep_runs("hard-e2e")}
    assert set(runs) == set(SCHEMES)
    for scheme, data in runs.items():
        m = data.metrics
        assert m["onnx/max_lsb_err"] == 0 and m["onnx/parity_top1"] == 100.0, scheme  # exact, every scheme
        assert 0 < m["fidelity/agree_top1"] <= 100 and "fidelity/sqnr_db" in m, scheme
    assert {"time/adaround_s", "time/cle_s"} <= set(runs["ptq_w4a8_adaround"].metrics)
    assert {"time/cle_s", "time/bias_correction_s"} <= set(runs["ptq_pow2_cle_bc"].metrics)
    assert "time/brecq_s" in runs["ptq_w4a4_brecq"].metrics
    assert {"time/mixed_precision_s", "mixed/cost_fraction"} <= set(runs["ptq_mixed"].metrics)
    assert runs["ptq_mixed"].metrics["mixed/cost_fraction"] <= 0.75
    # AdaRound at W4A8 is measured against the naive W4A8 run of the same sweep.
    assert runs["ptq_w4a8_adaround"].metrics["fidelity/sqnr_db"] > runs["ptq_w4a8"].metrics["fidelity/sqnr_db"]
    report = write_report("digits", args, out_dir=tmp_path / "reports", sweep="hard-e2e", grid="hard")
    text = report.markdown.read_text()
    assert report.rows == len(SCHEMES) and report.markdown.name == "digits_hard.md"
    assert "cle → adaround" in text and "brecq" in text
