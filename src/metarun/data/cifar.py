"""CIFAR-FS and FC100: few-shot splits of the 100 CIFAR-100 classes, 600 32x32 images each.

* CIFAR-FS (Bertinetto, Henriques, Torr and Vedaldi 2019, "Meta-learning with differentiable
  closed-form solvers", ICLR): 64/16/20 classes drawn at random.
* FC100 (Oreshkin, Rodriguez and Lacoste 2018, "TADAM: Task dependent adaptive metric for improved
  few-shot learning", NeurIPS): split by superclass, 12/4/4 superclasses = 60/20/20 classes, so
  test classes share no superclass with training classes.

Both read the CIFAR-100 python release (Krizhevsky 2009): ``cifar-100-python.tar.gz`` (read in
place after its checksum matches, never extracted) or its extracted ``cifar-100-python/`` folder
(``train``, ``test``, ``meta`` pickles, each checked against torchvision's MD5). Its 500 train and
100 test images of each class are merged, as both papers do. learn2learn's own formats are read
too: for CIFAR-FS the PNG folders of its ``cifar100.zip`` (``data/<class>/*.png``), for FC100 the
pickles ``FC100_{train,val,test}.pickle`` of MetaOptNet (Lee et al. 2019; dict with ``data``
uint8 ``[N, 32, 32, 3]`` and ``labels``). No checksum is published for learn2learn's files:
the FC100 pickles are opened only with the user's SHA-256 in ``dataset.checksums``.

The split lists below are the published ones as torchmeta ships them
(github.com/tristandeleu/pytorch-meta, ``torchmeta/datasets/assets/cifar100/cifar-fs/*.json``
and ``.../fc100/*.json``); CIFAR-FS's are Bertinetto et al.'s ``splits/bertinetto/*.txt``
(github.com/bertinetto/r2d2), FC100's the superclasses of Oreshkin et al.'s supplementary material.
"""

from __future__ import annotations

import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np

from metarun.data import decode
from metarun.data.base import ClassSplits, ImageClasses, split_by_names
from metarun.data.files import KnownFile, fetch_missing, read_checksums, verify, with_checksums
from metarun.errors import DatasetError

# How an image file becomes one of this dataset's images (metarun-eval --episodes reads them with it).
load_image = decode.load_image

logger = logging.getLogger(__name__)

# The 20 CIFAR-100 superclasses and their 5 classes each (Krizhevsky 2009, the CIFAR page). Both
# lists are alphabetical, which is also the order of the label indices in the release's meta file.
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
SUPERCLASS_OF = {fine: coarse for coarse, fines in SUPERCLASSES.items() for fine in fines}
FINE_NAMES = sorted(SUPERCLASS_OF)  # index = CIFAR-100 fine label

CIFARFS_SPLIT: dict[str, list[str]] = {
    "train": [
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl",
        "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch",
        "bee", "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ],
    "val": [
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ],
    "test": [
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ],
}

FC100_SUPERCLASSES: dict[str, list[str]] = {
    "train": [
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
        "trees", "vehicles_1", "vehicles_2",
    ],
    "val": ["large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"],
    "test": ["aquatic_mammals", "insects", "medium_mammals", "people"],
}
FC100_SPLIT = {split: [c for s in supers for c in SUPERCLASSES[s]] for split, supers in FC100_SUPERCLASSES.items()}

# The release and its three members. Archive: size and SHA-256 as Keras (keras/datasets/cifar100.py,
# file_hash) and TFDS (url_checksums/cifar100.csv) publish them, MD5 as torchvision does; members:
# torchvision's MD5s (torchvision/datasets/cifar.py).
ARCHIVE = KnownFile(
    "cifar-100-python.tar.gz",
    size=169001437,
    sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
)
ARCHIVE_DIR = "cifar-100-python"
MEMBERS = {
    "train": KnownFile("train", md5="16019d7e3df5f24257cddd939b257f8d"),
    "test": KnownFile("test", md5="f0ef6b0ae62326f3e7ffdfab6717acfc"),
    "meta": KnownFile("meta", md5="7973b15100ade9c7d40fb424638fde48"),
}
# MetaOptNet's FC100 pickles as learn2learn downloads them (zipped); no published checksum.
FC100_PICKLES = {
    split: KnownFile(f"FC100_{split}.pickle", urls=("https://zenodo.org/record/7978538/files/fc100.zip",))
    for split in ("train", "val", "test")
}


def load_cifarfs(
    root: str,
    download: bool,
    format: str,
    image_size: int,
    channels: int,
    cache_dir: str | None,
    within_group: bool,
) -> ClassSplits:
    """CIFAR-FS (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes, uint8 ``[N, 3, S, S]``.

    Args:
        root: folder with ``cifar-100-python.tar.gz`` or ``cifar-100-python/``, or with learn2learn's
            ``data/<class>/*.png`` (directly, in ``cifar100/`` or in ``cifarfs/cifar100/``).
        download: fetch the CIFAR-100 archive into ``root`` (size and SHA-256 checked).
        format: ``"archive"`` (the CIFAR-100 release), ``"folder"`` (learn2learn's PNGs) or ``"auto"``.
        image_size: side ``S`` (32 is the native size; others are resized).
        channels: must be 3.
        cache_dir: decoded-image cache; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        within_group: draw every task's classes from one group (see Returns), as Koch et al. (2015) do.

    Returns:
        Class splits named by CIFAR-100 class name; each class is its own group.
    """
    decode.check_image_args(image_size, channels)
    base = Path(root).expanduser().resolve()
    png_dir = next((d / "data" for d in (base, base / "cifar100", base / "cifarfs" / "cifar100")
                    if (d / "data").is_dir()), None)
    if format not in ("auto", "archive", "folder"):
        raise DatasetError(f"unknown CIFAR-FS format {format!r}; valid: auto, archive, folder")
    if format == "folder" or (format == "auto" and png_dir is not None and not _has_release(base)):
        if png_dir is None:
            raise DatasetError(f"no data/<class>/*.png folder in {base}; point dataset.root at learn2learn's cifar100")
        key = decode.cache_key(format="folder", root=str(png_dir), files=decode.folder_stamp(png_dir),
                               image_size=image_size)
        classes = decode.cached(
            "cifar100_png", key, cache_dir, lambda: decode.read_class_folders(png_dir, image_size, FINE_NAMES),
            "CIFAR-100 PNGs",
        )
    else:
        classes = load_cifar100_classes(base, download, image_size, cache_dir)
    splits = split_by_names(classes, CIFARFS_SPLIT)
    for _, part in splits.items():
        part.groups = list(part.class_names)  # CIFAR-FS's split ignores superclasses
    return decode.finish(splits, image_size, "CIFAR-FS", within_group)


def load_fc100(
    root: str,
    download: bool,
    format: str,
    image_size: int,
    channels: int,
    checksums: dict[str, str] | str | None,
    cache_dir: str | None,
    within_group: bool,
) -> ClassSplits:
    """FC100 (Oreshkin et al. 2018): 60/20/20 CIFAR-100 classes of 12/4/4 superclasses, uint8 ``[N, 3, S, S]``.

    Args:
        root: folder with ``cifar-100-python.tar.gz`` or ``cifar-100-python/``, or with MetaOptNet's
            ``FC100_{train,val,test}.pickle``.
        download: fetch the CIFAR-100 archive into ``root`` (size and SHA-256 checked).
        format: ``"archive"`` (the CIFAR-100 release), ``"pickle"`` (MetaOptNet's) or ``"auto"``.
        image_size: side ``S`` (32 is the native size; others are resized).
        channels: must be 3.
        checksums: ``{file name: sha256}`` or a ``sha256sum`` file, for the FC100 pickles.
        cache_dir: decoded-image cache; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        within_group: draw every task's classes from one group (see Returns), as Koch et al. (2015) do.

    Returns:
        Class splits named by CIFAR-100 class name, grouped by superclass.
    """
    decode.check_image_args(image_size, channels)
    base = Path(root).expanduser().resolve()
    if format not in ("auto", "archive", "pickle"):
        raise DatasetError(f"unknown FC100 format {format!r}; valid: auto, archive, pickle")
    has_pickles = all((base / k.name).is_file() for k in FC100_PICKLES.values())
    if format == "pickle" or (format == "auto" and has_pickles and not _has_release(base)):
        vouched = read_checksums(checksums)
        parts = [_load_fc100_pickle(base, split, with_checksums(FC100_PICKLES[split], vouched), image_size, cache_dir)
                 for split in ("train", "val", "test")]
        return decode.finish(ClassSplits(*parts), image_size, "FC100", within_group)
    classes = load_cifar100_classes(base, download, image_size, cache_dir)
    return decode.finish(split_by_names(classes, FC100_SPLIT), image_size, "FC100", within_group)


def _has_release(base: Path) -> bool:
    return (base / ARCHIVE.name).is_file() or (base / ARCHIVE_DIR).is_dir()


def load_cifar100_classes(base: Path, download: bool, image_size: int, cache_dir: str | None) -> ImageClasses:
    """All 100 CIFAR-100 classes, train and test images merged (600 each), grouped by superclass.

    Reads ``base/cifar-100-python/`` if present, else ``base/cifar-100-python.tar.gz`` (downloaded
    first with ``download``). Every pickle is verified before it is unpickled.
    """
    folder = base / ARCHIVE_DIR
    if folder.is_dir():
        files = [folder / name for name in MEMBERS]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]} not found; {folder} must hold train, test and meta of CIFAR-100 python")
        source = {"folder": decode.file_stamp(files)}
    else:
        archive = base / ARCHIVE.name
        if not archive.is_file() and not download:
            raise DatasetError(
                f"CIFAR-100 not found: {base} holds neither {ARCHIVE.name} nor {ARCHIVE_DIR}/; point dataset.root "
                "at it, or set dataset.download=true"
            )
        fetch_missing(archive, ARCHIVE, download)
        source = {"archive": decode.file_stamp([archive])}
    key = decode.cache_key(format="cifar-100-python", image_size=image_size, **source)

    def build() -> ImageClasses:
        if folder.is_dir():
            parts = decode.unpickle_all({name: (folder / name, known) for name, known in MEMBERS.items()})
        else:
            parts = _read_archive(base / ARCHIVE.name)
        return _cifar_classes(parts, image_size)

    return decode.cached("cifar100", key, cache_dir, build, "CIFAR-100")


def _read_archive(archive: Path) -> dict[str, object]:
    """The three pickles of the verified archive, read in place (nothing is extracted)."""
    verify(archive, ARCHIVE)
    parts = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in MEMBERS:
                member = tar.extractfile(f"{ARCHIVE_DIR}/{name}")
                if member is None:
                    raise KeyError(name)
                parts[name] = pickle.loads(member.read(), encoding="latin1")
    except (tarfile.TarError, KeyError, EOFError, OSError) as err:
        raise DatasetError(f"cannot read {archive} ({err}); delete it and download it again") from err
    return parts


def _cifar_classes(parts: dict[str, object], image_size: int) -> ImageClasses:
    """Merge the train and test pickles into one :class:`ImageClasses` in fine-label order."""
    meta = parts["meta"]
    if not isinstance(meta, dict) or list(meta.get("fine_label_names", [])) != FINE_NAMES:
        raise DatasetError("the CIFAR-100 meta file does not list the 100 CIFAR-100 classes; use the official release")
    images, labels = [], []
    for name in ("train", "test"):
        part = parts[name]
        if not isinstance(part, dict) or "data" not in part or "fine_labels" not in part:
            raise DatasetError(f"the CIFAR-100 {name} file lacks data or fine_labels; use the official release")
        images.append(np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(part["fine_labels"], dtype=np.int64))
    all_images, all_labels = np.concatenate(images), np.concatenate(labels)
    per_class = {}
    for label, fine in enumerate(FINE_NAMES):
        chosen = all_images[all_labels == label]
        per_class[fine] = [decode.resize_array(img.transpose(1, 2, 0), image_size) for img in chosen]
    return decode.assemble(per_class, SUPERCLASS_OF)


def _load_fc100_pickle(base: Path, split: str, known: KnownFile, image_size: int, cache_dir: str | None) -> ImageClasses:
    path = base / known.name
    if not path.is_file():
        raise DatasetError(f"{path} not found; point dataset.root at the folder holding FC100_{{train,val,test}}.pickle")
    key = decode.cache_key(format="fc100-pickle", files=decode.file_stamp([path]), image_size=image_size)

    def build() -> ImageClasses:
        data = decode.unpickle(path, known)
        if not isinstance(data, dict) or "data" not in data or "labels" not in data:
            raise DatasetError(f"{path} lacks data or labels; replace it with MetaOptNet's FC100 file")
        images = np.asarray(data["data"], dtype=np.uint8)
        labels = np.asarray(data["labels"], dtype=np.int64).reshape(-1)
        expected = {FINE_NAMES.index(c) for c in FC100_SPLIT[split]}
        # The labels are CIFAR-100 fine labels when they fall in this split's classes; otherwise
        # they are anonymous and the classes are named by label (with no superclass known).
        named = set(labels.tolist()) <= expected
        if not named:
            logger.warning("%s: labels are not CIFAR-100 fine labels of the FC100 %s split; naming classes by label",
                           path, split)
        per_class = {}
        for label in sorted(set(labels.tolist())):
            name = FINE_NAMES[label] if named else f"fc100_{split}_{label}"
            per_class[name] = [decode.resize_array(img, image_size) for img in images[labels == label]]
        return decode.assemble(per_class, SUPERCLASS_OF if named else None)

    return decode.cached(f"fc100_{split}", key, cache_dir, build, f"FC100 {split}")
