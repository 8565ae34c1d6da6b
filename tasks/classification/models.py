"""Classification models by name: torchvision, timm, and tiny test models.

Names resolve through registries, never if/elif chains (timm
``models/_registry.py``): ``timm:<name>`` goes to timm, ``tv:<name>`` or a bare
torchvision name (``resnet18``, ``mobilenet_v2``) to
``torchvision.models.get_model``, and ``test_*`` names to the tiny models
registered here, which let tests run the real code paths at toy size.

Weights come from the libraries' own loaders and caches (``pretrained``) or a
local ``state_dict`` (``checkpoint``). Offline, a missing pretrained file fails
with one line that says where to put it, instead of a urllib traceback.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock

from quantbench.errors import WeightsNotFoundError
from quantbench.registry import Registry, UnknownNameError, close_matches
from quantbench.training.checkpoint import load_weights

__all__ = [
    "MODELS",
    "SOURCES",
    "WeightsNotFoundError",
    "build_model",
    "check_name",
    "list_models",
    "load_checkpoint",
]

log = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]


#: ``test_*`` and other local classification models, by function name.
MODELS: Registry[Builder] = Registry("classification model", hint="(model.name: also any torchvision name, "
                                     "or timm:<name>)")


def _weights_hint(name: str, where: str, reason: BaseException) -> WeightsNotFoundError:
    first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return WeightsNotFoundError(
        f"pretrained weights for {name!r} are not available offline ({type(reason).__name__}: {first}): "
        f"{where}, or pass model.checkpoint=PATH to a state_dict, or model.pretrained=false"
    )


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear for a fresh one with ``num_classes`` outputs (fine-tuning a 1000-way model)."""
    name, last = next((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear))
    if last.out_features != num_classes:
        model.set_submodule(name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return model


def _tv_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    if name not in _tv_names():
        raise _unknown(f"tv:{name}", name, _tv_names(), "a torchvision model", "tv:")
    if not pretrained:
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as exc:  # URLError, socket and DNS errors are all OSErrors
        raise _weights_hint(name, f"put {cached.name} in {cached.parent} (TORCH_HOME)", exc) from exc
    return _replace_head(model, num_classes)


def _timm(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise _unknown(f"timm:{name}", name, timm.list_models(), "a timm model", "timm:")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as exc:  # huggingface_hub raises non-OSError http errors too
        if not pretrained:
            raise
        hub = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise _weights_hint(
            f"timm:{name}", f"put them in the Hugging Face cache ({hub}; HF_HUB_OFFLINE=1 fails fast)", exc
        ) from exc


def _registered(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    if pretrained:
        raise WeightsNotFoundError(f"model {name!r} has no pretrained weights; pass model.checkpoint=PATH")
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


#: ``<source>:<name>`` prefixes of ``model.name``.
SOURCES: Registry[Builder] = Registry("model source", hint="(model.name=<source>:<name>)")
SOURCES.add("tv", _torchvision)
SOURCES.add("timm", _timm)
SOURCES.add("local", _registered)


_NAME_FIX = ("use a torchvision name (e.g. resnet18), timm:<name> for any timm model, a local test_* model, "
             "or model=<file> for conf/model/*.yaml")


def _unknown(full: str, bare: str, known: list[str], what: str, prefix: str = "") -> UnknownNameError:
    """``model.name='x': not a ...; did you mean 'a', 'b'? use ...``: one line, close matches only, never the list."""
    close = close_matches(bare, known, n=3)
    if not close:  # nothing close as a whole: names that share its leading word (resnet_foo -> resnet*)
        stem = re.match(r"[A-Za-z]{3,}", bare)
        close = sorted(k for k in known if stem and k.startswith(stem.group(0)))[:3]
    mean = f"did you mean {', '.join(repr(prefix + c) for c in close)}? " if close else ""
    return UnknownNameError(f"model.name={full!r}: not {what}; {mean}{_NAME_FIX}")


def _split(name: str) -> tuple[str, str]:
    """``"timm:x"`` -> ``("timm", "x")``; a bare name is local if registered, else torchvision."""
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in SOURCES:
            raise UnknownNameError(f"model.name={name!r}: unknown model source {prefix!r} (known: "
                                   f"{', '.join(p + ':' for p in SOURCES.list())}); {_NAME_FIX}")
        return prefix, rest
    return ("local" if name in MODELS else "tv"), name


def check_name(name: str) -> None:
    """Refuse an unknown ``model.name`` with one line, without building anything (the task calls it first).

    Raises:
        UnknownNameError: Not a local, torchvision or timm model; the close matches are named, never the list.
    """
    source, bare = _split(name)
    if source == "timm":
        import timm

        if not timm.is_model(bare):
            raise _unknown(name, bare, timm.list_models(), "a timm model", "timm:")
    elif source == "local" and bare not in MODELS:
        raise _unknown(name, bare, MODELS.list(), "a local model", "local:")
    elif source == "tv" and bare not in _tv_names():
        if ":" in name:
            raise _unknown(name, bare, _tv_names(), "a torchvision model", "tv:")
        raise _unknown(name, bare, sorted({*MODELS.list(), *_tv_names()}), "a torchvision or local model")


def list_models(pattern: str = "*") -> list[str]:
    """Local and torchvision names matching ``pattern`` (timm: ``timm.list_models``)."""
    tv = torchvision.models.list_models(module=torchvision.models)
    return sorted(set(MODELS.list(pattern)) | set(fnmatch.filter(tv, pattern)))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a local ``state_dict`` into ``model`` (strict), safely (tensors only).

    Accepts a bare state_dict or one nested under ``state_dict``/``model_state_dict``/``model``
    (the usual training-script layouts), with or without DDP's ``module.`` prefix
    (:func:`quantbench.training.load_weights`).

    Raises:
        WeightsNotFoundError: No such file.
        WeightsError: Not a safely loadable checkpoint, or weights of another architecture.
    """
    return load_weights(model, path, key="model.checkpoint", name=name)


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build a classification model by name, in eval mode, on the CPU.

    Args:
        name: ``resnet18``, ``tv:<name>``, ``timm:<name>`` or ``test_*``.
        num_classes: Outputs; a pretrained 1000-way head is replaced when it differs.
        pretrained: Load the library's pretrained weights (its cache or a download).
        checkpoint: Local state_dict to load; takes precedence over ``pretrained``.
        **kwargs: Passed to the model constructor.

    Raises:
        UnknownNameError: Unknown name (a ConfigError; the message lists close matches).
        WeightsNotFoundError: Weights missing; a one-line message.
        WeightsError: ``checkpoint`` is not a loadable state_dict of this model; a one-line message.
    """
    check_name(name)
    source, bare = _split(name)
    if checkpoint and pretrained:
        log.info("model.checkpoint given: not loading the library's pretrained weights")
    model = SOURCES.get(source)(bare, num_classes, pretrained and not checkpoint, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint, name)
    return model.eval()


@MODELS.register
def test_resnet(num_classes: int = 10, width: int = 8) -> nn.Module:
    """Tiny ResNet from torchvision's own BasicBlock (stem, one plain block, one strided block).

    It keeps what matters to a quantizer: conv-bn-relu, residual add, a
    downsample branch, the ReLU module called twice per block, avg-pool, linear.
    """
    down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@MODELS.register
def test_mobilenet(num_classes: int = 10) -> nn.Module:
    """Tiny torchvision MobileNetV2: two inverted-residual stages (ReLU6, depthwise, residual add)."""
    return MobileNetV2(num_classes=num_classes, inverted_residual_setting=[[1, 8, 1, 1], [6, 16, 2, 2]])
