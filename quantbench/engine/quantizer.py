"""ModelQuantizer: the public PTQ / QAT-ready entry point, and coverage.

The whole flow (every step GraphModule in, GraphModule out)::

    gm = capture(model.eval(), (x,))                    # torch.export ATen graph
    quantizer = ModelQuantizer(presets.get("int8_pow2"))
    qmodel = quantizer.quantize_model(gm, calib_loader)  # passes, annotate, insert, calibrate
    print(quantizer.coverage(qmodel))                   # every compute node left in float, and why
    frozen = quantizer.freeze(qmodel)                   # scales baked, int weights / int32 bias
    export_onnx(frozen, (x,), "model.onnx")             # QDQ ONNX

Why the insertion is written here and not with torchao's ``prepare_pt2e``:
the engine needs (1) one module instance per *group* of tensors that share a
scale, called at every site, so that pow2 hardware alignment, LSQ/TQT
parameters and DDP synchronisation act on one object; (2) a derived int32
bias quantizer that is live during QAT; (3) a conversion whose rounding is
bit-exact with onnxruntime, which torchao's ``convert_pt2e`` is not (its
``quantized_decomposed`` ops multiply by 1/scale). The annotation
vocabulary (specs, shared and derived specs) follows PT2E's.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx

from quantbench.engine.annotate import Plan, annotate, check_config_names
from quantbench.engine.errors import CalibrationError, QuantizationError, SpecError, require_graph
from quantbench.engine.fake_quant import (
    DerivedBiasFakeQuantize,
    FakeQuantizeBase,
    build_fake_quantize,
)
from quantbench.engine.graph import constant_value, copy_graph, op_name
from quantbench.engine.modes import calibration_mode, fake_quantizers
from quantbench.engine.ops import HELPER_KINDS, op_kind, ops_tagged
from quantbench.engine.passes.freeze import freeze_graph
from quantbench.engine.passes.nonlinear import qnorm
from quantbench.engine.passes.prequant import (
    PREQUANT_PTQ,
    PREQUANT_PTQ_KEEP_BN,
    PREQUANT_QAT,
    run_passes,
)
from quantbench.engine.passes.qat_bn import simulate_bn_folding
from quantbench.engine.ptq.bias_correction import correct_bias
from quantbench.engine.ptq.cle import align_pow2, equalize
from quantbench.engine.ptq.mixed import allocate_bits, mixed_precision_config
from quantbench.engine.ptq.rounding import adaround, brecq
from quantbench.engine.qat import enable_train_eval, eval_mode
from quantbench.engine.spec import ALGORITHMS, Algorithm, Config, QuantizationConfig
from quantbench.engine.targets import HardwareTarget
from quantbench.errors import BadInputError
from quantbench.progress import progress
from quantbench.quiet import quiet_warning

__all__ = ["AlgorithmRecord", "ModelQuantizer", "CoverageReport", "QuantizationError", "CalibrationError", "coverage",
           "batch_inputs"]

log = logging.getLogger(__name__)

# The engine's own copies of a graph go through graph.copy_graph, which holds back torch's LeafSpec
# deprecation (see there). A copy made elsewhere (the training loop's EMA model, DDP) goes the same
# copy.deepcopy -> copyreg.__newobj__ -> LeafSpec.__new__ path: this process-wide filter is as narrow
# (that message, attributed to copyreg), so a LeafSpec made by the user's own code still warns.
quiet_warning(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, module=r"copyreg$")


def batch_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """Inputs of a calibration batch: a tensor, a tuple of tensors, or (inputs, target)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        raise CalibrationError("calibration batches must be tensors or (inputs, target) pairs, got a dict")
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return (batch[0],)  # (inputs, target): the target is ignored
    if isinstance(batch, (list, tuple)) and all(isinstance(b, torch.Tensor) for b in batch):
        return tuple(batch)
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
        return tuple(batch[0])
    raise CalibrationError(f"cannot read inputs from a calibration batch of type {type(batch).__name__}; a batch "
                           "is a tensor, a tuple of tensors or an (inputs, target) pair")


def _module_name(node: fx.Node, role: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", f"{role}_fq_{node.name}")
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _insert_group_modules(gm: fx.GraphModule, plan: Plan) -> None:
    taken = {n for n, _ in gm.named_modules()}
    for g in plan.groups():
        head = g.members[0]
        g.module_name = _module_name(head, g.role, taken)
        label = ", ".join(m.name for m in g.members[:4]) + (" ..." if len(g.members) > 4 else "")
        gm.add_submodule(g.module_name, build_fake_quantize(g.spec, g.role, name=label))


def _rewire_values(gm: fx.GraphModule, plan: Plan) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, g in list(plan.value_group.items()):
        if op_kind(node) in ("tuple_passthrough", "dropout"):
            continue  # a list value: its getitem users carry the quantizer; dropout: identity at inference
        anchor = placeholders[-1] if node.op == "placeholder" else node
        with graph.inserting_after(anchor):
            fq = graph.call_module(g.root().module_name, (node,))
        fq.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(
            fq, delete_user_cb=lambda u, fq=fq: u is not fq and u.target != "_guards_fn")


def _set_arg(node: fx.Node, i: int, j: int, value: fx.Node) -> None:
    args = list(node.args)
    if j < 0:
        args[i] = value
    else:
        inner = list(args[i])
        inner[j] = value
        args[i] = type(node.args[i])(inner)
    node.args = tuple(args)


def _get_arg(node: fx.Node, i: int, j: int) -> fx.Node:
    return node.args[i] if j < 0 else node.args[i][j]


def _insert_input_quantizers(gm: fx.GraphModule, plan: Plan) -> None:
    graph = gm.graph
    for (node, i), g in plan.weight_group.items():
        with graph.inserting_before(node):
            fq = graph.call_module(g.root().module_name, (node.args[i],))
        _set_arg(node, i, -1, fq)
    for (node, i, j), g in plan.edge_group.items():
        with graph.inserting_before(node):
            fq = graph.call_module(g.root().module_name, (_get_arg(node, i, j),))
        _set_arg(node, i, j, fq)


def _insert_bias_quantizers(gm: fx.GraphModule, plan: Plan, act_of: dict[fx.Node, str]) -> None:
    graph = gm.graph
    for node, (i, spec) in plan.bias.items():
        act_name = act_of.get(node)
        if act_name is None:
            node.meta["qb_float_reason"] = "bias left in float: the input is not quantized"
            continue
        act = gm.get_submodule(act_name)
        weight = gm.get_submodule(plan.weight_group[(node, 1)].root().module_name)
        if spec.dtype == "int32":
            module: FakeQuantizeBase = DerivedBiasFakeQuantize(spec, act, weight, name=f"{node.name}.bias")
        else:
            module = build_fake_quantize(spec, "const", name=f"{node.name}.bias")
        name = _module_name(node, "bias", {n for n, _ in gm.named_modules()})
        gm.add_submodule(name, module)
        raw = node.args[i]
        with graph.inserting_before(node):
            fq = graph.call_module(name, (raw,))
        _set_arg(node, i, -1, fq)
        for user in list(raw.users):  # QAT BN subtracts the same quantized folded bias in training
            if op_name(user) == "bn_qat_output":
                user.replace_input_with(raw, fq)


def _input_quantizer_names(plan: Plan) -> dict[fx.Node, str]:
    """For each weighted op with a bias spec: the module quantizing its activation input."""
    out = {}
    for node in plan.bias:
        g = plan.edge_group.get((node, 0, -1)) or plan.group_of(node.args[0])
        if g is not None:
            out[node] = g.root().module_name
    return out


def _init_constant_quantizers(gm: fx.GraphModule) -> None:
    """Weights and constants are known now: observe them once and fix their scales.

    A QAT weight folded with BatchNorm (a function of constants) is evaluated
    from the current BN buffers. Learnable weight quantizers take their
    paper's initial value now (not on the first batch), so an optimizer built
    before the first step holds the parameters that are trained.
    """
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, FakeQuantizeBase) or mod.role not in ("weight", "const"):
            continue
        tensor = constant_value(gm, node.args[0])
        if tensor is None:
            continue
        tensor = tensor.detach()
        mod.observer_enabled, mod.fake_quant_enabled = True, False
        mod(tensor)
        if mod.spec.learnable == "none" or mod.role == "const":
            mod.update_qparams()
        else:
            mod.init_from(tensor)
        mod.observer_enabled = False


def _mark_nodes(gm: fx.GraphModule, plan: Plan) -> None:
    for node in plan.fused:
        node.meta["qb_fused"] = True
    for node, reason in plan.float_reasons.items():
        node.meta["qb_float_reason"] = reason


def prepare(gm: fx.GraphModule, config: Config, *, qat: bool = False,
            float_steps: Callable[[fx.GraphModule], None] | None = None) -> fx.GraphModule:
    """Pre-quant passes, annotation and quantizer insertion (no calibration).

    ``qat=True`` keeps BatchNorm (with simulated folding) and dropout in the
    graph; otherwise BN is folded (``config.fold_bn``) and dropout removed.
    ``float_steps`` edits the float graph between the passes and the annotation
    (cross-layer equalization).
    """
    check_config_names(gm, config)  # before the passes: names are the captured graph's
    if qat:
        passes = (*PREQUANT_QAT, simulate_bn_folding)
    else:
        passes = PREQUANT_PTQ if config.fold_bn else PREQUANT_PTQ_KEEP_BN
    gm = run_passes(gm, passes)
    if float_steps is not None:
        float_steps(gm)
    plan = annotate(gm, config)
    _mark_nodes(gm, plan)
    _insert_group_modules(gm, plan)
    act_of = _input_quantizer_names(plan)
    _rewire_values(gm, plan)
    _insert_input_quantizers(gm, plan)
    _insert_bias_quantizers(gm, plan, act_of)
    gm.graph.lint()
    gm.recompile()
    _init_constant_quantizers(gm)
    gm.meta["qb_config"] = config
    return gm


def _input_batches(loader: Iterable[Any], max_batches: int | None) -> list[tuple[torch.Tensor, ...]]:
    """The calibration inputs as a list (the algorithms read them several times)."""
    out = []
    for batch in loader:
        out.append(batch_inputs(batch))
        if max_batches is not None and len(out) >= max_batches:
            break
    return out


def _with_weight_bits(config: Config, bits: int) -> Config:
    """``config`` with every weight spec at ``bits`` (its signedness kept)."""
    def change(qc: QuantizationConfig) -> QuantizationConfig:
        if qc.weight is None:
            return qc
        dtype = {4: "int4", 8: "int8"}[bits] if qc.weight.itype.signed else {4: "uint4", 8: "uint8"}[bits]
        return qc.replace(weight=qc.weight.replace(dtype=dtype))

    return config.replace(global_quant_config=change(config.global_quant_config),
                          op_type_quant_config={k: change(v) for k, v in config.op_type_quant_config.items()},
                          node_name_quant_config={k: change(v) for k, v in config.node_name_quant_config.items()})


@dataclass
class AlgorithmRecord:
    """One advanced PTQ step as it ran: its name, options, wall time and a summary (for logs and MLflow)."""

    name: str
    options: dict[str, Any]
    seconds: float
    summary: str
    details: Any = None


def _run_weight_step(algorithm: Algorithm, qmodel: fx.GraphModule, batches: list) -> Any:
    options = {k: algorithm.get(k) for k in ALGORITHMS[algorithm.name]["options"]}
    if algorithm.name == "bias_correction":
        return correct_bias(qmodel, batches, **options)
    if algorithm.name == "adaround":
        return adaround(qmodel, batches, **options)
    if algorithm.name == "brecq":
        return brecq(qmodel, batches, **options)
    raise QuantizationError(f"algorithm {algorithm.name!r} has no weight step")  # the spec refuses it first


def calibrate(qmodel: fx.GraphModule, loader: Iterable[Any], *, max_batches: int | None = None,
              device: torch.device | None = None) -> int:
    """Run calibration batches through the graph with observers on; returns the batch count."""
    expected = qmodel.meta.get("qb_example_shapes")
    n = 0
    with torch.no_grad(), calibration_mode(qmodel):
        for batch in progress(loader, desc="calibrate", unit="batch"):
            inputs = batch_inputs(batch)
            if device is not None:
                inputs = tuple(t.to(device) for t in inputs)
            _check_shapes(inputs, expected, n)
            try:
                qmodel(*inputs)
            except BadInputError:
                raise  # already one line naming the culprit (a NaN at an observer)
            except (RuntimeError, AssertionError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                shapes = [tuple(t.shape) for t in inputs]
                raise CalibrationError(
                    f"calibration batch {n} with input shapes {shapes} does not fit the captured model "
                    f"(example shapes {expected}): {first}") from exc
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    for m in fake_quantizers(qmodel):
        if m.role == "activation":
            m.update_qparams()
    return n


def _check_shapes(inputs, expected, index: int) -> None:
    if not expected:
        return
    for t, shape in zip(inputs, expected):
        if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]):
            raise CalibrationError(
                f"calibration batch {index} has input shape {tuple(t.shape)}, but the model was captured "
                f"with {tuple(shape)} (only the batch dimension may differ); fix the calibration loader's "
                "transforms or capture with a matching example")


@dataclass
class CoverageReport:
    """Which compute nodes are quantized, and why the others are not."""

    quantized_ops: int
    total_ops: int
    float_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, reason)

    @property
    def fraction(self) -> float:
        return self.quantized_ops / self.total_ops if self.total_ops else 1.0

    def __str__(self) -> str:
        lines = [f"coverage: {self.quantized_ops}/{self.total_ops} compute ops quantized"]
        lines += [f"  float: {n} ({op}): {reason}" for n, op, reason in self.float_nodes]
        return "\n".join(lines)


def _is_fq_node(gm: fx.GraphModule, node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), FakeQuantizeBase))


def _float_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if "qb_float_reason" in node.meta:
        return node.meta["qb_float_reason"]
    for a in node.all_input_nodes:
        if _is_fq_node(gm, a) or a.meta.get("qb_fused"):
            continue
        if op_kind(a) in ("passthrough", "tuple_passthrough") and a.meta.get("qb_quantized_tuple"):
            continue
        if op_kind(a) == "dropout" and _is_fq_node(gm, a.args[0]):
            continue
        if a.op == "get_attr" and op_kind(node) == "norm":
            continue
        return f"input '{a.name}' is not quantized"
    if node.meta.get("qb_fused"):
        return None
    users = list(node.users)
    if not users or not all(_is_fq_node(gm, u) for u in users):
        return "output is not quantized"
    return None


_COMPUTE_KINDS = ("weighted", "matmul", "binary", "activation", "pool", "norm")


def _frozen_float_nodes(qmodel: fx.GraphModule, target) -> dict[str, str]:
    """Compute nodes that still run in float once frozen (and so in the exported ONNX graph), and why.

    Keyed by the fake-quant graph's node name (a fused kernel names its source op). A node is float
    when freeze found no integer kernel for it: the export writes ``DQ -> op -> Q`` and onnxruntime
    runs the op on floats. A norm too large for the int64 integer norm falls back to integer
    statistics and a double-precision normalization (:mod:`quantbench.engine.passes.nonlinear`):
    exact, but float, and named so.
    """
    frozen = freeze_graph(qmodel, target=target)
    out: dict[str, str] = {}
    for node in frozen.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is qnorm:
            out[node.meta.get("qb_source_node", node.name)] = (
                f"{node.meta.get('qb_source_op', 'norm')}: too large for the int64 integer norm (or no quantizer "
                "after it): integer statistics, the normalization in double precision; bit-exact, not integer")
            continue
        if op_kind(node) not in _COMPUTE_KINDS or op_name(node) in ops_tagged("ort_qlinear") or node.name in out:
            continue
        ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not ins or not all(getattr(a.target, "__name__", "") == "dequantize" for a in ins):
            continue  # a float input: the annotation already says why
        out[node.name] = (f"'{op_name(node)}' has no integer kernel for these operands: exported as DQ -> "
                          f"{op_name(node)} -> Q, onnxruntime computes it in float")
    return out


def coverage(qmodel: fx.GraphModule, *, target: str | HardwareTarget = "ort") -> CoverageReport:
    """Every compute node of a quantized graph, and whether it runs on the integer grid in the export.

    A node counts as quantized only when the frozen graph computes it with an integer kernel
    (:mod:`quantbench.engine.passes.integer`, :mod:`~quantbench.engine.passes.nonlinear`): what
    the exported ONNX graph runs, not what was annotated. ``quantbench.engine.onnx_coverage``
    checks the same on the ONNX side.
    """
    require_graph(qmodel, "coverage", quantized=True)
    float_nodes = []
    total = 0
    frozen_float = _frozen_float_nodes(qmodel, target)
    for node in qmodel.graph.nodes:
        if node.op != "call_function" or op_kind(node) in HELPER_KINDS:
            continue
        if node.target.__module__ == "quantbench.engine.qdq":
            continue
        total += 1
        reason = _float_reason(qmodel, node) or frozen_float.get(node.name)
        if reason is not None:
            float_nodes.append((node.name, op_name(node), reason))
    return CoverageReport(total - len(float_nodes), total, float_nodes)


def _check_calib_loader(calib_loader: Any) -> None:
    """An iterable of batches; a lone tensor, a string or a mapping is refused in one line."""
    if calib_loader is None:
        return
    what = "a DataLoader, a list of tensors or of (inputs, target) pairs"
    if isinstance(calib_loader, torch.Tensor):
        raise CalibrationError(f"quantize_model: calib_loader is a single tensor; pass an iterable of batches "
                               f"such as [x] ({what})")
    if isinstance(calib_loader, (str, bytes, dict)) or not isinstance(calib_loader, Iterable):
        raise CalibrationError(f"quantize_model: calib_loader must be an iterable of batches ({what}), got "
                               f"{type(calib_loader).__name__}")


class ModelQuantizer:
    """Quantizes a captured graph per a :class:`Config` (Quark FX-mode shaped API).

    Args:
        config: the quantization config (see :mod:`quantbench.engine.presets`).
    """

    def __init__(self, config: Config) -> None:
        if not isinstance(config, Config):
            hint = (f"; for a preset use ModelQuantizer(presets.get({config!r}))" if isinstance(config, str)
                    else "; start from a preset: ModelQuantizer(presets.get('int8_pow2')), presets.list() names them")
            raise SpecError(f"ModelQuantizer needs a quantbench.engine Config, got {type(config).__name__}{hint}")
        self.config = config

    def quantize_model(self, gm: fx.GraphModule, calib_loader: Iterable[Any] | None = None, *,
                       qat: bool | None = None, max_batches: int | None = None) -> fx.GraphModule:
        """Insert quantizers into a copy of ``gm`` and calibrate it.

        Args:
            gm: a graph from :func:`quantbench.engine.capture` (left untouched).
            calib_loader: calibration batches (tensors or (inputs, target) pairs);
                ``[]`` or None skips calibration (e.g. LSQ/TQT initialised on the
                first training batch).
            qat: prepare for QAT: BatchNorm kept with simulated folding,
                dropout kept, ``qmodel.train()``/``.eval()`` and
                :mod:`quantbench.engine.qat` switch them (default:
                ``config.for_training``, i.e. a QAT preset or a learnable spec).
            max_batches: stop calibration after this many batches.

        Returns:
            The fake-quant GraphModule, ready for evaluation (or for QAT).
        """
        require_graph(gm, "quantize_model")
        _check_calib_loader(calib_loader)
        if qat is not None and not isinstance(qat, bool):
            raise SpecError(f"quantize_model: qat={qat!r} must be True, False or None (None: the config decides)")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 1):
            raise SpecError(f"quantize_model: max_batches={max_batches!r} must be a positive int or None (all)")
        qat = self.config.for_training if qat is None else qat
        algorithms = self.config.algorithms
        if algorithms and qat:
            raise SpecError(f"quantize_model: qat=True, but the config runs post-training algorithms "
                            f"{[a.name for a in algorithms]}; drop them or quantize with qat=False")
        start = time.perf_counter()
        if not algorithms:
            qmodel = prepare(copy_graph(gm), self.config, qat=qat)
            batches = 0
            if calib_loader is not None:
                batches = calibrate(qmodel, calib_loader, max_batches=max_batches)
        else:
            qmodel, batches = self._quantize_with_algorithms(gm, calib_loader, max_batches)
        if batches == 0:
            log.warning("no calibration data: activation scales are initialised on the first batch "
                        "(LSQ/TQT) or stay at 1.0 (static); pass a calib_loader for PTQ")
        for m in fake_quantizers(qmodel):  # ready for evaluation: scales fixed, values rounded
            m.observer_enabled, m.fake_quant_enabled = False, True
        if qat:
            enable_train_eval(qmodel)
            eval_mode(qmodel)
        qmodel.meta["qb_calibration_batches"] = batches
        qmodel.meta["qb_quantize_seconds"] = time.perf_counter() - start
        return qmodel

    def _quantize_with_algorithms(self, gm: fx.GraphModule, calib_loader: Iterable[Any] | None,
                                  max_batches: int | None) -> tuple[fx.GraphModule, int]:
        """Prepare and calibrate with the config's algorithms: CLE on the float graph, mixed precision
        (quantized and calibrated twice: every layer low, then the allocation), then the weight steps."""
        config = self.config
        names = [a.name for a in config.algorithms]
        batches = _input_batches(calib_loader, max_batches) if calib_loader is not None else []
        if not batches:
            raise CalibrationError(f"quantize_model: the algorithms {names} need calibration data; pass a "
                                   "calib_loader with at least one batch")
        records: list[AlgorithmRecord] = []

        def float_steps(g: fx.GraphModule) -> None:
            for a in config.algorithms:
                if a.stage != "float":
                    continue
                t0 = time.perf_counter()
                report = equalize(g, iterations=a.get("iterations"), relu6=a.get("relu6"),
                                  absorb_bias=a.get("absorb_bias"), batches=batches)
                if a.get("pow2_align"):  # one scalar per group puts its ranges just under powers of two
                    qc = config.global_quant_config
                    report.pow2 = align_pow2(g, batches=batches,
                                             weight_qmax=qc.weight.qmax if qc.weight is not None else 127,
                                             act_qmax=qc.output_tensors.qmax if qc.output_tensors is not None else 127)
                records[:] = [r for r in records if r.name != a.name]  # a second prepare redoes it: count once
                records.append(AlgorithmRecord(a.name, dict(a.options), time.perf_counter() - t0, str(report), report))

        def build(cfg: Config) -> fx.GraphModule:
            q = prepare(copy_graph(gm), cfg, qat=False, float_steps=float_steps)
            calibrate(q, batches)
            return q

        allocate = next((a for a in config.algorithms if a.stage == "allocate"), None)
        if allocate is not None:
            t0 = time.perf_counter()
            low = _with_weight_bits(config, allocate.get("low_bits"))
            q_low = build(low)
            for m in fake_quantizers(q_low):
                m.observer_enabled, m.fake_quant_enabled = False, True
            allocation = allocate_bits(q_low, batches, low_bits=allocate.get("low_bits"),
                                       high_bits=allocate.get("high_bits"), budget=allocate.get("budget"),
                                       cost=allocate.get("cost"))
            config = mixed_precision_config(low, allocation)
            seconds = time.perf_counter() - t0
        qmodel = build(config)
        if allocate is not None:
            records.append(AlgorithmRecord(allocate.name, dict(allocate.options), seconds,
                                           f"mixed precision: {allocation}", allocation))
        for m in fake_quantizers(qmodel):
            m.observer_enabled, m.fake_quant_enabled = False, True
        for a in config.algorithms:
            if a.stage != "weights":
                continue
            t0 = time.perf_counter()
            report = _run_weight_step(a, qmodel, batches)
            records.append(AlgorithmRecord(a.name, dict(a.options), time.perf_counter() - t0, str(report), report))
            log.info("%s", str(report).splitlines()[0])  # the whole report: algorithms.txt of the run
        qmodel.meta["qb_config"] = config
        qmodel.meta["qb_algorithms"] = records
        return qmodel, len(batches)

    def coverage(self, qmodel: fx.GraphModule, *, target: str | HardwareTarget = "ort") -> CoverageReport:
        """See :func:`coverage`."""
        return coverage(qmodel, target=target)

    def freeze(self, qmodel: fx.GraphModule, target: str | HardwareTarget = "ort") -> fx.GraphModule:
        """Bake scales into a plain GraphModule of integer weights and Q/DQ calls.

        Args:
            qmodel: the (calibrated or trained) fake-quant graph; left untouched.
            target: ``"ort"`` (generic QDQ for onnxruntime, int32 bias) or
                ``"npu_pow2"``: a power-of-two NPU (AMD XINT8). The scales
                must be powers of two (a pow2 preset; else a
                :class:`~quantbench.engine.errors.HardwareError` names the
                first one that is not). Positions are moved into the NPU's
                shift ranges, concat / pool / reshape share one scale, the
                bias gets its own int8 pow2 scale, average pools compute
                ``sum * multiplier / 2^shift`` and sigmoid / SiLU become the
                NPU's hardsigmoid / hardswish, so the frozen graph and its
                ONNX export compute what the NPU computes;
                :func:`~quantbench.engine.targets.check_hardware` of the
                result is empty. A :class:`~quantbench.engine.targets.HardwareTarget`
                selects a variant (e.g. ``bias_dtype="int32"``).

        A QAT graph is frozen as it computes in eval mode: BatchNorm folded
        with its running statistics, dropout removed.
        """
        require_graph(qmodel, "freeze", quantized=True)
        return freeze_graph(qmodel, target=target)
