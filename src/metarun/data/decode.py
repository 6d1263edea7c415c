"""Helpers shared by the colour-image loaders: argument checks, decoding, assembling, caching.

Every loader decodes its images once into uint8 ``[N, 3, S, S]`` tensors (the whole of
mini-ImageNet at 84x84 is 1.3 GB) and caches them with :func:`metarun.data.base.cached_classes`
under a key that hashes everything that determines the content (:func:`cache_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data.base import ClassSplits, ImageClasses, cached_classes
from metarun.data.base import cache_dir as cache_dir_of
from metarun.data.files import KnownFile, verify
from metarun.errors import DatasetError, one_line

logger = logging.getLogger(__name__)

# Bump when decoding changes: it is part of every cache key, so old caches are no longer found.
DECODE_VERSION = 1

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def check_image_args(image_size: object, channels: object) -> None:
    """``dataset.image_size`` must be a positive int and ``dataset.channels`` 3 (these are RGB datasets)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"dataset.image_size must be a positive integer, got {image_size!r}")
    if channels != 3:
        raise DatasetError(f"dataset.channels must be 3 for this RGB dataset, got {channels!r}")


def decode_image(data: bytes, image_size: int, source: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Encoded image bytes (JPEG/PNG) as uint8 ``[3, S, S]`` RGB.

    The image is resized to ``S x S`` without keeping the aspect ratio, as Ravi & Larochelle's
    mini-ImageNet script does (LANCZOS). Grey or CMYK images (ImageNet has a few) become RGB.

    Args:
        box: optional ``(left, top, right, bottom)`` crop before resizing (CUB bounding boxes).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if box is not None:
                image = image.crop(box)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot decode {source} ({one_line(err)}); replace the file with a good copy") from err
    return array.transpose(2, 0, 1)


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """One image file as the colour datasets hold their images: uint8 ``[3, S, S]`` RGB through
    :func:`decode_image` (the loaders of image folders read every file with it). ``metarun-eval
    --episodes`` reads episode images with it; each colour dataset module exposes it as ``load_image``.

    Raises:
        DatasetError: the file cannot be read or decoded; the message names it.
    """
    return decode_image(read_bytes(path), image_size, str(path))


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, or one line naming it (a missing image of an episodes file, ...).

    Raises:
        DatasetError: the file cannot be read.
    """
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or one_line(err)}") from None


def resize_array(image: np.ndarray, image_size: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array as uint8 ``[3, S, S]`` (resized only when the size differs)."""
    if image.shape[:2] != (image_size, image_size):
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.LANCZOS))
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def assemble(per_class: Mapping[str, list[np.ndarray]], groups: Mapping[str, str] | None = None) -> ImageClasses:
    """Images grouped by class name -> :class:`ImageClasses` (classes in the mapping's order).

    Args:
        per_class: class name -> uint8 ``[3, S, S]`` arrays, in a fixed order.
        groups: class name -> group (e.g. the superclass); the class itself when ``None``.
    """
    images, labels = [], []
    for label, arrays in enumerate(per_class.values()):
        images.extend(arrays)
        labels.extend([label] * len(arrays))
    if not images:
        raise DatasetError("no images found in the split; check dataset.root and the split files")
    names = list(per_class)
    return ImageClasses(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=names,
        groups=[groups[n] if groups else n for n in names],
    )


def cache_key(**description: object) -> str:
    """16 hex digits hashing ``description`` (JSON) plus :data:`DECODE_VERSION`."""
    text = json.dumps({"decode": DECODE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(paths: Iterable[Path]) -> list[tuple[str, int]]:
    """``(path, size)`` of each file: cheap to list, and a changed file usually changes it."""
    return sorted((str(p), p.stat().st_size) for p in paths)


def folder_stamp(folder: Path) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every image below ``folder`` (``os.scandir`` gives sizes with the listing)."""
    stamp = []
    for dirpath, _, _ in os.walk(folder):
        with os.scandir(dirpath) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    rel = os.path.relpath(entry.path, folder)
                    stamp.append((rel, entry.stat().st_size))
    return sorted(stamp)


def cached(name: str, key: str, cache_dir: str | None, build: Callable[[], ImageClasses], what: str) -> ImageClasses:
    """:func:`cached_classes` at ``<cache_dir>/<name>_<key>.pt``."""
    return cached_classes(cache_dir_of(cache_dir) / f"{name}_{key}.pt", build, what)


def unpickle(path: Path, known: KnownFile) -> object:
    """``path`` unpickled after :func:`verify` passed (latin1: the CIFAR and Ren et al. pickles are Python 2's)."""
    return unpickle_all({path.name: (path, known)})[path.name]


def unpickle_all(files: Mapping[str, tuple[Path, KnownFile]]) -> dict[str, object]:
    """Every ``(path, known)`` verified first, then all unpickled: nothing is unpickled unless all match."""
    for path, known in files.values():
        verify(path, known)
    loaded = {}
    for name, (path, _) in files.items():
        with open(path, "rb") as fh:
            loaded[name] = pickle.load(fh, encoding="latin1")
    return loaded


def finish(splits: ClassSplits, image_size: int, what: str, within_group: bool = False) -> ClassSplits:
    """Check the splits (disjoint class names, ``[N, 3, S, S]`` uint8 images), log their sizes, and
    set the ``within_group`` task option."""
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        if tuple(classes.images.shape[1:]) != (3, image_size, image_size) or classes.images.dtype != torch.uint8:
            raise DatasetError(
                f"{what} {split} images are {tuple(classes.images.shape[1:])} {classes.images.dtype}, expected "
                f"(3, {image_size}, {image_size}) uint8; delete the cache (dataset.cache_dir) and rerun"
            )
        for name in classes.class_names:
            if name in seen:
                raise DatasetError(f"{what} class {name!r} is in both the {seen[name]} and {split} splits; "
                                   "the splits must be disjoint: check the split files")
            seen[name] = split
    logger.info(
        "%s: %d/%d/%d train/val/test classes, %d/%d/%d images",
        what, *(c.num_classes for _, c in splits.items()), *(c.images.shape[0] for _, c in splits.items()),
    )
    return dataclasses.replace(splits, within_group=within_group)


def read_class_folders(folder: Path, image_size: int, class_names: Iterable[str] | None = None) -> ImageClasses:
    """Images in ``folder/<class>/*.{jpg,jpeg,png}`` (hidden files skipped), classes and files sorted.

    Args:
        class_names: read only these class folders, in this order; default: every subfolder.
    """
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")) \
        if class_names is None else list(class_names)
    per_class: dict[str, list[np.ndarray]] = {}
    for name in names:
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DatasetError(f"class folder {class_dir} not found; dataset.root must hold the dataset's image folders")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        per_class[name] = [load_image(p, image_size) for p in files]
    return assemble(per_class)
