"""How a quantbench scheme maps to each peer engine's options: a table, not code paths.

A scheme is first reduced to its *features* (:class:`Features`: the weight and activation
dtypes, weight granularity, scale type, observers, activation symmetry, QAT method, the advanced
PTQ algorithms, per-layer mixed precision), read from the engine :class:`~quantbench.engine.Config`
the scheme builds (:func:`config_features`; a float scheme is ``Features(quantized=False)``), so a
user's own scheme maps as the shipped ones do. :data:`TABLE` then says, per
engine, per feature, per value, one of:

* options: the engine's own option values that express it exactly;
* :class:`Approx`: options that come close, and how they differ (recorded with the run and shown
  in the report);
* :class:`No`: the engine cannot express it, and why. Any such feature makes the whole scheme
  *unsupported* for the engine: the run records the reason instead of an approximation.

A feature value the table does not list for an engine is unsupported ("<engine> has no mapping for
<feature>=<value>"), so nothing is approximated silently. :func:`resolve` combines the features of
one scheme; :func:`mapping_table` writes the engine x scheme table for the docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["PEERS", "TABLE", "Approx", "Features", "EngineMapping", "No", "config_features", "mapping_table", "resolve"]


@dataclass(frozen=True)
class No:
    """The engine cannot express this feature value."""

    reason: str


@dataclass(frozen=True)
class Approx:
    """Options that come close; ``note`` says how the engine differs."""

    options: Mapping[str, Any]
    note: str


@dataclass(frozen=True)
class Features:
    """What a scheme asks for, in engine-neutral words."""

    quantized: bool = True
    qat: str = "none"  # none | static | lsq | tqt
    scale: str = "float"  # float | pow2
    weight_dtype: str = "int8"
    act_dtype: str = "int8"
    weight_granularity: str = "per_tensor"
    weight_observer: str = "minmax"
    act_observer: str = "minmax"
    act_symmetric: bool = True
    algorithms: tuple[str, ...] = ()
    mixed: bool = False

    def items(self) -> list[tuple[str, Any]]:
        out = [("quantized", self.quantized)]
        if not self.quantized:
            return out
        out += [("qat", self.qat), ("scale", self.scale), ("weight_dtype", self.weight_dtype),
                ("act_dtype", self.act_dtype), ("weight_granularity", self.weight_granularity),
                ("weight_observer", self.weight_observer), ("act_observer", self.act_observer),
                ("act_symmetric", self.act_symmetric), ("mixed", self.mixed)]
        out += [("algorithm", a) for a in self.algorithms]
        return out


def config_features(config) -> Features:
    """The features of an engine :class:`~quantbench.engine.Config`."""
    qc = config.global_quant_config
    weight, act = qc.weight, qc.input_tensors or qc.output_tensors
    specs = [s for s in (weight, act) if s is not None]
    learn = {s.learnable for s in specs} - {"none"}
    qat = "none" if not config.qat else (next(iter(sorted(learn))) if learn else "static")
    scale = "pow2" if any(s.scale_type == "pow2" for s in specs) else "float"
    algorithms = tuple(a.name for a in config.algorithms)
    return Features(
        qat=qat, scale=scale,
        weight_dtype=weight.dtype if weight else "float", act_dtype=act.dtype if act else "float",
        weight_granularity=weight.qscheme if weight else "per_tensor",
        weight_observer=weight.observer if weight else "minmax", act_observer=act.observer if act else "minmax",
        act_symmetric=bool(act.symmetric) if act else True,
        algorithms=algorithms,
        mixed=bool(config.node_name_quant_config) or "mixed_precision" in algorithms,
    )


_FLOAT = No("the float reference does not depend on the engine: engine=quantbench runs it")
_PTQ_ONLY = "is post-training only (no QAT)"

#: engine -> feature -> value -> options | Approx | No. ``*`` matches any value not listed.
TABLE: dict[str, dict[str, dict[Any, Any]]] = {
    "ort": {
        "quantized": {False: _FLOAT, True: {}},
        "qat": {"none": {}, "*": No(f"onnxruntime's quantize_static {_PTQ_ONLY}")},
        "scale": {"float": {}, "pow2": No("onnxruntime's quantize_static has no power-of-two scale constraint")},
        "weight_dtype": {"int8": {"weight_type": "QInt8"}, "int4": {"weight_type": "QInt4"}},
        # A symmetric int8 activation grid is written as uint8 with zero point 128 (the same grid, as quantbench's
        # own export does): onnxruntime's x86 integer kernels fuse U8S8, and leave most S8S8 convs in float.
        "act_dtype": {"int8": {"activation_type": "QUInt8"},
                      "uint8": {"activation_type": "QUInt8"},
                      "int4": No("onnxruntime has no integer kernels for 4-bit activations (weights only)")},
        "weight_granularity": {"per_tensor": {"per_channel": False}, "per_channel": {"per_channel": True}},
        "weight_observer": {"minmax": {}, "*": Approx({}, "weights use onnxruntime's min-max ranges")},
        "act_observer": {"minmax": {"calibrate_method": "MinMax"},
                         "moving_average": {"calibrate_method": "MinMax"},
                         "percentile": {"calibrate_method": "Percentile"},
                         "mse": Approx({"calibrate_method": "Entropy"},
                                       "activation ranges by entropy (KL) calibration, not MSE")},
        "act_symmetric": {True: {"symmetric_activation": True}, False: {"symmetric_activation": False}},
        "mixed": {False: {}, True: No("onnxruntime's quantize_static has no per-layer bit-width allocation")},
        "algorithm": {"*": No("onnxruntime's quantize_static has no {value}")},
    },
    "torchao": {
        "quantized": {False: _FLOAT, True: {}},
        "qat": {"none": {}, "*": No("this engine runs torchao's post-training flow only (its prepare_qat_pt2e "
                                     "observers learn no step for LSQ / TQT, and static QAT is not wired)")},
        "scale": {"float": {}, "pow2": No("X86InductorQuantizer has no power-of-two scale option")},
        "weight_dtype": {"int8": {}, "*": No("X86InductorQuantizer is int8 only")},
        "act_dtype": {"int8": Approx({}, "activations are uint8 asymmetric (X86InductorQuantizer's only "
                                         "activation scheme), with a histogram observer"),
                      "uint8": {}, "*": No("X86InductorQuantizer is int8 only")},
        "weight_granularity": {"per_tensor": Approx({"per_channel": False}, "per-tensor weights through the "
                                                    "quantizer's per-tensor config"),
                               "per_channel": {"per_channel": True}},
        "weight_observer": {"minmax": {}, "*": Approx({}, "weights use torchao's min-max observer")},
        "act_observer": {"*": Approx({}, "activation ranges from the X86 default HistogramObserver")},
        "act_symmetric": {"*": {}},
        "mixed": {False: {}, True: No("X86InductorQuantizer has no per-layer bit-width allocation")},
        "algorithm": {"*": No("torchao's PT2E flow has no {value}")},
    },
    "nncf": {
        "quantized": {False: _FLOAT, True: {}},
        "qat": {"none": {}, "*": No(f"nncf.quantize {_PTQ_ONLY}")},
        "scale": {"float": {}, "pow2": No("NNCF has no power-of-two scale constraint")},
        "weight_dtype": {"int8": {}, "*": No("NNCF's static quantization is 8-bit (its 4-bit path is "
                                             "weight-only compression, nncf.compress_weights)")},
        "act_dtype": {"int8": {"preset": "performance"}, "uint8": {"preset": "mixed"},
                      "*": No("NNCF's static quantization is 8-bit")},
        "weight_granularity": {"per_tensor": {"per_channel": False}, "per_channel": {"per_channel": True}},
        "weight_observer": {"*": Approx({}, "NNCF's own weight range estimation")},
        "act_observer": {"*": Approx({"fast_bias_correction": True},
                                     "NNCF's default PTQ pipeline: its activation range estimators and fast "
                                     "bias correction (on by default)")},
        "act_symmetric": {True: {}, False: {"preset": "mixed"}},
        "mixed": {False: {}, True: No("nncf.quantize has no per-layer bit-width allocation")},
        "algorithm": {"bias_correction": Approx({"fast_bias_correction": True}, "NNCF's fast bias correction"),
                      "*": No("nncf.quantize has no {value}")},
    },
    "quark": {
        "quantized": {False: _FLOAT, True: {}},
        # QAT in the worker: one epoch of the task's QAT batches (train.pt) and the run's recipe (job.qat);
        # a cross-entropy loss, so classification only.
        "qat": {"none": {}, "tqt": {"qat": "tqt"}, "static": {"qat": "static"},
                "lsq": No("Quark 0.13's LSQ fake-quantize has no CPU kernel (fake_quantize_per_tensor_affine "
                          "is CUDA-only)")},
        "scale": {"float": {"scale_type": "float"}, "pow2": {"scale_type": "power_of_2"}},
        "weight_dtype": {"int8": {"weight_bits": 8}, "int4": {"weight_bits": 4},
                         "*": No("this engine maps Quark's int8 / int4 weight configs only")},
        "act_dtype": {"int8": {"act_bits": 8}, "uint8": {"act_bits": 8},
                      "int4": No("Quark's ONNX exporter writes 4-bit activations as 8-bit Q/DQ"),
                      "*": No("this engine maps Quark's 8-bit activation configs only")},
        "weight_granularity": {"per_tensor": {"per_channel": False}, "per_channel": {"per_channel": True}},
        "weight_observer": {"minmax": {}, "mse": {"pow2_method": "mse"}, "*": Approx({}, "Quark's min-max")},
        "act_observer": {"minmax": {}, "moving_average": {}, "mse": {"pow2_method": "mse"},
                         "*": Approx({}, "Quark's min-max activation observer")},
        "act_symmetric": {True: {"symmetric": True},
                          False: Approx({"symmetric": False}, "asymmetric weights too (one `symmetric` switch)")},
        "mixed": {False: {}, True: No("this engine maps no Quark mixed-precision config")},
        "algorithm": {"*": No("this engine maps no Quark {value}")},
    },
}

#: The peer engines, in the order the reports show them (quantbench first, then these).
PEERS = tuple(TABLE)


@dataclass
class EngineMapping:
    """One scheme on one engine: ``status`` is ``supported``, ``approximate`` or ``unsupported``."""

    engine: str
    status: str
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def supported(self) -> bool:
        return self.status != "unsupported"


def _entry(engine: str, feature: str, value: Any):
    by_value = TABLE[engine].get(feature)
    if by_value is None:
        return No(f"{engine} has no mapping for {feature}")
    if value in by_value:
        return by_value[value]
    if "*" in by_value:
        return by_value["*"]
    return No(f"{engine} has no mapping for {feature}={value}")


def resolve(engine: str, feats: Features) -> EngineMapping:
    """How ``engine`` runs a scheme with ``feats``: its options, the approximations, or why it cannot."""
    if engine not in TABLE:
        raise KeyError(engine)
    options: dict[str, Any] = {}
    notes: list[str] = []
    for feature, value in feats.items():
        entry = _entry(engine, feature, value)
        if isinstance(entry, No):
            return EngineMapping(engine, "unsupported", reason=entry.reason.format(value=value))
        if isinstance(entry, Approx):
            options.update(entry.options)
            note = entry.note.format(value=value)
            if note not in notes:
                notes.append(note)
        else:
            options.update(entry)
    return EngineMapping(engine, "approximate" if notes else "supported", options, notes)


def mapping_table(schemes: Mapping[str, Features]) -> str:
    """Markdown: one row per scheme, one column per engine (options, the approximation, or the reason)."""
    lines = ["| scheme | " + " | ".join(PEERS) + " |", "|---|" + "---|" * len(PEERS)]
    for name, feats in schemes.items():
        cells = []
        for engine in PEERS:
            m = resolve(engine, feats)
            if not m.supported:
                cells.append(f"unsupported: {m.reason}")
            else:
                opts = ", ".join(f"{k}={v}" for k, v in m.options.items()) or "defaults"
                cells.append(opts + (f" (approx.: {'; '.join(m.notes)})" if m.notes else ""))
        lines.append(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
