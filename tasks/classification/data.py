"""ImageFolder data for classification: transforms, subsets, loaders, digits.

One code path serves ImageNet and the embedded ``digits`` task: both are an
ImageFolder tree (``train/<class>/*``, ``val/<class>/*``). The digits tree is
written from scikit-learn's real 8x8 handwritten digits (offline, 1797 images),
so a fresh machine runs the whole sweep without downloading anything, through
exactly the loader that ImageNet uses.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets, transforms

from quantbench.errors import CorruptDataError, DataNotFoundError
from quantbench.registry import Registry
from quantbench.training import data as shared
from tasks.classification.config import DataConfig

__all__ = [
    "CheckedImageFolder",
    "CorruptDataError",
    "DataNotFoundError",
    "GENERATORS",
    "TRAIN_AUGMENTS",
    "ensure_tree",
    "eval_transform",
    "image_folder",
    "make_loader",
    "resolve_root",
    "skip_missing_collate",
    "train_transform",
    "with_transform",
    "write_digits_imagefolder",
]

log = logging.getLogger(__name__)


def _normalize(cfg: DataConfig) -> list[Callable]:
    return [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)]


def eval_transform(cfg: DataConfig) -> transforms.Compose:
    """Resize the shorter side to ``resize_size``, center-crop ``image_size``, normalize."""
    return transforms.Compose(
        [transforms.Resize(cfg.resize_size), transforms.CenterCrop(cfg.image_size), *_normalize(cfg)]
    )


def _random_resized_crop(cfg: DataConfig) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(cfg.image_size),
            transforms.RandomHorizontalFlip(),
            *_normalize(cfg),
        ]
    )


def _pad_crop(cfg: DataConfig) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(cfg.resize_size),
            transforms.CenterCrop(cfg.image_size),
            transforms.RandomCrop(cfg.image_size, padding=cfg.pad),
            *_normalize(cfg),
        ]
    )


def _affine(cfg: DataConfig) -> transforms.Compose:
    """Small rotations, shifts (``pad`` pixels) and scalings: the classic handwritten-digit augmentation."""
    shift = cfg.pad / cfg.image_size
    return transforms.Compose(
        [
            transforms.Resize(cfg.resize_size),
            transforms.CenterCrop(cfg.image_size),
            transforms.RandomAffine(degrees=10, translate=(shift, shift), scale=(0.9, 1.1)),
            *_normalize(cfg),
        ]
    )


#: ``data.train_augment`` name -> transform builder.
TRAIN_AUGMENTS: Registry[Callable[[DataConfig], transforms.Compose]] = Registry(
    "train augmentation", hint="(data.train_augment)")
TRAIN_AUGMENTS.add("random_resized_crop", _random_resized_crop)
TRAIN_AUGMENTS.add("pad_crop", _pad_crop)
TRAIN_AUGMENTS.add("affine", _affine)
TRAIN_AUGMENTS.add("none", eval_transform)


def train_transform(cfg: DataConfig) -> transforms.Compose:
    """The training transform named by ``cfg.train_augment``."""
    return TRAIN_AUGMENTS.get(cfg.train_augment)(cfg)


def resolve_root(cfg: DataConfig) -> Path | None:
    """``cfg.root``, else the ``cfg.root_env`` environment variable, else ``None``."""
    root = cfg.root or (os.environ.get(cfg.root_env) if cfg.root_env else None)
    return Path(root).expanduser() if root else None


def _not_found(cfg: DataConfig, task: str, root: Path | None, missing: str) -> DataNotFoundError:
    where = f"'{root}'" if root is not None else "no data.root given"
    env = f" or the {cfg.root_env} env variable" if cfg.root_env else ""
    return DataNotFoundError(
        f"{task} data not found ({where}; {missing}): set data.root=PATH{env} to an ImageFolder tree "
        f"with train/<class>/ and val/<class>/, or run the embedded task with TASK=digits"
    )


def ensure_tree(cfg: DataConfig, task: str) -> Path:
    """Return the root of a usable tree, generating it if the config says how.

    Raises:
        DataNotFoundError: When the tree is absent and cannot be generated.
    """
    root = resolve_root(cfg)
    if root is not None and not root.exists() and cfg.generate:
        generate = GENERATORS.get(cfg.generate)
        log.info("writing the %s ImageFolder tree to %s", cfg.generate, root)
        try:
            generate(root, size=cfg.image_size, seed=cfg.seed)
        except OSError:
            if not root.is_dir():  # another process may have renamed its copy into place first
                raise
    if root is None or not root.is_dir():
        raise _not_found(cfg, task, root, "no such directory")
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir() or not any(p.is_dir() for p in split_dir.iterdir()):
            raise _not_found(cfg, task, root, f"no class folders under {split}/")
    return root


_WARNED: set[str] = set()

#: What PIL raises for a file that is not a readable image (UnidentifiedImageError and
#: "image file is truncated" are OSErrors; some broken headers raise SyntaxError or ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder that names a corrupt image instead of dying somewhere inside PIL.

    ``on_corrupt="fail"`` raises :class:`CorruptDataError` with the file's
    path; ``"skip"`` warns once per file and returns ``None`` for the sample,
    which :func:`skip_missing_collate` leaves out of its batch. Only decoding
    is guarded: an error in a transform is a bug and propagates as itself.
    """

    def __init__(self, root: str, transform: Callable | None = None, on_corrupt: str = "fail") -> None:
        super().__init__(root, transform=transform)
        self.on_corrupt = on_corrupt

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except _DECODE_ERRORS as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.on_corrupt != "skip":
                raise CorruptDataError(f"corrupt image {path} ({reason}): replace or delete it, or set "
                                       "data.on_corrupt=skip to leave it out") from exc
            if path not in _WARNED:
                _WARNED.add(path)
                log.warning("skipping corrupt image %s (%s); data.on_corrupt=skip", path, reason)
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def image_folder(root: Path, split: str, transform: Callable, on_corrupt: str = "fail") -> CheckedImageFolder:
    """The ImageFolder of ``root/split`` (PIL decoding, RGB), with the corrupt-image policy."""
    return CheckedImageFolder(str(Path(root) / split), transform=transform, on_corrupt=on_corrupt)


def skip_missing_collate(batch: list):
    """``default_collate`` without the ``None`` samples of skipped images (``None`` if none is left)."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def with_transform(dataset: datasets.ImageFolder, transform: Callable) -> datasets.ImageFolder:
    """The same file list under another transform, without rescanning the tree.

    Why: the calibration subset is drawn from the train split but must see the
    deterministic eval transform, and scanning ImageNet's 1.28M files twice
    costs seconds.
    """
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                pin_memory: bool = False, shard: bool = False) -> DataLoader:
    """:func:`quantbench.training.data.make_loader` with :func:`skip_missing_collate` (corrupt images skipped)."""
    return shared.make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers,
                              pin_memory=pin_memory, shard=shard, collate_fn=skip_missing_collate)


def _digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) as a ``size`` x ``size`` RGB image (bilinear)."""
    gray = Image.fromarray((pixels.reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8))
    return gray.resize((size, size), Image.BILINEAR).convert("RGB")


def write_digits_imagefolder(
    out_dir: str | os.PathLike, size: int = 32, seed: int = 0, val_fraction: float = 0.2
) -> Path:
    """Write scikit-learn's 8x8 digits as an ImageFolder tree of PNGs.

    The split is stratified and seeded (80/20 by default), so every machine
    writes the same tree. Files are named by their index in ``load_digits``
    (``train/3/0042.png``). The tree is written to a temporary sibling and
    renamed into place, so an interrupted write never leaves a half tree that
    a later run would take for the data set.

    Args:
        out_dir: Root of the tree; must not exist yet.
        size: Side of the upscaled square images (32 suits ResNet/MobileNet).
        seed: Seed of the train/val split.
        val_fraction: Share of each class that goes to ``val``.

    Returns:
        ``out_dir`` as a Path.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(errno.EEXIST, "exists; remove it or choose another --out", str(out))
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, stratify=digits.target, random_state=seed
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(idx):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                _digit_image(digits.data[i], size).save(folder / f"{i:04d}.png")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # DEBUG: `quantbench data` prints its own line, and a run logs that it is writing the set
    log.debug("wrote %d train and %d val digits (%dx%d) to %s", len(train_idx), len(val_idx), size, size, out)
    return out


#: ``data.generate`` name -> writer of an ImageFolder tree.
GENERATORS: Registry[Callable[..., Path]] = Registry("data generator", hint="(data.generate)")
GENERATORS.add("digits", write_digits_imagefolder)
