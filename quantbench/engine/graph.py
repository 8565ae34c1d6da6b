"""Graph helpers shared by every pass: op names, tensor attributes, constant folding.

The bottom of the engine: it imports nothing of the engine, so annotation,
the passes, the targets and the quantizer all read graphs the same way.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from typing import Iterator

import torch
from torch import fx

from quantbench.quiet import verbose

__all__ = [
    "constant_value",
    "conv_groups",
    "copy_graph",
    "finish_graph",
    "get_attr_tensor",
    "op_name",
    "quiet_pytree_copies",
    "set_attr_tensor",
    "target_name",
]


def target_name(target) -> str:
    """Short name of a call target: ``aten.conv2d.default`` -> ``"conv2d"``."""
    if target is operator.getitem:
        return "getitem"
    return str(getattr(target, "_opname", None) or getattr(target, "__name__", str(target)))


def op_name(node: fx.Node) -> str:
    """Short op type of a node (``node.op`` for anything but a call_function)."""
    if node.op != "call_function":
        return node.op
    return target_name(node.target)


def conv_groups(conv: fx.Node) -> int:
    """The ``groups`` argument of an ``aten.conv*`` / ``aten.conv_transpose*`` node."""
    idx = 7 if op_name(conv).startswith("conv_transpose") else 6
    if len(conv.args) > idx:
        return int(conv.args[idx])
    return int(conv.kwargs.get("groups", 1))


@contextlib.contextmanager
def quiet_pytree_copies() -> Iterator[None]:
    """Hold back torch's LeafSpec deprecation warning for a block (unless ``QUANTBENCH_VERBOSE=1``).

    A captured graph holds pytree specs; copying one (copy.deepcopy, and torch.onnx.export, which
    copies the module call graph of the program it decomposes) rebuilds their leaves through
    copyreg.__newobj__ -> LeafSpec.__new__, which torch 2.13 marks deprecated: a FutureWarning
    attributed to copyreg, once per copy. It is torch's own business and nothing a user can change.
    The filter is scoped to the block, so it holds even where the global filters were reset after
    import (pytest, a caller's ``catch_warnings``), and matches only that message from copyreg: a
    LeafSpec made by the user's own code still warns.
    """
    if verbose():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning, module=r"copyreg$")
        yield


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """``copy.deepcopy(gm)`` without torch's LeafSpec deprecation warning (:func:`quiet_pytree_copies`)."""
    with quiet_pytree_copies():
        return copy.deepcopy(gm)


def get_attr_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target (a dotted path) names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor, *, param: bool) -> str:
    """Register a new top-level tensor attribute under a fresh name and return the name."""
    base = name.replace(".", "_")
    candidate, k = base, 0
    while hasattr(gm, candidate):
        k += 1
        candidate = f"{base}_{k}"
    if param:
        gm.register_parameter(candidate, torch.nn.Parameter(value.detach().clone(), requires_grad=True))
    else:
        gm.register_buffer(candidate, value.detach().clone())
    return candidate


def finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """End of every pass: drop dead nodes, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of a node computed from constants only (``get_attr`` and functions of them), else None."""
    if node.op == "get_attr":
        return get_attr_tensor(gm, node.target)
    if node.op != "call_function" or not node.all_input_nodes:
        return None
    values = {}
    for a in node.all_input_nodes:
        v = constant_value(gm, a)
        if v is None:
            return None
        values[a] = v
    with torch.no_grad():
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        return node.target(*args, **kwargs)
