"""Image classification task: ImageFolder data (ImageNet, digits), models, top-k metrics.

``ClassificationTask`` (:mod:`.adapter`) is what ``conf/task/{digits,imagenet}.yaml``
instantiates. The pieces are usable on their own: ``write_digits_imagefolder``
(:mod:`.data`) backs ``quantbench data digits``, ``build_model`` (:mod:`.models`)
names torchvision/timm/test models, ``evaluate`` (:mod:`.metrics`) scores any
predict function with the same top-1/top-5 code.

Importing the package registers the ``classification`` task kind and its
config schemas (:mod:`.config`), and nothing heavier; the rest loads on use.
"""

import importlib
from typing import Any

from tasks.classification.config import DataConfig

__all__ = ["ClassificationTask", "DataConfig", "build_model", "evaluate", "list_models", "topk_correct",
           "write_digits_imagefolder"]

_LAZY = {"ClassificationTask": "adapter", "build_model": "models", "list_models": "models",
         "evaluate": "metrics", "topk_correct": "metrics", "write_digits_imagefolder": "data"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
