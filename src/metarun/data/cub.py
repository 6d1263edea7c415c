"""CUB-200-2011: 11 788 photographs of 200 bird species (Wah et al. 2011, Caltech CNS-TR-2011-001).

Read from the official tarball ``CUB_200_2011.tgz`` (extracted into ``root`` once its size and
SHA-256 match, with tarfile's ``"data"`` filter) or from the extracted ``CUB_200_2011/`` folder
(``classes.txt``, ``images.txt``, ``image_class_labels.txt``, ``bounding_boxes.txt``, ``images/``).
Images are resized to ``image_size`` (84 by default), whole by default: that is what Chen et al.
(2019) feed their networks; ``bounding_box=True`` crops each bird to its annotated box first (as
learn2learn's ``bounding_box_crop`` option does), which makes the task easier and is not comparable.

Class splits:

* ``"closer_look"`` (default; Chen, Liu, Kira, Wang and Huang 2019, "A Closer Look at Few-shot
  Classification", ICLR; ``filelists/CUB/write_CUB_filelist.py`` of wyharveychen/CloserLookFewShot,
  following Hilliard et al. 2018): class ``i`` of the 200 sorted classes (0-based) is train if
  ``i % 2 == 0``, val if ``i % 4 == 1``, test if ``i % 4 == 3``: 100/50/50 classes.
* ``"meta_dataset"`` (Triantafillou et al. 2020): 140/30/30 classes, the lists learn2learn ships
  (``learn2learn.vision.datasets.cu_birds200.SPLITS``). Unlike learn2learn, the 43 images that also
  appear in ImageNet are kept.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from pathlib import Path

import numpy as np

from metarun.data import decode
from metarun.data.base import ClassSplits, ImageClasses, split_by_names
from metarun.data.files import KnownFile, verify
from metarun.data.files import download as download_file
from metarun.errors import DatasetError

# How an image file becomes one of this dataset's images (metarun-eval --episodes reads them with it).
load_image = decode.load_image

logger = logging.getLogger(__name__)

# Size and SHA-256 as TFDS publishes them (tensorflow_datasets/url_checksums/caltech_birds2011.txt,
# for the Google-Drive copy that learn2learn also uses); MD5 as widely published for the Caltech file.
# URLs: CaltechDATA (the official host) and learn2learn's Zenodo copy.
TARBALL = KnownFile(
    "CUB_200_2011.tgz",
    size=1150585339,
    sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
    md5="97eceeb196236b17998738112f37df78",
    urls=(
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "https://zenodo.org/record/8000562/files/CUB_200_2011.tgz",
    ),
)
FOLDER = "CUB_200_2011"
L2L_SUBDIR = "cubirds200"  # learn2learn keeps the data in this subfolder of its root
SPLITS = ("closer_look", "meta_dataset")


def load_cub(
    root: str,
    download: bool,
    split: str,
    image_size: int,
    channels: int,
    bounding_box: bool,
    cache_dir: str | None,
    within_group: bool,
) -> ClassSplits:
    """CUB-200-2011 cut into train/val/test classes, uint8 ``[N, 3, S, S]`` images.

    Args:
        root: folder with ``CUB_200_2011/`` or ``CUB_200_2011.tgz`` (directly or in ``cubirds200/``),
            or the ``CUB_200_2011`` folder itself. ``~`` is expanded.
        download: fetch the tarball into ``root`` (size and SHA-256 checked) when no data is found.
        split: ``"closer_look"`` (100/50/50, Chen et al. 2019) or ``"meta_dataset"`` (140/30/30).
        image_size: side ``S`` of the square images.
        channels: must be 3.
        bounding_box: crop each image to its bounding box before resizing.
        cache_dir: decoded-image cache; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        within_group: draw every task's classes from one group (see Returns), as Koch et al. (2015) do.

    Returns:
        Class splits named like ``"001.Black_footed_Albatross"``; each class is its own group.
    """
    decode.check_image_args(image_size, channels)
    if split not in SPLITS:
        raise DatasetError(f"unknown CUB split {split!r}; valid: {', '.join(SPLITS)}")
    folder = _locate(Path(root).expanduser().resolve(), download)
    classes = load_cub_classes(folder, image_size, bounding_box, cache_dir)
    return decode.finish(split_by_names(classes, split_names(classes.class_names, split)), image_size, "CUB", within_group)


def split_names(class_names: list[str], split: str) -> dict[str, list[str]]:
    """The class names of each split (see the module docstring)."""
    if split == "closer_look":
        ordered = sorted(class_names)
        return {
            "train": [n for i, n in enumerate(ordered) if i % 2 == 0],
            "val": [n for i, n in enumerate(ordered) if i % 4 == 1],
            "test": [n for i, n in enumerate(ordered) if i % 4 == 3],
        }
    from metarun._learn2learn import l2l

    lists = l2l.vision.datasets.cu_birds200.SPLITS
    return {"train": list(lists["train"]), "val": list(lists["validation"]), "test": list(lists["test"])}


def _locate(root: Path, download: bool) -> Path:
    """The extracted ``CUB_200_2011`` folder, extracting (and first downloading) the tarball if needed."""
    for candidate in (root, root / FOLDER, root / L2L_SUBDIR / FOLDER):
        if (candidate / "images.txt").is_file():
            return candidate
    tarball = next((p for p in (root / TARBALL.name, root / L2L_SUBDIR / TARBALL.name) if p.is_file()), None)
    if tarball is None:
        if not download:
            raise DatasetError(
                f"CUB-200-2011 not found in {root}: expected {FOLDER}/ (with images.txt) or {TARBALL.name}; "
                "set dataset.root=... to it, or dataset.download=true"
            )
        tarball = root / TARBALL.name
        download_file(TARBALL, tarball)  # verified before it gets its name
    else:
        verify(tarball, TARBALL)
    logger.info("extracting %s into %s", tarball, tarball.parent)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(tarball.parent, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"cannot extract {tarball} ({err}); delete it and download it again") from err
    folder = tarball.parent / FOLDER
    if not (folder / "images.txt").is_file():
        raise DatasetError(f"{tarball} did not contain {FOLDER}/images.txt; replace it with the official tarball")
    return folder


def _read_table(path: Path) -> list[list[str]]:
    """Rows ``<id> <value> ...`` of one of CUB's index files."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; the {FOLDER} folder is incomplete: extract the official tarball again")
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_cub_classes(folder: Path, image_size: int, bounding_box: bool, cache_dir: str | None) -> ImageClasses:
    """All 200 classes of an extracted ``CUB_200_2011`` folder, images in ``images.txt`` order."""
    index_files = ["images.txt", "image_class_labels.txt", "classes.txt"] + (["bounding_boxes.txt"] * bounding_box)
    key = decode.cache_key(
        root=str(folder),
        index={name: hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else None
               for name in index_files},
        files=decode.folder_stamp(folder / "images"),
        image_size=image_size,
        bounding_box=bounding_box,
    )

    def build() -> ImageClasses:
        paths = {row[0]: row[1] for row in _read_table(folder / "images.txt")}
        labels = {row[0]: row[1] for row in _read_table(folder / "image_class_labels.txt")}
        names = {row[0]: row[1] for row in _read_table(folder / "classes.txt")}
        boxes = {}
        if bounding_box:
            for image_id, x, y, w, h in _read_table(folder / "bounding_boxes.txt"):
                left, top = int(float(x)), int(float(y))
                boxes[image_id] = (left, top, left + int(float(w)), top + int(float(h)))
        per_class: dict[str, list[np.ndarray]] = {names[c]: [] for c in sorted(names, key=lambda c: names[c])}
        for image_id, relative in sorted(paths.items(), key=lambda item: int(item[0])):
            path = folder / "images" / relative
            if not path.is_file():
                raise DatasetError(f"{path} (listed in images.txt) not found; extract the official tarball again")
            per_class[names[labels[image_id]]].append(
                decode.decode_image(path.read_bytes(), image_size, str(path), boxes.get(image_id))
            )
        return decode.assemble(per_class)

    return decode.cached("cub", key, cache_dir, build, "CUB-200-2011")
