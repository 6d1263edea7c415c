"""tiered-ImageNet (Ren et al. 2018): 608 ImageNet classes in 34 superclasses, split by superclass.

Ren, Triantafillou, Ravi, Snell, Swersky, Tenenbaum, Larochelle and Zemel (2018), "Meta-Learning
for Semi-Supervised Few-Shot Classification", ICLR. 20/6/8 superclasses = 351/97/160 classes for
train/val/test, 84x84 images (448 695 / 124 261 / 206 209 of them).

Two formats are read:

* ``"pickle"``: Ren et al.'s files as learn2learn ships them (in ``root`` or ``root/tiered-imagenet``):
  ``{train,val,test}_images_png.pkl``, a sequence of PNG-encoded images (bytes or uint8 arrays), and
  ``{train,val,test}_labels.pkl``, a dict with ``label_specific`` and ``label_general`` (one int per
  image) and ``label_specific_str`` and ``label_general_str`` (the names, indexed by label). No
  published checksum is known for them: they are downloaded or opened only with the user's SHA-256
  in ``dataset.checksums`` (see :mod:`metarun.data.files`).
* ``"folder"``: ``train/<class>/*.jpg``, ``val/<class>/...``, ``test/<class>/...`` (JPEG or PNG).
  This layout says nothing about superclasses, so each class is its own group.

Groups are the superclass names (``label_general_str``) in the pickle format.
"""

from __future__ import annotations

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
FORMATS = ("auto", "pickle", "folder")

# learn2learn's Zenodo copy of Ren et al.'s files (learn2learn/vision/datasets/tiered_imagenet.py).
# No size or checksum has been published for them, hence None.
_ZENODO = "https://zenodo.org/record/7978538/files/tiered-imagenet-"
PICKLES: dict[str, KnownFile] = {
    f"{split}_{kind}": KnownFile(f"{split}_{kind}.pkl", urls=(f"{_ZENODO}{split}_{kind}.pkl",))
    for split in SPLITS
    for kind in ("images_png", "labels")
}
# learn2learn puts the files in this subfolder of its root.
L2L_SUBDIR = "tiered-imagenet"


def load_tieredimagenet(
    root: str,
    download: bool,
    format: str,
    image_size: int,
    channels: int,
    checksums: dict[str, str] | str | None,
    cache_dir: str | None,
    within_group: bool,
) -> ClassSplits:
    """tiered-ImageNet's 351/97/160 classes (Ren et al. 2018) as uint8 ``[N, 3, S, S]`` images.

    Args:
        root: folder with Ren et al.'s pickles (directly or in ``tiered-imagenet/``), or with
            ``train/``, ``val/``, ``test/`` image folders. ``~`` is expanded.
        download: fetch the pickles into ``root/tiered-imagenet`` (only with SHA-256s in ``checksums``).
        format: ``"pickle"``, ``"folder"`` or ``"auto"`` (pickles if present, else folders).
        image_size: side ``S`` of the square images (the pickles hold 84x84 images).
        channels: must be 3.
        checksums: ``{file name: sha256}`` or a ``sha256sum`` file, for files with no published checksum.
        cache_dir: decoded-image cache; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        within_group: draw every task's classes from one group (see Returns), as Koch et al. (2015) do.

    Returns:
        Class splits; class names are ``label_specific_str`` (pickles) or folder names, groups the
        superclass names (pickles) or the classes themselves (folders).

    Raises:
        DatasetError: files missing or not matching their checksum, or malformed.
    """
    decode.check_image_args(image_size, channels)
    base = Path(root).expanduser().resolve()
    if format not in FORMATS:
        raise DatasetError(f"unknown tiered-ImageNet format {format!r}; valid: {', '.join(FORMATS)}")
    pickle_dir = next((d for d in (base, base / L2L_SUBDIR) if (d / "train_images_png.pkl").is_file()), None)
    if format == "auto":
        if pickle_dir is not None or download:
            format = "pickle"
        elif all((base / s).is_dir() for s in SPLITS):
            format = "folder"
        else:
            raise DatasetError(
                f"tiered-ImageNet not found in {base}: expected *_images_png.pkl and *_labels.pkl (directly or in "
                f"{L2L_SUBDIR}/) or train/, val/, test/ folders; set dataset.root=... or dataset.download=true"
            )
    if format == "pickle":
        vouched = read_checksums(checksums)
        folder = pickle_dir or base / L2L_SUBDIR
        parts = [_load_pickle_split(folder, split, vouched, download, image_size, cache_dir) for split in SPLITS]
    else:
        parts = [_load_folder_split(base / split, split, image_size, cache_dir) for split in SPLITS]
    return decode.finish(ClassSplits(*parts), image_size, "tiered-ImageNet", within_group)


def _load_pickle_split(
    folder: Path, split: str, vouched: dict[str, str], download: bool, image_size: int, cache_dir: str | None
) -> ImageClasses:
    knowns = {kind: with_checksums(PICKLES[f"{split}_{kind}"], vouched) for kind in ("images_png", "labels")}
    paths = {kind: folder / known.name for kind, known in knowns.items()}
    for kind, path in paths.items():
        if not path.is_file() and not download:
            raise DatasetError(
                f"{path} not found; point dataset.root at the folder holding tiered-ImageNet's *_images_png.pkl "
                "and *_labels.pkl, or set dataset.download=true"
            )
        fetch_missing(path, knowns[kind], download)
    key = decode.cache_key(format="pickle", files=decode.file_stamp(paths.values()), image_size=image_size)

    def build() -> ImageClasses:
        # Labels first: they are small, and a malformed file is reported before the large one is read.
        labels = decode.unpickle(paths["labels"], knowns["labels"])
        fields = ("label_specific", "label_general", "label_specific_str", "label_general_str")
        if not isinstance(labels, dict) or any(f not in labels for f in fields):
            raise DatasetError(f"{paths['labels']} lacks {', '.join(fields)}; replace it with Ren et al.'s file")
        images = decode.unpickle(paths["images_png"], knowns["images_png"])
        specific = np.asarray(labels["label_specific"]).reshape(-1)
        general = np.asarray(labels["label_general"]).reshape(-1)
        if len(images) != len(specific) or len(general) != len(specific):
            raise DatasetError(
                f"{paths['images_png']} has {len(images)} images but {paths['labels']} {len(specific)} labels; "
                "the two files must come from the same split"
            )
        names = [str(n) for n in labels["label_specific_str"]]
        group_names = [str(n) for n in labels["label_general_str"]]
        per_class: dict[str, list[np.ndarray]] = {}
        groups: dict[str, str] = {}
        for label in sorted(set(specific.tolist())):
            name = names[label]
            indices = np.flatnonzero(specific == label)
            groups[name] = group_names[int(general[indices[0]])]
            per_class[name] = [
                decode.decode_image(_as_bytes(images[i]), image_size, f"{paths['images_png']}[{i}]") for i in indices
            ]
        return decode.assemble(per_class, groups)

    return decode.cached(f"tieredimagenet_{split}", key, cache_dir, build, f"tiered-ImageNet {split}")


def _as_bytes(item: object) -> bytes:
    """One encoded image: Ren et al.'s pickles hold uint8 arrays of PNG bytes; others hold bytes."""
    return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)  # type: ignore[arg-type]


def _load_folder_split(folder: Path, split: str, image_size: int, cache_dir: str | None) -> ImageClasses:
    """``folder/<class>/*.{jpg,jpeg,png}``, classes sorted by name."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found; dataset.root must hold train/, val/ and test/ class folders")
    key = decode.cache_key(format="folder", root=str(folder), files=decode.folder_stamp(folder), image_size=image_size)
    return decode.cached(
        f"tieredimagenet_{split}", key, cache_dir, lambda: decode.read_class_folders(folder, image_size),
        f"tiered-ImageNet {split}",
    )
