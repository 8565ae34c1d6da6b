"""AMD Quark as a peer engine: its FX graph mode PTQ and its ONNX exporter, in Quark's own virtualenv.

amd-quark cannot share quantbench's environment (it caps onnxruntime at 1.28 and onnx at 1.22, and
imports transformers), so this module runs in ``.engines/quark`` (:mod:`quantbench.peers.venvs`),
started by :mod:`quantbench.peers.worker` with ``model=None``. It imports only the standard library,
torch, this package's protocol and, inside :func:`quantize`, Quark (and onnx / onnxruntime, which
Quark's venv has).

What it runs is the flow of Quark's torchvision (ImageNet) example for FX graph mode:

1. the float model is the ``torch.export`` program of the job (``float.pt2``), whose ``.module()``
   is the flattened ``torch.fx.GraphModule`` that ``QuantizationMode.fx_graph_mode`` requires;
2. ``ModelQuantizer(QConfig(global_quant_config=QLayerConfig(input_tensors=A, output_tensors=A,
   weight=W, bias=B), quant_mode=QuantizationMode.fx_graph_mode)).quantize_model(gm, calib)``,
   calibrating on exactly ``job.calibration()``, in order;
3. ``ModelQuantizer.freeze(model)`` (BatchNorm folded into the convolutions, Quark's post-quant
   hardware passes), which is the torch-side model returned;
4. ``quark.torch.export_onnx(frozen, dir, (x,), ...)``: Quark's QDQ ONNX exporter (TorchScript
   ``torch.onnx.export`` underneath), then the batch dimension made symbolic when the graph allows it.

The exported file is checked in onnxruntime (graph optimizations off, so QuantizeLinear /
DequantizeLinear run as written) against the frozen torch model on the first calibration batch. If
Quark's exporter fails or its file disagrees, ``torch.onnx.export(dynamo=True)`` of the frozen model
is tried and kept only if it passes the same check; otherwise ``onnx`` is None and a note says why.

Options (the engine's own names; anything else is a ValueError naming the key):

* ``scale_type``: ``"float"`` (default; ``PerTensorMinMaxObserver``) or ``"power_of_2"``;
* ``pow2_method``: ``"non_overflow"`` (default; ``PerTensorPowOf2MinMaxObserver``, what Quark's
  example calls ``--non_overflow``) or ``"mse"`` (``PerTensorPowOf2MinMSEObserver``); only with
  ``power_of_2``;
* ``per_channel``: per-output-channel weights (default False; ``PerChannel*Observer``, ``ch_axis=0``);
* ``symmetric``: symmetric int8 weights and activations (default True);
* ``weight_bits`` / ``act_bits``: 8 (default) or 4 (Quark's int4 dtype; float scales only: its
  power-of-two observers take int8/uint8/int32 only);
* ``qat``: ``None`` / ``False`` / ``"none"`` (default: PTQ), ``"tqt"`` or ``"static"`` (QAT, below);
  ``"lsq"`` is a valid name that is reported unsupported (:data:`LSQ_REASON`).

QAT (``qat: tqt | static``) follows the training flow of Quark's FX-mode vision example
(``examples/torch/vision/quantize.py``): ``quantize_model`` (calibrating on ``job.calibration()``), then
the user's own loop over the returned GraphModule, then ``ModelQuantizer.freeze`` and the same export
as PTQ. The job brings the data and the recipe: ``job.train_data`` (``train.pt``, one epoch of ``(x, y)``
classification batches) and ``job.qat`` (the run's ``train.qat`` keys plus ``method``; see
:func:`qat_recipe`). The loss is cross-entropy on the logits: the worker has no other task's loss.

* ``tqt``: ``TQTObserver`` everywhere (int8 per-tensor symmetric; weights and bias initialised with
  ``TQTThresholdInitMeth._3SD``, activations with ``_KL_J``, as in Quark's example); the scale is
  ``2^ceil(log2 t) / 128``, so power-of-two. The log2 thresholds (``TQTObserver._log_threshold``) train
  at ``quant_lr`` in their own param group, the weights at ``lr``.
* ``static``: the PTQ observers of the other options (e.g. ``PerTensorPowOf2MinMaxObserver`` with
  ``scale_type: power_of_2``), left on while training (Quark's ``GraphModule.train()``), so the scales
  follow the weights and activations until ``freeze_observers_after``; weights learn through
  Quark's straight-through fake quantization.

The FX graph is static, so training runs in batches of exactly the recipe's ``batch_size``: the float
program is re-exported at that batch from ``float_dynamic.pt2`` when ``float.pt2`` has another one.

Bias is int8 per-tensor with the weights' observer family (int8 everywhere, as in the Quark results
table quantbench reproduces: "INT8 per-tensor symmetric for weights, bias, inputs and outputs").
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from quantbench.peers.base import PeerOutput, Unsupported
from quantbench.peers.protocol import PeerJob, load_tensors

__all__ = ["CLASSIFICATION_ONLY", "DEFAULTS", "DISTRIBUTION", "LSQ_REASON", "QAT_METHODS", "QAT_RECIPE_DEFAULTS",
           "qat_method", "qat_recipe", "quark_specs", "quantize", "resolve_options", "tqt_specs"]

DISTRIBUTION = "amd-quark"

DEFAULTS: dict[str, Any] = {
    "scale_type": "float",
    "pow2_method": "non_overflow",
    "per_channel": False,
    "symmetric": True,
    "weight_bits": 8,
    "act_bits": 8,
    "qat": None,
}

#: The QAT methods this engine runs (``qat`` option / ``job.qat["method"]``).
QAT_METHODS = ("tqt", "static")

#: Why LSQ QAT is reported unsupported (the worker records it as the reason).
LSQ_REASON = (
    "quark: LSQ QAT does not run on CPU in amd-quark 0.13: LSQObserver's per-tensor fake quantize "
    "(quark.torch.kernel.lsq_quantize -> kernel_ext.fake_quantize_per_tensor_affine) raises "
    "'fake_quantize_per_tensor_affine is not implemented on non CUDA-devices', and the worker runs on CPU")

#: Why a job whose labels are not class indices (or that brings no training data) is not trained.
CLASSIFICATION_ONLY = "the isolated worker has only a classification loss"

#: The recipe values a job's ``qat`` leaves out: Quark's FX-mode vision example (ImageNet QAT:
#: Adam, weights 1e-5 x0.94 every 2000 steps, thresholds 1e-5 x0.5 every 1000, weight decay 1e-4 on
#: every group, 3 epochs). ``batch_size`` None: the batch size of the job's training batches.
QAT_RECIPE_DEFAULTS: dict[str, Any] = {
    "epochs": 3, "steps": None, "batch_size": None, "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-4,
    "momentum": 0.9, "decay_norm_and_bias": True, "scheduler": "step", "warmup_epochs": 0.0, "lr_decay": 0.94,
    "lr_decay_steps": 2000, "quant_lr": 1e-5, "quant_weight_decay": 1e-4, "quant_lr_decay": 0.5,
    "quant_lr_decay_steps": 1000, "freeze_observers_after": None, "freeze_bn_after": None,
    "label_smoothing": 0.0, "grad_clip": None,
}
#: The keys whose defaults above are the values of Quark's example (the others are neutral: off or none).
_QUARK_EXAMPLE_KEYS = ("epochs", "optimizer", "lr", "weight_decay", "scheduler", "lr_decay", "lr_decay_steps",
                       "quant_lr", "quant_weight_decay", "quant_lr_decay", "quant_lr_decay_steps")
#: ``train.qat`` keys of quantbench's own loop that the worker cannot apply (no validation set, no
#: checkpoints there); recorded in a note when the job sets them. ``seed``: shuffling uses ``job.seed``.
QAT_RECIPE_NOT_APPLIED = ("ema", "ema_decay", "ema_tau", "eval_every", "keep_best", "checkpoint_dir", "resume_dir",
                          "checkpoint_steps", "channels_last", "seed")
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = ("step", "cosine", "constant", "none")

#: Agreement (dB) between the exported ONNX model (onnxruntime, no graph optimizations) and Quark's
#: frozen torch model on the first calibration batch that always keeps the file.
ONNX_AGREEMENT_DB = 30.0
#: Relative size of the input perturbation that measures how far float rounding alone moves the
#: torch model's output (see :class:`_Checker`).
ROUNDING_PERTURBATION = 1e-5

_BITS = (8, 4)

INT4_ACTIVATIONS_NO_ONNX = (
    "no ONNX model: Quark's exporter writes int4 activations as int8 QuantizeLinear/DequantizeLinear "
    "(their 4-bit range is lost: the file ran at -0.4 dB from Quark's torch model on a ResNet-18), and its "
    "uint4_int4_flag relabels every Q/DQ of the model as int4, the int8 bias included; torch-side outputs only")


def resolve_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The defaults laid under ``options``, validated (ValueError names the key and the allowed values)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"quark: unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(DEFAULTS))}")
    resolved = {**DEFAULTS, **options}
    if resolved["scale_type"] not in ("float", "power_of_2"):
        raise ValueError(f"quark: scale_type={resolved['scale_type']!r}: expected 'float' or 'power_of_2'")
    if resolved["pow2_method"] not in ("non_overflow", "mse"):
        raise ValueError(f"quark: pow2_method={resolved['pow2_method']!r}: expected 'non_overflow' or 'mse'")
    if "pow2_method" in options and resolved["scale_type"] != "power_of_2":
        raise ValueError(f"quark: pow2_method={options['pow2_method']!r} applies only with scale_type='power_of_2' "
                         f"(got scale_type={resolved['scale_type']!r})")
    for key in ("per_channel", "symmetric"):
        if not isinstance(resolved[key], bool):
            raise ValueError(f"quark: {key}={resolved[key]!r}: expected true or false")
    for key in ("weight_bits", "act_bits"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in _BITS:
            raise ValueError(f"quark: {key}={value!r}: expected 8 or 4")
    qat = resolved["qat"]
    if qat in (None, False, "none"):
        resolved["qat"] = None
    elif qat not in (*QAT_METHODS, "lsq"):
        raise ValueError(f"quark: qat={qat!r}: expected none, 'tqt' or 'static' ('lsq' is reported unsupported)")
    elif qat == "tqt":  # TQT's thresholds are powers of two by construction; no min-max observer to pick
        if options.get("scale_type", "power_of_2") != "power_of_2":
            raise ValueError(f"quark: qat='tqt' learns power-of-two thresholds: scale_type must be 'power_of_2' "
                             f"(got {options['scale_type']!r})")
        if "pow2_method" in options:
            raise ValueError(f"quark: pow2_method={options['pow2_method']!r} does not apply with qat='tqt' "
                             "(TQTObserver initialises its thresholds itself)")
        resolved["scale_type"] = "power_of_2"
        resolved.pop("pow2_method")
    if resolved["scale_type"] != "power_of_2":
        resolved.pop("pow2_method")
    return resolved


def qat_method(opts: dict[str, Any], job: PeerJob) -> str | None:
    """The QAT method (``tqt`` / ``static`` / ``lsq``) of the ``qat`` option and ``job.qat["method"]``; None: PTQ."""
    recipe = dict(job.qat or {})
    named = recipe.get("method")
    if named in (None, False, "none"):
        named = None
    elif named not in (*QAT_METHODS, "lsq"):
        raise ValueError(f"quark: qat.method={named!r}: expected 'tqt' or 'static' ('lsq' is reported unsupported)")
    option = opts.get("qat")
    if option and named and option != named:
        raise ValueError(f"quark: the qat option ({option!r}) and the recipe's method (qat.method={named!r}) disagree")
    method = option or named
    if method is None and recipe:
        raise ValueError("quark: the job carries a QAT recipe (job.qat) but no method: set the qat option or "
                         "qat.method to 'tqt' or 'static'")
    return method


def _check_supported(opts: dict[str, Any], job: PeerJob) -> str | None:
    """Raise :class:`Unsupported` for what this engine does not run; returns the QAT method (None: PTQ)."""
    method = qat_method(opts, job)
    if method == "lsq":
        raise Unsupported(LSQ_REASON)
    if method == "tqt":
        if opts["per_channel"]:
            raise Unsupported("quark: TQT with per-channel weights: Quark's TQTObserver learns one threshold per "
                              "tensor (its TQTQuantize kernel is per-tensor)")
        if (opts["weight_bits"], opts["act_bits"]) != (8, 8):
            raise Unsupported("quark: TQT at 4 bits is not run by this engine: its Quark TQT recipe (the FX-mode "
                              "vision example) is int8, and Quark's ONNX exporter writes 4-bit activations as "
                              "8-bit Q/DQ")
        if not opts["symmetric"]:
            raise Unsupported("quark: asymmetric TQT: Quark's TQTObserver is symmetric (zero point 0)")
    if method is not None and 4 in (opts["weight_bits"], opts["act_bits"]):
        raise Unsupported("quark: 4-bit QAT is not run by this engine (its Quark QAT recipes are int8)")
    if method is not None and not job.train_data:
        raise Unsupported(f"quark: QAT needs the task's training batches (job.train_data, train.pt) and the job has "
                          f"none; {CLASSIFICATION_ONLY} (cross-entropy on (x, class index) batches)")
    if opts["scale_type"] == "power_of_2" and 4 in (opts["weight_bits"], opts["act_bits"]):
        raise Unsupported("quark: 4-bit power-of-two scales: Quark's power-of-two observers "
                          "(PerTensorPowOf2MinMaxObserver / ...MinMSEObserver) accept int8, uint8 and int32 only")
    return method


def quark_specs(opts: dict[str, Any]) -> dict[str, Any]:
    """Quark's ``QTensorConfig`` for input_tensors / output_tensors / weight / bias, from resolved options."""
    from quark.torch.quantization.config.config import QTensorConfig
    from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType
    from quark.torch.quantization.observer import observer as obs

    pow2 = opts["scale_type"] == "power_of_2"
    mse = pow2 and opts.get("pow2_method") == "mse"
    if not pow2:
        per_tensor, per_channel = obs.PerTensorMinMaxObserver, obs.PerChannelMinMaxObserver
    elif mse:
        per_tensor, per_channel = obs.PerTensorPowOf2MinMSEObserver, obs.PerChannelPowOf2MinMSEObserver
    else:
        per_tensor, per_channel = obs.PerTensorPowOf2MinMaxObserver, obs.PerChannelPowOf2MinMaxObserver
    scale_type = ScaleType.pof2 if pow2 else ScaleType.float
    dtype = {8: Dtype.int8, 4: Dtype.int4}

    def spec(bits: int, observer, symmetric: bool, channel: bool = False) -> QTensorConfig:
        return QTensorConfig(
            dtype=dtype[bits], observer_cls=observer, symmetric=symmetric, scale_type=scale_type,
            round_method=RoundType.half_even, is_dynamic=False,
            qscheme=QSchemeType.per_channel if channel else QSchemeType.per_tensor,
            ch_axis=0 if channel else None)

    activation = spec(opts["act_bits"], per_tensor, opts["symmetric"])
    weight = (spec(opts["weight_bits"], per_channel, opts["symmetric"], channel=True) if opts["per_channel"]
              else spec(opts["weight_bits"], per_tensor, opts["symmetric"]))
    bias = spec(8, per_tensor, True)
    return {"input_tensors": activation, "output_tensors": activation, "weight": weight, "bias": bias}


def tqt_specs() -> dict[str, Any]:
    """Quark's TQT ``QTensorConfig`` s, as its FX-mode vision example sets them: int8 per-tensor symmetric
    ``TQTObserver``; weights and bias initialised by 3 standard deviations, activations by KL-J."""
    from quark.torch.quantization.config.config import QTensorConfig, TQTSpec
    from quark.torch.quantization.config.type import (
        Dtype,
        QSchemeType,
        RoundType,
        ScaleType,
        TQTThresholdInitMeth,
    )
    from quark.torch.quantization.observer.tqt_observer import TQTObserver

    def spec(init) -> QTensorConfig:
        # scale_type is descriptive here: TQTObserver makes 2^ceil(log2 t) / 2^(b-1) whatever it says
        # (Quark's example passes ScaleType.float), and its FX passes treat it as a power-of-two observer.
        return QTensorConfig(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, observer_cls=TQTObserver,
                             symmetric=True, scale_type=ScaleType.pof2, round_method=RoundType.half_even,
                             is_dynamic=False, qat_spec=TQTSpec(threshold_init_meth=init))

    weight, activation = spec(TQTThresholdInitMeth._3SD), spec(TQTThresholdInitMeth._KL_J)
    return {"input_tensors": activation, "output_tensors": activation, "weight": weight, "bias": weight}


def _describe(spec) -> dict[str, Any]:
    qat_spec = getattr(spec, "qat_spec", None)
    init = getattr(qat_spec, "threshold_init_meth", None)
    return {"dtype": spec.dtype.name, "qscheme": spec.qscheme.name, "observer": spec.observer_cls.__name__,
            "symmetric": spec.symmetric, "scale_type": spec.scale_type.name, "round_method": spec.round_method.name,
            **({"ch_axis": spec.ch_axis} if spec.ch_axis is not None else {}),
            **({"threshold_init": init.name} if init is not None else {})}


def _quiet_environment() -> None:
    """Before Quark is imported: its logger at warnings, no progress bars, JIT kernels kept in the venv."""
    os.environ.setdefault("QUARK_LOG_LEVEL", "warning")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if sys.prefix != sys.base_prefix:  # a virtualenv: build Quark's kernels once, into it
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def _float_program(job: PeerJob, model, example: torch.Tensor) -> torch.fx.GraphModule:
    program = job.path(job.program)
    if program is not None and program.exists():
        return torch.export.load(program).module()
    if model is None:
        raise FileNotFoundError(f"quark: the job has no float program ({program}) and no model was given")
    if isinstance(model, torch.fx.GraphModule):
        return model
    return torch.export.export(model.eval(), (example,)).module()


def _batches(calib: list) -> list[torch.Tensor]:
    """Quark's calibration loop calls ``model(batch)``: single-input batches only."""
    out = []
    for batch in calib:
        if isinstance(batch, (list, tuple)):
            if len(batch) != 1:
                raise Unsupported(f"quark: a calibration batch has {len(batch)} inputs; Quark's calibration "
                                  "loop calls model(batch) with one positional input")
            batch = batch[0]
        out.append(batch)
    if not out:
        raise ValueError("quark: the job has no calibration batches")
    return out


def _sqnr_db(reference, test) -> float:
    reference = torch.as_tensor(reference, dtype=torch.float64)
    noise = (torch.as_tensor(test, dtype=torch.float64) - reference).pow(2).mean().item()
    signal = reference.pow(2).mean().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def _output_names(job: PeerJob) -> list[str]:
    """The float ONNX model's output names, so the peer's file is wired like the others (best effort)."""
    try:
        import onnx

        fp32 = job.path(job.fp32_onnx)
        if fp32 is not None and fp32.exists():
            return [o.name for o in onnx.load(str(fp32), load_external_data=False).graph.output]
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass
    return []


def _first_output(y):
    while isinstance(y, (list, tuple)):
        y = y[0]
    return y


class _Checker:
    """Runs an ONNX file in onnxruntime with graph optimizations off, against the frozen torch model.

    The two are not bit-exact: a value exactly halfway between two integer levels (e.g. a weight at
    -127.5 steps: Quark's symmetric int8 scale is 2 max|w| / 255) or a last-bit difference in a
    convolution's accumulation order that lands on such a tie is resolved one way by onnxruntime and
    the other by Quark's kernels, and a deep network carries that one-step difference to its output.
    How far, is measured on the torch model itself (``sensitivity_db``: its output against its
    output on the input perturbed by a relative :data:`ROUNDING_PERTURBATION`). So a file is kept
    when it agrees with the torch model to :data:`ONNX_AGREEMENT_DB`, or at least to 6 dB less than
    the torch model agrees with the float one (``quant_db``) and 3 dB: it may differ from Quark's
    model by ties, not by much more than quantization itself differs from float. A quantizer that is
    missing or has the wrong range (int4 activations written as int8) is caught before, by rule
    (:func:`_export`), where this test alone could not tell on a network that amplifies ties.
    """

    def __init__(self, frozen, example: torch.Tensor, float_reference, threads: int) -> None:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(example.shape, generator=generator) * (ROUNDING_PERTURBATION * example.float().std())
        with torch.no_grad():
            self.reference = _first_output(frozen(example)).detach().float()
            perturbed = _first_output(frozen(example + noise)).detach().float()
        self.sensitivity_db = _sqnr_db(self.reference, perturbed)
        self.quant_db = _sqnr_db(float_reference, self.reference) if float_reference is not None else -math.inf
        self.example = example.numpy()
        self.threads = threads

    def required_db(self) -> float:
        return min(ONNX_AGREEMENT_DB, max(self.quant_db - 6.0, 3.0))

    def _session(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = max(1, self.threads)
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def agreement_db(self, path: Path) -> float:
        session = self._session(path)
        out = session.run(None, {session.get_inputs()[0].name: self.example})[0]
        if tuple(out.shape) != tuple(self.reference.shape):
            raise ValueError(f"output shape {tuple(out.shape)} != torch's {tuple(self.reference.shape)}")
        return _sqnr_db(self.reference, out)

    def batch_is_free(self, path: Path, agreement: float) -> bool:
        """True when the file, with a symbolic batch, runs one sample and agrees as it did on the batch."""
        if self.example.shape[0] < 2:
            return False
        session = self._session(path)
        name = session.get_inputs()[0].name
        try:
            full = session.run(None, {name: self.example})[0]
            one = session.run(None, {name: self.example[:1]})[0]
        except Exception:  # noqa: BLE001 - a shape baked into the graph
            return False
        return one.shape[0] == 1 and _sqnr_db(full[:1], one) >= min(agreement, ONNX_AGREEMENT_DB)


def _symbolic_batch(model, batch: int) -> bool:
    """Make dim 0 of the graph inputs and outputs symbolic (``batch``) where it is ``batch``; clears value_info."""
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
            changed = True
    if changed:
        del model.graph.value_info[:]
    return changed


def _export(frozen, job: PeerJob, opts: dict[str, Any], example: torch.Tensor, float_reference, out: Path,
            ) -> tuple[Path | None, list[str], dict[str, float]]:
    """Quark's exporter first, torch.onnx.export(dynamo=True) second; the file kept must pass :class:`_Checker`."""
    if opts["act_bits"] == 4:
        return None, [INT4_ACTIVATIONS_NO_ONNX], {}
    import onnx

    notes: list[str] = []
    metrics: dict[str, float] = {}
    input_names = list(job.input_names[:1]) or ["x"]
    output_names = _output_names(job)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        checker = None
        notes.append("onnxruntime is not installed in Quark's venv: the exported ONNX model was not checked")
    else:
        checker = _Checker(frozen, example, float_reference, job.threads)

    def keep(candidate: Path, exporter: str) -> Path | None:
        if checker is None:
            shutil.copyfile(candidate, out)
            return out
        try:
            agreement = checker.agreement_db(candidate)
        except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot run is a failed export
            notes.append(f"{exporter}: onnxruntime cannot run its file ({type(exc).__name__}: {str(exc)[:200]})")
            return None
        metrics.update({"quark/onnx_vs_torch_sqnr_db": round(min(agreement, 999.0), 2),
                        "quark/torch_rounding_sensitivity_db": round(min(checker.sensitivity_db, 999.0), 2)})
        if agreement < checker.required_db():
            notes.append(f"{exporter}: its file disagrees with Quark's torch model ({agreement:.1f} dB < "
                         f"{checker.required_db():.1f} dB required on the first calibration batch)")
            return None
        if agreement < ONNX_AGREEMENT_DB:
            notes.append(f"the ONNX model agrees with Quark's torch model to {agreement:.1f} dB on the first "
                         f"calibration batch (Quark's model is {checker.quant_db:.1f} dB from float): rounding ties "
                         f"resolved differently by onnxruntime and Quark's kernels, carried to the output (a "
                         f"{ROUNDING_PERTURBATION:g} relative input perturbation moves Quark's model by "
                         f"{checker.sensitivity_db:.1f} dB)")
        model = onnx.load(str(candidate))
        if _symbolic_batch(model, example.shape[0]):
            onnx.save(model, str(out))
            if not checker.batch_is_free(out, agreement):
                shutil.copyfile(candidate, out)
                notes.append(f"the ONNX model's batch size is fixed at {example.shape[0]} (the graph bakes it in)")
        else:
            shutil.copyfile(candidate, out)
        return out

    work = out.parent / ".quark_export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        from quark.torch import export_onnx

        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                export_onnx(frozen, work, (example,), input_names=input_names, output_names=output_names)
            produced = work / "quark_model.onnx"
            if not produced.exists():
                raise FileNotFoundError(f"{produced} was not written")
            kept = keep(produced, "quark.torch.export_onnx")
            if kept is not None:
                return kept, notes, metrics
        except Exception as exc:  # noqa: BLE001 - fall back, with the reason noted
            notes.append(f"quark.torch.export_onnx failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        fallback = work / "torch_dynamo.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(frozen, (example,), str(fallback), input_names=input_names,
                                  output_names=output_names or None, dynamo=True, external_data=False)
            kept = keep(fallback, "torch.onnx.export(dynamo=True) fallback")
            if kept is not None:
                notes.append("ONNX written by torch.onnx.export(dynamo=True) of Quark's frozen model, "
                             "not by Quark's exporter")
                return kept, notes, metrics
        except Exception as exc:  # noqa: BLE001
            notes.append(f"torch.onnx.export(dynamo=True) fallback failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
        notes.append("no ONNX model: neither exporter produced a file that matches Quark's torch model")
        return None, notes, metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _method_notes(opts: dict[str, Any]) -> list[str]:
    notes = ["Quark FX graph mode (QuantizationMode.fx_graph_mode) on the torch.export program; "
             "BatchNorm folded into the convolutions by ModelQuantizer.freeze",
             "bias quantized to int8 per-tensor with the weights' observer family (Quark's FX-mode "
             "ImageNet recipe); onnxruntime does not fuse int8-bias QDQ convolutions into integer kernels"]
    if opts.get("qat") == "tqt":
        notes.append("TQT (Jain et al., arXiv 1903.08066): each tensor's scale is 2^ceil(log2 t) / 128 from its "
                     "learned threshold t (Quark's TQTObserver / TQTQuantize), so power-of-two")
    elif opts["scale_type"] == "power_of_2":
        notes.append(
            "Quark's power-of-two observers take the exponent as round(log2(scale)) of the min-max scale, not "
            "its ceiling (so a tensor's observed max can clip by up to 2^0.5), and keep the most frequent "
            "per-batch scale over calibration" + (" and QAT (until its observers freeze)"
                                                  if opts.get("qat") == "static" else "") + (
                "; the MSE variant tries 5 exponents around it on the last calibration batch only"
                if opts.get("pow2_method") == "mse" else ""))
    if opts["weight_bits"] == 4:
        notes.append("4-bit weights: Quark's int4 dtype with min-max float scales" + (
            "; the ONNX model holds them as int4-valued int8 initializers (Quark's exporter has no mixed "
            "int4/int8 mode)" if opts["act_bits"] == 8 else ""))
    return notes


def quantize(job: PeerJob, model=None) -> PeerOutput:
    """Quark FX graph mode PTQ (or QAT: ``qat: tqt | static``) of the job's float program, calibrated on
    ``job.calibration()``; QDQ ONNX to ``model.onnx``."""
    opts = resolve_options(job.options)
    method = _check_supported(opts, job)
    if method is not None and opts["qat"] != method:  # named by the recipe only: the option's checks too
        opts = resolve_options({**job.options, "qat": method})
        _check_supported(opts, job)
    _quiet_environment()
    calib = _batches(job.calibration())
    notes: list[str] = []
    train = recipe = graph = None
    if method is None:
        batch = _program_batch(job)
    else:  # the data and the recipe first: a job Quark cannot train fails before anything heavy
        train = _training_data(job)
        recipe, recipe_notes = qat_recipe(job.qat, default_batch=train.batch)
        notes += recipe_notes
        graph, batch, graph_note = _training_graph(job, model, recipe["batch_size"], calib[0])
        notes += [graph_note] if graph_note else []
    if batch is not None:  # Quark re-traces a static graph: every batch it sees has the program's size
        calib = _rebatch(calib, batch)
    example = calib[0]

    t_import = time.perf_counter()
    from quark.torch import ModelQuantizer
    from quark.torch.quantization.config.config import QConfig, QLayerConfig
    from quark.torch.quantization.config.type import QuantizationMode

    import_s = time.perf_counter() - t_import
    specs = tqt_specs() if method == "tqt" else quark_specs(opts)
    config = QConfig(global_quant_config=QLayerConfig(**specs), quant_mode=QuantizationMode.fx_graph_mode)

    if graph is None:
        graph = _float_program(job, model, example)
    with torch.no_grad():  # the float output on the first batch, to judge the export by (Quark edits the graph)
        float_reference = _first_output(graph(example)).detach().float()
    start = time.perf_counter()
    quantizer = ModelQuantizer(config)
    training: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantizer.quantize_model(graph, calib)
        calib_s = time.perf_counter() - start
        if method is not None:
            training = _train(quantized, method, train, recipe, batch, job.seed)
            with torch.no_grad():  # the trained fake-quant model, to check that freezing kept what it learned
                trained_reference = _first_output(quantized.eval()(example)).detach().float()
        frozen = ModelQuantizer.freeze(quantized.eval())
    quantize_s = time.perf_counter() - start
    if method is not None:
        with torch.no_grad():
            kept_db = _sqnr_db(trained_reference, _first_output(frozen(example)).detach().float())
        training["metrics"]["quark/frozen_vs_qat_sqnr_db"] = round(min(kept_db, 999.0), 2)

    root = Path(job.root)
    onnx_path, export_notes, metrics = _export(frozen, job, opts, example, float_reference, root / "model.onnx")
    metrics["quark/import_s"] = round(import_s, 2)
    options = {"quant_mode": "fx_graph_mode", "calibration_batches": len(calib),
               **{name: _describe(spec) for name, spec in specs.items()},
               "requested": {k: v for k, v in opts.items() if k != "qat"}}
    notes = _method_notes(opts) + notes
    if method is not None:
        metrics["quark/calib_s"] = round(calib_s, 3)
        metrics.update(training["metrics"])
        options["qat"] = {"method": method, **training["options"]}
        notes += training["notes"]
    notes += export_notes
    torch_model = frozen
    if batch is not None:
        torch_model = _FixedBatch(frozen, batch)
        notes.append(f"Quark's FX graph is static: calibration and evaluation run in chunks of {batch} images, "
                     "the last chunk padded with images from the start of the set")
    return PeerOutput(onnx=onnx_path, torch_model=torch_model, options=options,
                      notes=notes, metrics=metrics, quantize_s=quantize_s)


# ------------------------------------------------------------------------------------------------ QAT

class _TrainingData:
    """One epoch of classification batches, concatenated: ``x`` (N, ...) float, ``y`` (N,) int64 class indices."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, batches: int) -> None:
        self.x, self.y, self.batch, self.batches = x, y, batch, batches

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, size: int, generator: torch.Generator) -> tuple[list[torch.Tensor], int]:
        """Shuffled index batches of exactly ``size``: the last partial batch dropped (returned: how many
        images), or, with fewer than ``size`` images, one batch topped up by repeating the shuffled ones."""
        n = len(self)
        order = torch.randperm(n, generator=generator)
        if n < size:
            return [order.repeat(-(-size // n))[:size]], 0
        dropped = n % size
        return list(order[: n - dropped].split(size)), dropped


def _training_data(job: PeerJob) -> _TrainingData:
    """``train.pt`` checked: single-input ``(x, y)`` batches whose ``y`` are 1-D class indices (else Unsupported)."""
    path = job.path(job.train_data)
    if path is None or not path.exists():
        raise FileNotFoundError(f"quark: the job names train_data={job.train_data!r} but {path} does not exist")
    batches = load_tensors(path)
    if not batches:
        raise ValueError(f"quark: {path.name} holds no training batches")
    xs, ys = [], []
    for i, item in enumerate(batches):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise Unsupported(f"quark: {CLASSIFICATION_ONLY}: training batch {i} of {path.name} is not an (x, y) pair")
        x, y = item
        if isinstance(x, (list, tuple)):
            if len(x) != 1:
                raise Unsupported(f"quark: training batch {i} has {len(x)} inputs; the FX graph takes one")
            x = x[0]
        if (not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex
                or y.dtype == torch.bool or y.shape[0] != x.shape[0]):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise Unsupported(f"quark: {CLASSIFICATION_ONLY} (cross-entropy on 1-D int64 class indices); training "
                              f"batch {i} has targets {shape}"
                              + (f" {y.dtype}" if isinstance(y, torch.Tensor) else "") + f" for {x.shape[0]} inputs")
        xs.append(x.float())
        ys.append(y.long())
    if len({tuple(x.shape[1:]) for x in xs}) != 1:
        raise ValueError(f"quark: the training batches of {path.name} have different input shapes")
    return _TrainingData(torch.cat(xs), torch.cat(ys), int(xs[0].shape[0]), len(xs))


def _number(recipe: dict[str, Any], key: str, kind, *, minimum: float = 0.0, positive: bool = False,
            nullable: bool = False):
    value = recipe[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and float(value) != int(value)):
        raise ValueError(f"quark: qat.{key}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if value < minimum or (positive and value <= 0):
        raise ValueError(f"quark: qat.{key}={value!r}: expected {'> 0' if positive else f'>= {minimum:g}'}")
    return value


def qat_recipe(qat: dict[str, Any] | None, default_batch: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The job's QAT recipe over :data:`QAT_RECIPE_DEFAULTS`, checked (ValueError names the key), and notes:
    the keys taken from Quark's example, and those the worker does not apply."""
    given = {k: v for k, v in dict(qat or {}).items() if k != "method"}
    recipe = {**QAT_RECIPE_DEFAULTS, **{k: v for k, v in given.items() if k in QAT_RECIPE_DEFAULTS}}
    if recipe["batch_size"] is None:
        recipe["batch_size"] = default_batch
    for key in ("epochs",):
        recipe[key] = _number(recipe, key, int)
    for key in ("batch_size", "lr_decay_steps", "quant_lr_decay_steps"):
        recipe[key] = _number(recipe, key, int, positive=True)
    recipe["steps"] = _number(recipe, "steps", int, positive=True, nullable=True)
    for key in ("lr", "quant_lr", "lr_decay", "quant_lr_decay"):
        recipe[key] = _number(recipe, key, float, positive=True)
    for key in ("weight_decay", "quant_weight_decay", "momentum", "warmup_epochs", "label_smoothing"):
        recipe[key] = _number(recipe, key, float)
    for key in ("freeze_observers_after", "freeze_bn_after"):
        recipe[key] = _number(recipe, key, float, nullable=True)
    recipe["grad_clip"] = _number(recipe, "grad_clip", float, positive=True, nullable=True)
    if recipe["optimizer"] not in _OPTIMIZERS:
        raise ValueError(f"quark: qat.optimizer={recipe['optimizer']!r}: expected one of {', '.join(_OPTIMIZERS)}")
    if recipe["scheduler"] not in _SCHEDULERS:
        raise ValueError(f"quark: qat.scheduler={recipe['scheduler']!r}: expected one of {', '.join(_SCHEDULERS)}")
    if not isinstance(recipe["decay_norm_and_bias"], bool):
        raise ValueError(f"quark: qat.decay_norm_and_bias={recipe['decay_norm_and_bias']!r}: expected true or false")
    if recipe["steps"] is None and recipe["epochs"] == 0:
        raise ValueError("quark: qat.epochs=0 and no qat.steps: nothing to train")
    notes = []
    defaulted = sorted(k for k in _QUARK_EXAMPLE_KEYS if k not in given)
    if defaulted:
        notes.append("QAT recipe keys the job left out, from Quark's FX-mode vision example: "
                     + ", ".join(f"{k}={recipe[k]}" for k in defaulted))
    skipped = sorted(k for k in given if k in QAT_RECIPE_NOT_APPLIED)
    if skipped:
        notes.append("QAT recipe keys not applied by the isolated worker (no validation set or checkpoints there; "
                     "it keeps the last weights, and shuffles with the run's seed): " + ", ".join(skipped))
    unknown = sorted(k for k in given if k not in QAT_RECIPE_DEFAULTS and k not in QAT_RECIPE_NOT_APPLIED)
    if unknown:
        notes.append("QAT recipe keys unknown to the quark worker, ignored: " + ", ".join(unknown))
    return recipe, notes


def _training_graph(job: PeerJob, model, batch: int, example: torch.Tensor
                    ) -> tuple[torch.fx.GraphModule, int, str | None]:
    """The float GraphModule at the training batch size: ``float.pt2`` when it has that batch, else
    ``float_dynamic.pt2`` (or ``model``) re-exported at it; failing that, ``float.pt2`` at its own batch."""
    static = _program_batch(job)
    if static == batch:
        return torch.export.load(job.path(job.program)).module(), batch, None
    dynamic = job.path(job.program_dynamic)
    source = torch.export.load(dynamic).module() if dynamic is not None and dynamic.exists() else model
    why = "no dynamic-batch program to re-export"
    if source is not None:
        shape = (batch, *example.shape[1:])
        try:
            graph = torch.export.export(source, (torch.zeros(shape, dtype=example.dtype),)).module()
            return graph, batch, (None if static is None else
                                  f"the float program was re-exported at the training batch size {batch} "
                                  f"(float.pt2 has {static}): Quark's FX graph is static")
        except Exception as exc:  # noqa: BLE001 - fall back to the static program, noted
            why = f"re-exporting at batch {batch} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if static is None:
        raise FileNotFoundError(f"quark: no float program for QAT at batch {batch}: {why}")
    return (torch.export.load(job.path(job.program)).module(), static,
            f"QAT ran in batches of {static} (the static float program's), not the recipe's {batch}: {why}")


def _lr_lambda(recipe: dict[str, Any], decay: float, period: int, total: int, steps_per_epoch: int):
    """The per-step LR factor of one param group (quantbench's schedules, stepped once per optimizer step)."""
    name = recipe["scheduler"]
    if name == "step":
        return lambda i: decay ** (i // max(1, period))
    if name == "cosine":
        warmup = min(int(round(recipe["warmup_epochs"] * steps_per_epoch)), max(total - 1, 0))

        def cosine(i: int) -> float:
            if i < warmup:
                return (i + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

        return cosine
    return lambda i: 1.0


def _optimizer(model, recipe: dict[str, Any], quant_params: list, total: int, steps_per_epoch: int):
    """Weights at ``lr`` / ``weight_decay``, quantizer parameters at ``quant_lr`` / ``quant_weight_decay``;
    one LambdaLR factor per group."""
    quant_ids = {id(p) for p in quant_params}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    groups = []
    weight_group = {"lr": recipe["lr"], "decay": recipe["lr_decay"], "period": recipe["lr_decay_steps"]}
    if recipe["decay_norm_and_bias"]:
        groups.append({"params": weights, "weight_decay": recipe["weight_decay"], "name": "weights", **weight_group})
    else:
        groups.append({"params": [p for p in weights if p.dim() > 1], "weight_decay": recipe["weight_decay"],
                       "name": "weights", **weight_group})
        groups.append({"params": [p for p in weights if p.dim() <= 1], "weight_decay": 0.0,
                       "name": "weights_no_decay", **weight_group})
    groups.append({"params": quant_params, "lr": recipe["quant_lr"], "weight_decay": recipe["quant_weight_decay"],
                   "name": "quantizers", "decay": recipe["quant_lr_decay"], "period": recipe["quant_lr_decay_steps"]})
    groups = [g for g in groups if g["params"]]
    name = recipe["optimizer"]
    if name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"],
                                    nesterov=recipe["momentum"] > 0)
    else:
        optimizer = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(groups, lr=recipe["lr"])
    lambdas = [_lr_lambda(recipe, g["decay"], g["period"], total, steps_per_epoch) for g in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _freeze_step(epochs: float | None, steps_per_epoch: int) -> int | None:
    return None if epochs is None else int(round(epochs * steps_per_epoch))


def _train(model, method: str, data: _TrainingData, recipe: dict[str, Any], batch: int, seed: int) -> dict[str, Any]:
    """Quark's QAT loop on the calibrated GraphModule: cross-entropy, the recipe's optimizer, schedules and
    freeze points. Returns ``{"metrics", "options", "notes"}``."""
    from quark.torch.quantization.graph.torch_utils import QUANT_CONV_WITH_BN
    from quark.torch.quantization.observer.tqt_observer import TQTObserver
    from quark.torch.quantization.tensor_quantize import StaticScaledFakeQuantize

    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, StaticScaledFakeQuantize)}
    tqt = {name: m for name, m in quantizers.items() if isinstance(m.observer, TQTObserver)}
    static = {name: m for name, m in quantizers.items() if name not in tqt}
    quant_params = [m.observer._log_threshold for m in tqt.values()]
    scales_before = {name: m.scale.detach().clone() for name, m in quantizers.items()}
    log2t_before = torch.cat([p.detach().reshape(-1) for p in quant_params]) if quant_params else None

    generator = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = len(data.epoch(batch, torch.Generator().manual_seed(0))[0])
    total = recipe["steps"] if recipe["steps"] is not None else recipe["epochs"] * steps_per_epoch
    optimizer, scheduler = _optimizer(model, recipe, quant_params, total, steps_per_epoch)
    freeze_observers_at = _freeze_step(recipe["freeze_observers_after"], steps_per_epoch)
    freeze_bn_at = _freeze_step(recipe["freeze_bn_after"], steps_per_epoch)
    conv_bn = [m for m in model.modules() if isinstance(m, QUANT_CONV_WITH_BN)]

    # Quark's GraphModule.train(): BN folding on batch statistics, dropout on, every static quantizer's
    # observer on (TQT's observer only initialises once, then keeps its scale buffer in step with the threshold).
    model.train()
    observers_frozen_at = bn_frozen_at = None
    losses: list[list[float]] = []
    dropped = 0
    step = 0
    step_s: list[float] = []
    start = time.perf_counter()
    while step < total:
        batches, dropped = data.epoch(batch, generator)
        epoch_losses: list[float] = []
        for index in batches:
            if step >= total:
                break
            if (observers_frozen_at is None and static and freeze_observers_at is not None
                    and step >= freeze_observers_at):
                for m in static.values():  # TQT's observers stay on: they only copy the learned threshold
                    m.disable_observer()
                observers_frozen_at = step
            if bn_frozen_at is None and freeze_bn_at is not None and step >= freeze_bn_at:
                for m in conv_bn:
                    m.freeze_bn_stats()  # running statistics from here on, in the fold as in the frozen model
                bn_frozen_at = step
            t_step = time.perf_counter()
            logits = model(data.x[index])
            if isinstance(logits, (list, tuple)) and len(logits) == 1:
                logits = logits[0]
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise Unsupported(f"quark: {CLASSIFICATION_ONLY}: the model's output is {shape}, "
                                  "not (batch, classes) logits")
            loss = torch.nn.functional.cross_entropy(logits, data.y[index], label_smoothing=recipe["label_smoothing"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"quark: QAT loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               recipe["grad_clip"])
            optimizer.step()
            scheduler.step()
            epoch_losses.append(float(loss.detach()))
            step_s.append(time.perf_counter() - t_step)
            step += 1
        losses.append(epoch_losses)
    train_s = time.perf_counter() - start
    model.eval()  # Quark's eval(): BN on running statistics, observers off, fake quantization on
    for m in tqt.values():  # the scale buffers the frozen model exports, from the thresholds as last updated
        m.calculate_qparams(m.scale)

    changed = sum(not torch.equal(scales_before[name], m.scale) for name, m in quantizers.items())
    metrics: dict[str, float] = {
        "quark/qat_s": round(train_s, 3), "quark/qat_steps": float(step), "quark/qat_batch": float(batch),
        # the median step (the first one also loads Quark's kernels), forward + backward + update
        "quark/qat_step_ms": round(1000.0 * sorted(step_s)[len(step_s) // 2], 2) if step_s else 0.0,
        "quark/qat_quantizers": float(len(quantizers)), "quark/qat_scales_changed": float(changed)}
    for i, epoch_losses in enumerate(losses):
        if epoch_losses:
            metrics[f"quark/qat_loss_epoch{i}"] = round(sum(epoch_losses) / len(epoch_losses), 6)
    if losses and losses[0]:
        metrics["quark/qat_loss_first_step"] = round(losses[0][0], 6)
    if quant_params:
        log2t = torch.cat([p.detach().reshape(-1) for p in quant_params])
        metrics["quark/tqt_log2_threshold_mean_abs_change"] = round(float((log2t - log2t_before).abs().mean()), 6)
        metrics["quark/tqt_thresholds_moved"] = float(int((log2t != log2t_before).sum()))

    frozen_obs = ("never" if observers_frozen_at is None else f"at step {observers_frozen_at}")
    frozen_bn = ("never" if bn_frozen_at is None else f"at step {bn_frozen_at}")
    notes = [f"QAT ({method}) after Quark's FX-mode vision example: calibrated on the calibration batches "
             + ("(which set the TQT thresholds: weights and bias by 3 standard deviations, activations by KL-J), "
                if method == "tqt" else "(the static observers' starting scales), ")
             + f"then {step} optimizer steps of {batch} images ({len(losses)} epoch(s) of {steps_per_epoch} steps over "
             f"the job's {len(data)} training images, reshuffled each epoch with the run's seed"
             + (f", the last {dropped} images of each shuffled epoch dropped" if dropped else "")
             + (", topped up by repetition to one batch" if len(data) < batch else "")
             + f"), cross-entropy on the logits, {recipe['optimizer']} with the weights at lr={recipe['lr']:g} "
             f"(weight_decay={recipe['weight_decay']:g}) and "
             + (f"the {len(quant_params)} log2 thresholds at quant_lr={recipe['quant_lr']:g} "
                f"(weight_decay={recipe['quant_weight_decay']:g})" if quant_params
                else "no learned quantizer parameters")
             + f", {recipe['scheduler']} schedule; the last weights are kept (no validation in the worker)"]
    if method == "tqt":
        notes.append("freeze_observers_after does not apply to TQT: its observers only initialise the learned "
                     "thresholds (Quark's TQTObserver); BatchNorm statistics frozen " + frozen_bn)
    else:
        notes.append(f"static observers frozen {frozen_obs} (freeze_observers_after), BatchNorm statistics frozen "
                     f"{frozen_bn} (freeze_bn_after; Quark's QuantizedConvBatchNorm2d.freeze_bn_stats)")
    options = {"recipe": dict(recipe), "steps": step, "steps_per_epoch": steps_per_epoch, "batch": batch,
               "train_images": len(data), "dropped_per_epoch": dropped, "seed": int(seed),
               "observers_frozen_at_step": observers_frozen_at, "bn_frozen_at_step": bn_frozen_at,
               "loss": "cross_entropy"}
    return {"metrics": metrics, "options": options, "notes": notes}


def _program_batch(job: PeerJob) -> int | None:
    """The batch size the job's static float program was captured at (None: no program file)."""
    path = job.path(job.program)
    if path is None or not path.exists():
        return None
    program = torch.export.load(path)
    shapes = [v.shape for v in (n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
                                and n.name not in program.graph_signature.inputs_to_parameters
                                and n.name not in program.graph_signature.inputs_to_buffers) if v is not None]
    return int(shapes[0][0]) if shapes and len(shapes[0]) and isinstance(shapes[0][0], int) else None


def _rebatch(batches: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """The same images, in order, in batches of exactly ``size`` (the last padded from the start)."""
    images = torch.cat(batches)
    n = images.shape[0]
    pad = (-n) % size
    if pad:
        images = torch.cat([images, images[:pad].repeat((-(-pad // max(n, 1)),) + (1,) * (images.dim() - 1))[:pad]])
    return list(images.split(size))


class _FixedBatch:
    """A static-batch model called on any batch: split into chunks of its size, the last padded, outputs cut back."""

    def __init__(self, model, size: int) -> None:
        self.model, self.size = model, size

    def __call__(self, x: torch.Tensor):
        n = x.shape[0]
        outs = [self.model(chunk) for chunk in _rebatch([x], self.size)]
        if isinstance(outs[0], (list, tuple)):
            return type(outs[0])(torch.cat(parts)[:n] for parts in zip(*outs))
        return torch.cat(outs)[:n]
