"""mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's (2017) class split.

100 ImageNet classes, 600 images each, resized to 84x84; 64 train / 16 val / 20 test classes
(Ravi and Larochelle 2017, "Optimization as a Model for Few-Shot Learning", ICLR; the split
files are ``data/miniImagenet/{train,val,test}.csv`` of github.com/twitter/meta-learning-lstm).

Two formats are read:

* ``"pickle"``: learn2learn's caches ``mini-imagenet-cache-{train,validation,test}.pkl``, each a
  dict with ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (``{wnid: [indices]}``).
  No published checksum is known for them, so they are downloaded or opened only with the user's
  SHA-256 in ``dataset.checksums`` (see :mod:`metarun.data.files`).
* ``"folder"``: Ravi's layout, an ``images/`` folder of ``nXXXXXXXXYYYYYYYY.jpg`` (flat, or in
  ``images/<wnid>/``) plus ``train.csv``, ``val.csv``, ``test.csv`` with header
  ``filename,label`` in ``split_dir`` (default: ``root``). Images are resized to ``image_size``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np

from metarun.data import decode
from metarun.data.base import ClassSplits, ImageClasses
from metarun.data.files import KnownFile, fetch_missing, read_checksums, with_checksums
from metarun.errors import DatasetError

# How an image file becomes one of this dataset's images (metarun-eval --episodes reads them with it).
load_image = decode.load_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# learn2learn's file names use "validation". URLs are learn2learn's (Zenodo first, then Dropbox);
# its Google-Drive fallback is left out: it answers large files with an HTML page. No size or
# checksum has been published for these files, hence None (the user may supply a SHA-256).
PICKLES: dict[str, KnownFile] = {
    split: KnownFile(
        f"mini-imagenet-cache-{mode}.pkl",
        urls=(
            f"https://zenodo.org/record/7978538/files/mini-imagenet-cache-{mode}.pkl",
            f"https://www.dropbox.com/s/{box}/mini-imagenet-cache-{mode}.pkl?dl=1",
        ),
    )
    for split, mode, box in (
        ("train", "train", "9g8c6w345s2ek03"),
        ("val", "validation", "ip1b7se3gij3r1b"),
        ("test", "test", "ye9jeb5tyz0x01b"),
    )
}

FORMATS = ("auto", "pickle", "folder")


def load_miniimagenet(
    root: str,
    download: bool,
    format: str,
    split_dir: str | None,
    image_size: int,
    channels: int,
    checksums: dict[str, str] | str | None,
    cache_dir: str | None,
    within_group: bool,
) -> ClassSplits:
    """mini-ImageNet's 64/16/20 classes (Ravi & Larochelle 2017) as uint8 ``[N, 3, S, S]`` images.

    Args:
        root: folder with learn2learn's three pickles, or with Ravi's ``images/`` folder. ``~`` is expanded.
        download: fetch learn2learn's pickles into ``root`` (only with their SHA-256 in ``checksums``).
        format: ``"pickle"``, ``"folder"`` or ``"auto"`` (pickles if all three are in ``root``, else the folder).
        split_dir: folder with ``train.csv``, ``val.csv``, ``test.csv`` (folder format); default ``root``.
        image_size: side ``S`` of the square images.
        channels: must be 3.
        checksums: ``{file name: sha256}`` or a ``sha256sum`` file, for files with no published checksum.
        cache_dir: decoded-image cache; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        within_group: draw every task's classes from one group (see Returns), as Koch et al. (2015) do.

    Returns:
        Class splits whose class names are WordNet ids and whose groups are the classes themselves.
        The real data has 38400/9600/12000 images.

    Raises:
        DatasetError: files missing or not matching their checksum, or malformed.
    """
    decode.check_image_args(image_size, channels)
    base = Path(root).expanduser().resolve()
    vouched = read_checksums(checksums)
    chosen = _choose_format(base, format, download)
    if chosen == "pickle":
        knowns = {split: with_checksums(PICKLES[split], vouched) for split in SPLITS}
        parts = [_load_pickle_split(base, split, knowns[split], download, image_size, cache_dir) for split in SPLITS]
    else:
        csv_dir = Path(split_dir).expanduser().resolve() if split_dir else base
        parts = [_load_folder_split(base, csv_dir, split, image_size, cache_dir) for split in SPLITS]
    return decode.finish(ClassSplits(*parts), image_size, "mini-ImageNet", within_group)


def _choose_format(base: Path, format: str, download: bool) -> str:
    if format not in FORMATS:
        raise DatasetError(f"unknown mini-ImageNet format {format!r}; valid: {', '.join(FORMATS)}")
    if format != "auto":
        return format
    if all((base / k.name).is_file() for k in PICKLES.values()):
        return "pickle"
    if (base / "images").is_dir():
        return "folder"
    if download:
        return "pickle"
    raise DatasetError(
        f"mini-ImageNet not found in {base}: expected learn2learn's mini-imagenet-cache-*.pkl or an images/ "
        "folder with Ravi's CSVs; set dataset.root=... to the data, or dataset.download=true"
    )


def _load_pickle_split(
    base: Path, split: str, known: KnownFile, download: bool, image_size: int, cache_dir: str | None
) -> ImageClasses:
    path = base / known.name
    if not path.is_file() and not download:
        raise DatasetError(
            f"{path} not found; point dataset.root at the folder holding learn2learn's mini-imagenet-cache-*.pkl, "
            "or set dataset.download=true"
        )
    fetch_missing(path, known, download)
    key = decode.cache_key(format="pickle", file=str(path), size=path.stat().st_size, image_size=image_size)

    def build() -> ImageClasses:
        data = decode.unpickle(path, known)
        images = data.get("image_data") if isinstance(data, dict) else None
        index = data.get("class_dict") if isinstance(data, dict) else None
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 or not isinstance(index, dict):
            raise DatasetError(
                f"{path} is not a mini-ImageNet cache (a dict with image_data [N, 84, 84, 3] and class_dict); "
                "replace it with learn2learn's file"
            )
        per_class = {
            wnid: [decode.resize_array(images[i], image_size) for i in index[wnid]] for wnid in sorted(index)
        }
        return decode.assemble(per_class)

    return decode.cached(f"miniimagenet_{split}", key, cache_dir, build, f"mini-ImageNet {split}")


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of one of Ravi's split files."""
    if not path.is_file():
        raise DatasetError(
            f"split file {path} not found; set dataset.split_dir to a folder with Ravi & Larochelle's "
            "train.csv, val.csv and test.csv (header filename,label)"
        )
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DatasetError(f"{path} does not start with the header filename,label; use Ravi & Larochelle's file")
    return [(r[0].strip(), r[1].strip()) for r in rows[1:] if len(r) >= 2]


def _load_folder_split(base: Path, csv_dir: Path, split: str, image_size: int, cache_dir: str | None) -> ImageClasses:
    csv_path = csv_dir / f"{split}.csv"
    rows = _read_csv(csv_path)
    images_dir = base / "images"

    def locate(filename: str, label: str) -> Path:
        for path in (images_dir / filename, images_dir / label / filename):
            if path.is_file():
                return path
        raise DatasetError(
            f"{images_dir / filename} (listed in {csv_path}) not found; dataset.root must hold the images/ "
            "folder of mini-ImageNet"
        )

    paths = [(locate(f, label), label) for f, label in rows]
    key = decode.cache_key(
        format="folder",
        csv=hashlib.sha256(csv_path.read_bytes()).hexdigest(),
        files=decode.file_stamp(p for p, _ in paths),
        image_size=image_size,
    )

    def build() -> ImageClasses:
        per_class: dict[str, list[np.ndarray]] = {}
        for path, label in sorted(paths, key=lambda item: (item[1], item[0].name)):
            per_class.setdefault(label, []).append(decode.decode_image(path.read_bytes(), image_size, str(path)))
        return decode.assemble(per_class)

    return decode.cached(f"miniimagenet_{split}", key, cache_dir, build, f"mini-ImageNet {split}")
