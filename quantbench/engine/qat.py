"""Quantization-aware training on an exported graph: modes, parameter groups, freeze points.

A ``torch.export`` GraphModule has no BatchNorm or Dropout modules whose
``training`` flag could be flipped: BN and dropout are ``aten.batch_norm`` /
``aten.dropout`` calls whose ``training`` is a constant argument, and the
exported module refuses ``.train()``. :func:`train_mode` and
:func:`eval_mode` rewrite those arguments (and recompile) and switch the
observers of static quantizers, consistently::

    qmodel = ModelQuantizer(presets.get("qat_lsq")).quantize_model(gm, calib)
    opt = torch.optim.Adam([{"params": qat.weight_parameters(qmodel), "lr": 1e-5},
                            {"params": qat.quantizer_parameters(qmodel), "lr": 1e-5}])
    qmodel.train()                       # or qat.train_mode(qmodel)
    ...                                  # the usual loop; after a few epochs:
    qat.set_observers_frozen(qmodel)     # static QAT: scales stop moving
    qat.set_bn_frozen(qmodel)            # BN uses (and keeps) its running statistics
    qmodel.eval()
    frozen = quantizer.freeze(qmodel)    # BN folded for good

Modes, as the recipes of Jacob et al. (arXiv 1712.05877) and Krishnamoorthi
(arXiv 1806.08342) use them:

* train: BN normalises with batch statistics and updates its running ones
  (unless BN is frozen); dropout is active; observers of static quantizers
  update the scales every step (unless frozen). LSQ / TQT quantizers learn
  their scales by gradient and never observe after initialisation.
* eval: BN uses running statistics, dropout is the identity, no observer runs.

The freeze points are one-way setters (:func:`set_observers_frozen`,
:func:`set_bn_frozen`) that later :func:`train_mode` calls respect, plus
context managers that restore the previous state on exit. The state lives in
``qmodel.meta``, so it survives ``deepcopy``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import fx, nn

from quantbench.engine.errors import require_graph
from quantbench.engine.fake_quant import FakeQuantize, FakeQuantizeBase
from quantbench.engine.graph import op_name
from quantbench.engine.modes import disable_fake_quant, fake_quantizers
from quantbench.engine.observers import ObserverBase
from quantbench.engine.ops import ops_of_kind
from quantbench.engine.passes.qat_bn import BATCH_STATS_ARG

__all__ = [
    "disable_fake_quant",
    "enable_train_eval",
    "eval_mode",
    "freeze_bn",
    "freeze_observers",
    "is_training",
    "quantizer_parameters",
    "quantizer_state",
    "set_bn_frozen",
    "set_observers_frozen",
    "sync_quantizers",
    "train_mode",
    "weight_parameters",
]

_STATE = "qb_qat"


def _state(qmodel: fx.GraphModule) -> dict[str, bool]:
    return qmodel.meta.setdefault(_STATE, {"training": False, "bn_frozen": False, "observers_frozen": False})


def is_training(qmodel: fx.GraphModule) -> bool:
    """True between :func:`train_mode` and :func:`eval_mode`."""
    require_graph(qmodel, "qat.is_training", quantized=True)
    return _state(qmodel)["training"]


def _set_graph_flags(qmodel: fx.GraphModule, bn_training: bool, dropout_training: bool) -> None:
    """Set the ``training`` argument of every BN and dropout call; recompile only if one changed."""
    changed = False
    for node in qmodel.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name in BATCH_STATS_ARG and node.args[3] is not None:
            index, value = BATCH_STATS_ARG[name], bn_training
        elif name in ops_of_kind("dropout") and len(node.args) > 2:
            index, value = 2, dropout_training
        else:
            continue
        if len(node.args) > index and bool(node.args[index]) != value:
            node.update_arg(index, value)
            changed = True
    if changed:
        qmodel.recompile()


def _apply_observers(qmodel: fx.GraphModule) -> None:
    state = _state(qmodel)
    on = state["training"] and not state["observers_frozen"]
    for m in fake_quantizers(qmodel):
        m.observer_enabled = on and isinstance(m, FakeQuantize)


def _apply(qmodel: fx.GraphModule) -> fx.GraphModule:
    state = _state(qmodel)
    training = state["training"]
    _set_graph_flags(qmodel, bn_training=training and not state["bn_frozen"], dropout_training=training)
    nn.Module.train(qmodel, training)
    _apply_observers(qmodel)
    return qmodel


def train_mode(qmodel: fx.GraphModule) -> fx.GraphModule:
    """Training mode: batch-statistics BN (unless frozen), active dropout, static observers on (unless frozen)."""
    require_graph(qmodel, "qat.train_mode", quantized=True)
    _state(qmodel)["training"] = True
    return _apply(qmodel)


def eval_mode(qmodel: fx.GraphModule) -> fx.GraphModule:
    """Evaluation mode: running-statistics BN, identity dropout, no observer runs."""
    require_graph(qmodel, "qat.eval_mode", quantized=True)
    _state(qmodel)["training"] = False
    return _apply(qmodel)


def set_observers_frozen(qmodel: fx.GraphModule, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the scales of static quantizers for the rest of training.

    The engine's one observer switch (the recipe's observer-freeze point).
    The state is kept in ``qmodel.meta`` and every later :func:`train_mode` /
    :func:`eval_mode` (``qmodel.train()`` / ``.eval()``) respects it: an
    observer runs only in train mode, only in a static (observer-driven)
    quantizer, and only while not frozen. LSQ / TQT quantizers never observe
    after initialisation, frozen or not. For a block that restores the
    previous state on exit, use :func:`freeze_observers`.
    """
    require_graph(qmodel, "qat.set_observers_frozen", quantized=True)
    _state(qmodel)["observers_frozen"] = bool(frozen)
    _apply_observers(qmodel)


def set_bn_frozen(qmodel: fx.GraphModule, frozen: bool = True) -> None:
    """Freeze (or unfreeze) BatchNorm: running statistics are used and no longer updated, also in training.

    Once BN is frozen the simulated fold is the exact folded conv, so the
    last epochs train the weights the integer kernel will run
    (Krishnamoorthi, arXiv 1806.08342, sec. 3.2).
    """
    require_graph(qmodel, "qat.set_bn_frozen", quantized=True)
    _state(qmodel)["bn_frozen"] = bool(frozen)
    _apply(qmodel)


@contextlib.contextmanager
def freeze_observers(qmodel: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """:func:`set_observers_frozen` inside the block; the frozen state and every observer flag are restored on exit."""
    previous = _state(qmodel)["observers_frozen"]
    flags = [(m, m.observer_enabled) for m in fake_quantizers(qmodel)]
    try:
        set_observers_frozen(qmodel, True)
        yield qmodel
    finally:
        _state(qmodel)["observers_frozen"] = previous
        for m, enabled in flags:
            m.observer_enabled = enabled


@contextlib.contextmanager
def freeze_bn(qmodel: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """BatchNorm uses and keeps its running statistics inside the block; restored on exit."""
    previous = _state(qmodel)["bn_frozen"]
    try:
        set_bn_frozen(qmodel, True)
        yield qmodel
    finally:
        set_bn_frozen(qmodel, previous)


def quantizer_parameters(qmodel: nn.Module) -> list[nn.Parameter]:
    """The learned parameters of the quantizers (LSQ steps, TQT log2 thresholds).

    Call it after :meth:`ModelQuantizer.quantize_model`: quantizers are
    initialised there, and a per-channel step is a new tensor once it has
    its shape.
    """
    params: dict[int, nn.Parameter] = {}
    for m in qmodel.modules():
        if isinstance(m, FakeQuantizeBase):
            params.update((id(p), p) for p in m.parameters() if p.requires_grad)
    return list(params.values())


def weight_parameters(qmodel: nn.Module) -> list[nn.Parameter]:
    """Every other trainable parameter (weights, biases, BN affine); disjoint from the quantizers'."""
    quant = {id(p) for p in quantizer_parameters(qmodel)}
    return [p for p in qmodel.parameters() if p.requires_grad and id(p) not in quant]


def _range_only(observer: ObserverBase) -> bool:
    """Min-max and moving-average observers: their whole state is (min, max, count)."""
    return set(observer._buffers) == {"min_val", "max_val", "num_batches"}


def sync_quantizers(qmodel: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Make every rank's static quantizers agree after a data-parallel step.

    Under DistributedDataParallel each rank's observers see only that rank's
    batch, so the static scales of ``qat_pow2``-style QAT drift apart. Call
    this after each optimizer step: observed ranges are reduced (min of the
    minima, max of the maxima: the range one process would have seen over the
    whole global batch) and the scales are recomputed from them. Histogram
    observers take rank 0's state. LSQ / TQT scales are parameters, which DDP
    already keeps equal. A no-op outside a process group, and when no observer
    is running (frozen, or eval mode); every rank reaches the same decision, so
    the collectives always match.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    active = [m for m in fake_quantizers(qmodel) if m.observer_enabled and hasattr(m, "observer")]
    if not active:
        return
    ranged = [m.observer for m in active if _range_only(m.observer)]
    if ranged:
        device = ranged[0].min_val.device
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        for name, op in (("min_val", dist.ReduceOp.MIN), ("max_val", dist.ReduceOp.MAX)):
            parts = [getattr(o, name) for o in ranged]
            flat = torch.cat([p.reshape(-1).to(device, torch.float32) for p in parts])
            dist.all_reduce(flat, op=op, group=group)
            for part, chunk in zip(parts, flat.split([p.numel() for p in parts])):
                part.copy_(chunk.view_as(part))
    for m in active:
        if not _range_only(m.observer):
            box = [{k: v.cpu() for k, v in m.observer.state_dict().items()}]
            dist.broadcast_object_list(box, src=0, group=group)
            m.observer.load_state_dict(box[0])
        if isinstance(m, FakeQuantize) and m.fake_quant_enabled:
            m.update_qparams()


def quantizer_state(qmodel: nn.Module) -> torch.Tensor:
    """Every quantizer's floating-point state (scales, zero points, observer ranges, LSQ steps, TQT
    thresholds) as one flat float64 CPU tensor, in module order: what data-parallel ranks must agree on."""
    parts = [t.detach().reshape(-1).to("cpu", torch.float64)
             for m in fake_quantizers(qmodel)
             for t in (*m.parameters(), *m.buffers()) if t.dtype.is_floating_point or t.dtype == torch.int32]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


class _QATTrainEval:
    """Makes ``qmodel.train()`` / ``qmodel.eval()`` go through :func:`train_mode` / :func:`eval_mode`."""

    def train(self, mode: bool = True):
        return train_mode(self) if mode else eval_mode(self)


_QAT_CLASSES: dict[type, type] = {}


def enable_train_eval(qmodel: fx.GraphModule) -> fx.GraphModule:
    """Let ``qmodel.train()`` / ``.eval()`` switch the graph (``torch.export`` modules refuse them).

    ``GraphModule`` gives every instance its own class (``GraphModuleImpl``,
    which holds the compiled ``forward``) on top of a user class; this puts
    a user class that overrides ``train`` under a fresh instance class and
    recompiles. ``deepcopy`` (freeze makes one) rebuilds the instance class on
    top of the same user class, so the copy keeps the behaviour. Idempotent.
    """
    for name in ("train", "eval"):
        qmodel.__dict__.pop(name, None)  # torch.export's refusing overrides
    if isinstance(qmodel, _QATTrainEval):
        return qmodel
    base = next(t for t in type(qmodel).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
    if base not in _QAT_CLASSES:
        _QAT_CLASSES[base] = type("QATGraphModule", (_QATTrainEval, base), {"__module__": __name__})
    qmodel.__class__ = type("GraphModuleImpl", (_QAT_CLASSES[base],), {})
    qmodel.recompile()
    return qmodel
