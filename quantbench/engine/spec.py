"""Quantization policy as data: specs, per-op configs and the global Config.

A :class:`QuantizationSpec` says how one tensor is quantized (integer type,
granularity, symmetry, scale type, rounding, observer, learnable method). A
:class:`QuantizationConfig` groups the specs an op applies to its weight,
bias, activation inputs and output. A :class:`Config` holds the global
QuantizationConfig plus overrides by op type and by node name, and an exclude
list. All three are frozen dataclasses that validate themselves at
construction, so an invalid combination fails where it is written, naming the
field.

Shaped after AMD Quark's FX-mode ``Config`` and PT2E's ``QuantizationSpec``
(torchao ``quantization/pt2e/quantizer/quantizer.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from quantbench.engine.errors import SpecError
from quantbench.registry import close_matches

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DTYPES",
    "IntType",
    "QuantizationSpec",
    "QuantizationConfig",
    "Config",
    "SpecError",
]


@dataclass(frozen=True)
class IntType:
    """An integer grid: its range and the torch dtype that stores it.

    int4 values are stored in int8 containers (ONNX DequantizeLinear of int8
    initializers whose values lie in [-8, 7]); that is exact and fuses in
    onnxruntime, which has no int4 activation kernels.
    """

    name: str
    qmin: int
    qmax: int
    storage_name: str  # a torch dtype's name: this module does not import torch (the CLI reads it to check configs)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def storage(self) -> Any:
        """The ``torch.dtype`` that holds the integers."""
        import torch

        return getattr(torch, self.storage_name)


DTYPES: dict[str, IntType] = {
    t.name: t
    for t in (
        IntType("int4", -8, 7, "int8"),
        IntType("uint4", 0, 15, "uint8"),
        IntType("int8", -128, 127, "int8"),
        IntType("uint8", 0, 255, "uint8"),
        IntType("int16", -32768, 32767, "int16"),
        IntType("int32", -(2**31), 2**31 - 1, "int32"),
    )
}

QSCHEMES = ("per_tensor", "per_channel")
SCALE_TYPES = ("float", "pow2")
ROUND_METHODS = ("half_even", "half_up", "floor")
LEARNABLE = ("none", "lsq", "tqt")


#: What each QuantizationSpec field accepts, appended to a refusal of its type (choices come from the tuples above).
_ACCEPTS = {
    "dtype": f"one of {sorted(DTYPES)}",
    "qscheme": f"one of {list(QSCHEMES)}",
    "ch_axis": "an axis of the weight, e.g. 0 (output channels) or -1 (the last)",
    "observer": "a name of quantbench.engine.observers.list_observers()",
    "scale_type": f"one of {list(SCALE_TYPES)}",
    "round_method": f"one of {list(ROUND_METHODS)}",
    "learnable": f"one of {list(LEARNABLE)}",
    "percentile": "in (50, 100]",
    "averaging_constant": "in (0, 1]",
}


def _check_type(name: str, value: Any, expected: type, owner: str = "QuantizationSpec") -> None:
    """bool fields take bools, int fields ints (not bools), float fields any real number, str fields strings."""
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        article = "an" if expected.__name__[0] in "aeiou" else "a"
        accepts = f" ({_ACCEPTS[name]})" if owner == "QuantizationSpec" and name in _ACCEPTS else ""
        raise SpecError(f"{owner}.{name}={value!r} must be {article} {expected.__name__}, "
                        f"not {type(value).__name__}{accepts}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        names = [str(a) for a in allowed]
        close = [a for a in names if a.lower() == str(value).lower()] or close_matches(str(value), names)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise SpecError(f"QuantizationSpec.{name}={value!r} is not one of {list(allowed)}{hint}")


@dataclass(frozen=True)
class QuantizationSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: integer grid, a key of :data:`DTYPES` (int8, uint8, int4, int16,
            int32 for bias).
        qscheme: ``per_tensor`` or ``per_channel`` (with ``ch_axis``).
        ch_axis: channel axis for per-channel quantization.
        observer: how the range is estimated, a name of the observer
            registry (:func:`~quantbench.engine.observers.list_observers`):
            ``minmax``, ``moving_average``, ``percentile`` (histogram) or ``mse``. With ``scale_type="pow2"``,
            ``minmax`` gives the non-overflow power of two and ``mse`` searches
            exponents around it.
        symmetric: zero point 0 (signed types) instead of an affine range.
        scale_type: ``float`` or ``pow2`` (scale = 2^-k, an integer shift on
            hardware).
        round_method: ``half_even`` (what ONNX QuantizeLinear does),
            ``half_up`` or ``floor``.
        is_dynamic: runtime-computed scales; not supported by this static
            engine (kept for API shape; raises if set).
        narrow_range: use ``qmin + 1`` (e.g. [-127, 127]) so the grid is
            symmetric. Weights only: ONNX QuantizeLinear cannot express it for
            activations.
        learnable: QAT method for the scale: ``none`` (static, observer
            driven), ``lsq`` (float step, arXiv 1902.08153) or ``tqt`` (log2
            threshold, pow2 scale, arXiv 1903.08066).
        percentile: the percentile kept by the ``percentile`` observer.
        averaging_constant: update rate of the ``moving_average`` observer.
    """

    dtype: str = "int8"
    qscheme: str = "per_tensor"
    ch_axis: int = 0
    observer: str = "minmax"
    symmetric: bool = True
    scale_type: str = "float"
    round_method: str = "half_even"
    is_dynamic: bool = False
    narrow_range: bool = False
    learnable: str = "none"
    percentile: float = 99.99
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the type first: a typo such as ch_axis='x' is refused here
            _check_type(f.name, getattr(self, f.name), type(f.default))
        if self.dtype not in DTYPES:
            _choice("dtype", self.dtype, tuple(sorted(DTYPES)))
        _choice("qscheme", self.qscheme, QSCHEMES)
        _choice("scale_type", self.scale_type, SCALE_TYPES)
        _choice("round_method", self.round_method, ROUND_METHODS)
        _choice("learnable", self.learnable, LEARNABLE)
        from quantbench.engine.observers import OBSERVERS  # imports torch: not at module level

        _choice("observer", self.observer, tuple(OBSERVERS.list()))
        if self.is_dynamic:
            raise SpecError(
                "QuantizationSpec.is_dynamic=True is not supported: quantbench builds static "
                "integer graphs; use is_dynamic=False"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise SpecError(f"QuantizationSpec.percentile={self.percentile} must be in (50, 100]")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise SpecError(
                f"QuantizationSpec.averaging_constant={self.averaging_constant} must be in (0, 1]"
            )
        itype = DTYPES[self.dtype]
        if self.symmetric and not itype.signed:
            raise SpecError(
                f"QuantizationSpec.symmetric=True needs a signed dtype, got dtype={self.dtype!r}; "
                "use symmetric=False for unsigned types"
            )
        if self.scale_type == "pow2" and not self.symmetric:
            raise SpecError(
                "QuantizationSpec.scale_type='pow2' needs symmetric=True (power-of-two "
                "hardware has no zero point)"
            )
        if self.learnable == "tqt" and self.scale_type != "pow2":
            raise SpecError("QuantizationSpec.learnable='tqt' needs scale_type='pow2' (TQT learns a log2 threshold)")
        if self.learnable == "lsq" and self.scale_type != "float":
            raise SpecError("QuantizationSpec.learnable='lsq' needs scale_type='float' (LSQ learns a float step)")
        if self.learnable != "none" and not self.symmetric:
            raise SpecError(f"QuantizationSpec.learnable={self.learnable!r} needs symmetric=True")
        if self.narrow_range and not itype.signed:
            raise SpecError("QuantizationSpec.narrow_range=True needs a signed dtype")
        if self.dtype == "int32" and self.scale_type == "pow2" and self.observer == "mse":
            raise SpecError("QuantizationSpec.observer='mse' is pointless for int32 (bias) specs")

    @property
    def itype(self) -> IntType:
        return DTYPES[self.dtype]

    @property
    def qmin(self) -> int:
        return self.itype.qmin + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return self.itype.qmax

    @property
    def per_channel(self) -> bool:
        return self.qscheme == "per_channel"

    def replace(self, **changes: Any) -> QuantizationSpec:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


#: The options learned rounding takes, layer by layer (AdaRound) or block by block (BRECQ).
_ROUNDING_OPTIONS: dict[str, tuple] = {
    "batch_size": (int, 32, "a positive int: samples per step"),
    "lr": (float, 1e-2, "a positive float: Adam's learning rate for the rounding variables"),
    "reg_weight": (float, 0.01, "a positive float: lambda of the rounding regularizer"),
    "warmup": (float, 0.2, "in [0, 1): the fraction of steps without the regularizer"),
    "beta_start": (float, 20.0, "a positive float: the regularizer's annealed exponent at the start"),
    "beta_end": (float, 2.0, "a positive float: ... at the end"),
    "seed": (int, 0, "an int"),
}

#: The advanced PTQ algorithms a :class:`Config` may run, in the order of their stages, and the
#: options each accepts: name -> (type, default, what it accepts). ``stage`` orders them: ``float``
#: runs on the float graph before quantizers exist (CLE), ``allocate`` chooses per-layer bit widths
#: (it quantizes and calibrates twice), ``weights`` edits the weights of the calibrated graph with
#: the calibration data (bias correction, AdaRound, block reconstruction), in the order given.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "cle": {
        "stage": "float",
        "doc": "cross-layer equalization with high-bias absorption (Nagel et al., arXiv 1906.04721)",
        "options": {
            "iterations": (int, 20, "a positive int: equalization sweeps over the chains"),
            "relu6": (str, "relu", "'relu' (ReLU6 between equalized layers becomes ReLU, as DFQ does) or 'keep'"),
            "absorb_bias": (bool, True, "a bool: high-bias absorption from the calibration statistics"),
            "pow2_align": (bool, False, "a bool: then scale each link by one factor that puts its tensors' ranges "
                                        "just under powers of two (exact, ReLU6 included)"),
        },
    },
    "mixed_precision": {
        "stage": "allocate",
        "doc": "per-layer weight bit widths under a budget, from the layers' sensitivity",
        "options": {
            "low_bits": (int, 4, "4 or 8"),
            "high_bits": (int, 8, "4 or 8, above low_bits"),
            "budget": (float, 0.75, "in (0, 1]: the allowed cost as a fraction of every layer at high_bits"),
            "cost": (str, "size", "'size' (weight bits) or 'bops' (bit operations)"),
        },
    },
    "bias_correction": {
        "stage": "weights",
        "doc": "empirical bias correction of the output shift weight quantization causes (arXiv 1906.04721)",
        "options": {
            "mode": (str, "empirical", "'empirical' (calibration data) or 'analytic' (BN statistics, "
                                       "empirical where a layer has none)"),
        },
    },
    "adaround": {
        "stage": "weights",
        "doc": "layer-wise learned rounding of weights, scales fixed (Nagel et al., arXiv 2004.10568)",
        "options": {
            **_ROUNDING_OPTIONS,
            "iters": (int, 1000, "a positive int: optimizer steps per layer"),
        },
    },
    "brecq": {
        "stage": "weights",
        "doc": "block reconstruction (Li et al., BRECQ, arXiv 2102.05426) with QDrop (Wei et al., arXiv 2203.05740)",
        "options": {
            **_ROUNDING_OPTIONS,
            "iters": (int, 2000, "a positive int: optimizer steps per block"),
            "act_lr": (float, 4e-5, "a float >= 0: learning rate of the activation steps (0: fixed)"),
            "qdrop": (float, 0.5, "in [0, 1]: the probability of dropping an activation quantization (0: BRECQ)"),
            "max_block_layers": (int, 4, "a positive int: weighted layers per block at most"),
        },
    },
}

_STAGE_ORDER = ("float", "allocate", "weights")


@dataclass(frozen=True)
class Algorithm:
    """One advanced PTQ step of a :class:`Config`: a name of :data:`ALGORITHMS` and its options.

    Unknown names and options, and options of the wrong type, are refused here with the
    valid choices; :meth:`get` returns an option or its default.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in ALGORITHMS:
            close = close_matches(str(self.name), list(ALGORITHMS))
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise SpecError(f"algorithm {self.name!r} is not one of {list(ALGORITHMS)}{hint}")
        if not isinstance(self.options, Mapping):
            raise SpecError(f"algorithm {self.name!r}: options must be a mapping, not {type(self.options).__name__}")
        table = ALGORITHMS[self.name]["options"]
        for key, value in self.options.items():
            if key not in table:
                close = close_matches(str(key), list(table))
                hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
                raise SpecError(f"algorithm {self.name!r} has no option {key!r}{hint}; its options: {sorted(table)}")
            expected, _, accepts = table[key]
            if expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if not ok:
                raise SpecError(f"algorithm {self.name!r}: {key}={value!r} must be {accepts}")
        self._check_values()
        object.__setattr__(self, "options", dict(self.options))

    def _check_values(self) -> None:
        def bad(key: str) -> SpecError:
            return SpecError(f"algorithm {self.name!r}: {key}={self.get(key)!r} must be "
                             f"{ALGORITHMS[self.name]['options'][key][2]}")

        for key in ALGORITHMS[self.name]["options"]:
            value = self.get(key)
            if key in ("iters", "batch_size", "iterations", "max_block_layers") and value < 1:
                raise bad(key)
            if key in ("lr", "reg_weight", "beta_start", "beta_end") and not value > 0:
                raise bad(key)
            if key == "act_lr" and value < 0:
                raise bad(key)
            if key == "warmup" and not 0 <= value < 1:
                raise bad(key)
            if key == "qdrop" and not 0 <= value <= 1:
                raise bad(key)
            if key == "budget" and not 0 < value <= 1:
                raise bad(key)
            if key in ("low_bits", "high_bits") and value not in (4, 8):
                raise bad(key)
            if key == "relu6" and value not in ("relu", "keep"):
                raise bad(key)
            if key == "mode" and value not in ("empirical", "analytic"):
                raise bad(key)
            if key == "cost" and value not in ("size", "bops"):
                raise bad(key)
        if self.name == "mixed_precision" and self.get("low_bits") >= self.get("high_bits"):
            raise SpecError(f"algorithm 'mixed_precision': low_bits={self.get('low_bits')} must be below "
                            f"high_bits={self.get('high_bits')}")

    @property
    def stage(self) -> str:
        return ALGORITHMS[self.name]["stage"]

    def get(self, key: str) -> Any:
        """The option ``key``, or its default."""
        if key in self.options:
            return self.options[key]
        return ALGORITHMS[self.name]["options"][key][1]

    @classmethod
    def parse(cls, entry: Any) -> Algorithm:
        """An :class:`Algorithm`, a name, or a mapping ``{name: ..., <option>: ...}`` (a scheme's YAML)."""
        if isinstance(entry, Algorithm):
            return entry
        if isinstance(entry, str):
            return cls(entry)
        if isinstance(entry, Mapping):
            if "name" not in entry:
                raise SpecError(f"algorithm entry {dict(entry)!r} has no 'name' (one of {list(ALGORITHMS)})")
            options = {k: v for k, v in entry.items() if k != "name"}
            return cls(entry["name"], options)
        raise SpecError(f"algorithm entry {entry!r} must be a name or a mapping with 'name', not {type(entry).__name__}")


@dataclass(frozen=True)
class QuantizationConfig:
    """The specs one op applies: weight, bias, activation inputs and output.

    ``None`` leaves that tensor in float. ``bias`` with ``dtype="int32"`` is a
    derived spec: its scale is always input scale x weight scale with zero
    point 0, which is what integer kernels (onnxruntime QLinearConv, NPUs)
    accumulate in. Any other bias dtype gets its own observer.
    """

    weight: QuantizationSpec | None = None
    bias: QuantizationSpec | None = None
    input_tensors: QuantizationSpec | None = None
    output_tensors: QuantizationSpec | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a dict or a dtype name where a spec belongs is refused here
            spec = getattr(self, f.name)
            if spec is not None and not isinstance(spec, QuantizationSpec):
                raise SpecError(f"QuantizationConfig.{f.name}={spec!r:.60} must be a QuantizationSpec or None, not "
                                f"{type(spec).__name__}; build it with QuantizationSpec(dtype=..., ...)")
        for name in ("input_tensors", "output_tensors"):
            spec = getattr(self, name)
            if spec is None:
                continue
            if spec.per_channel:
                raise SpecError(f"QuantizationConfig.{name}: per_channel activations are not supported; use per_tensor")
            if spec.narrow_range:
                raise SpecError(
                    f"QuantizationConfig.{name}.narrow_range=True cannot be exported: ONNX "
                    "QuantizeLinear clamps to the full range; use narrow_range=False"
                )
            if spec.dtype == "int32":
                raise SpecError(f"QuantizationConfig.{name}.dtype='int32' is for bias only")
        if self.bias is not None and self.weight is None:
            raise SpecError("QuantizationConfig.bias needs a weight spec (int32 bias scale = input x weight scale)")
        if self.bias is not None and self.bias.per_channel and self.bias.dtype != "int32":
            raise SpecError("QuantizationConfig.bias: per_channel is only derived (int32); use per_tensor")
        if self.weight is not None and self.weight.dtype == "int32":
            raise SpecError("QuantizationConfig.weight.dtype='int32' is for bias only")

    def replace(self, **changes: Any) -> QuantizationConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Config:
    """Global config plus overrides by op type and by node name, and excludes.

    Precedence when an op is annotated: node name > op type > global.

    Attributes:
        global_quant_config: the default for every op.
        op_type_quant_config: op type (short aten name, e.g. ``"conv2d"``,
            ``"linear"``, ``"add"``; see ``ops.OP_TYPES``) -> config.
        node_name_quant_config: exported node name -> config.
        exclude: node names, or module-path prefixes (``"features.0"``), left
            in float.
        fold_bn: fold BatchNorm into conv weights for PTQ.
        qat: the config is meant for quantization-aware training: BatchNorm
            and dropout stay in the graph (BN folding is simulated, Jacob et
            al., arXiv 1712.05877, sec. 3.2). Static QAT presets set it
            although none of their specs is learnable.
        algorithms: advanced PTQ steps run by ``quantize_model`` after (or, for CLE,
            before) calibration, in order: :class:`Algorithm` entries, names, or
            mappings ``{"name": "adaround", "iters": 2000}``. The stages keep their
            order: CLE, then mixed precision, then the weight steps (bias correction,
            AdaRound, block reconstruction) in the order given.
        name: a label (presets set it).
    """

    global_quant_config: QuantizationConfig
    op_type_quant_config: Mapping[str, QuantizationConfig] = field(default_factory=dict)
    node_name_quant_config: Mapping[str, QuantizationConfig] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True
    qat: bool = False
    algorithms: tuple[Algorithm, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.global_quant_config, QuantizationConfig):
            raise SpecError(f"Config.global_quant_config must be a QuantizationConfig, not "
                            f"{type(self.global_quant_config).__name__}; start from a preset: "
                            "quantbench.engine.presets.get(name)")
        for label, mapping in (("op_type_quant_config", self.op_type_quant_config),
                               ("node_name_quant_config", self.node_name_quant_config)):
            if not isinstance(mapping, Mapping):
                raise SpecError(f"Config.{label} must be a mapping of names to QuantizationConfig, not "
                                f"{type(mapping).__name__}")
            for key, value in mapping.items():
                if not isinstance(key, str):
                    raise SpecError(f"Config.{label} key {key!r} must be a str ("
                                    f"{'an op type such as conv2d' if label.startswith('op') else 'a node name'})")
                if not isinstance(value, QuantizationConfig):
                    raise SpecError(f"Config.{label}[{key!r}] must be a QuantizationConfig, not "
                                    f"{type(value).__name__}")
        if isinstance(self.exclude, str):
            raise SpecError("Config.exclude must be a list of node names or module prefixes, not a string")
        try:
            exclude = tuple(self.exclude)
        except TypeError:
            raise SpecError(f"Config.exclude must be a list of node names or module prefixes, not "
                            f"{type(self.exclude).__name__}") from None
        for entry in exclude:
            if not isinstance(entry, str):
                raise SpecError(f"Config.exclude entry {entry!r} must be a str (a node name or a module prefix "
                                "such as 'features.0')")
        for name in ("fold_bn", "qat", "name"):
            _check_type(name, getattr(self, name), type(getattr(Config, name)), owner="Config")
        object.__setattr__(self, "exclude", exclude)
        self._check_algorithms()

    def _check_algorithms(self) -> None:
        if isinstance(self.algorithms, (str, Mapping)) or not hasattr(self.algorithms, "__iter__"):
            entries = [self.algorithms] if self.algorithms else []
        else:
            entries = list(self.algorithms)
        algorithms = tuple(Algorithm.parse(a) for a in entries)
        stages = [_STAGE_ORDER.index(a.stage) for a in algorithms]
        for i in range(1, len(stages)):
            if stages[i] < stages[i - 1]:
                raise SpecError(f"Config.algorithms: {algorithms[i].name!r} cannot come after "
                                f"{algorithms[i - 1].name!r}; the order is cle, then mixed_precision, then "
                                "bias_correction / adaround / brecq")
        names = [a.name for a in algorithms if a.stage != "weights"]
        if len(set(names)) < len(names):
            raise SpecError(f"Config.algorithms names {names} more than once; cle and mixed_precision run once")
        if algorithms and self.for_training:
            raise SpecError(f"Config.algorithms {[a.name for a in algorithms]} are post-training steps; a QAT "
                            "config (qat=True or a learnable spec) trains instead: drop them or use a PTQ preset")
        if algorithms and not self.fold_bn and any(a.name == "cle" for a in algorithms):
            raise SpecError("Config.algorithms: 'cle' needs fold_bn=True (it equalizes the BN-folded weights)")
        object.__setattr__(self, "algorithms", algorithms)

    def for_node(self, node_name: str, op_type: str) -> QuantizationConfig:
        """The QuantizationConfig that applies to one node."""
        if node_name in self.node_name_quant_config:
            return self.node_name_quant_config[node_name]
        if op_type in self.op_type_quant_config:
            return self.op_type_quant_config[op_type]
        return self.global_quant_config

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def for_training(self) -> bool:
        """True if the config is meant for QAT: ``qat`` is set or a spec is learnable."""
        return self.qat or self.learnable

    @property
    def learnable(self) -> bool:
        """True if any spec asks for a learnable scale (QAT)."""
        configs = [self.global_quant_config, *self.op_type_quant_config.values(),
                   *self.node_name_quant_config.values()]
        return any(
            s is not None and s.learnable != "none"
            for c in configs
            for s in (c.weight, c.bias, c.input_tensors, c.output_tensors)
        )
