"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings each (Lake et al. 2015).

Lake, Salakhutdinov and Tenenbaum (2015), "Human-level concept learning through probabilistic
program induction", Science 350(6266). The official release is two zips of 105x105 PNGs with black
ink on white: ``images_background`` (30 alphabets, 964 characters) and ``images_evaluation``
(20 alphabets, 659 characters), laid out as ``<part>/<Alphabet>/characterNN/<drawing>.png``.

One thing: the Omniglot dataset, from the official zips to its class splits (MAML's, Vinyals', by
alphabet), with rotations and the cache.

Reading goes in two steps:

1. :func:`load_omniglot_classes` finds the files (folders or the official zips, optionally in a
   torchvision-style ``omniglot-py/`` subfolder), downloads the missing zips on request, decodes
   every PNG once into a small uint8 tensor with bright ink, and caches the result on disk.
2. :func:`load_omniglot` cuts the characters into train/val/test classes, either with MAML's
   seeded shuffle (Finn et al. 2017) or from Vinyals et al.'s (2016) split lists, and adds the
   rotated copies used as extra classes by both protocols.

Zips are read in place with :mod:`zipfile` and never extracted, so nothing is written next to the
user's data except the zips that ``download=True`` fetches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import time
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data.base import (
    SPLIT_NAMES,
    ClassSplits,
    DatasetError,
    ImageClasses,
    cached_classes,
    check_split_sizes,
    split_by_groups,
    split_by_names,
    split_by_seed,
    split_set,
    with_rotations,
)
from metarun.data.base import cache_dir as cache_dir_of
from metarun.data.decode import read_bytes
from metarun.data.files import KnownFile, verify
from metarun.data.files import download as download_file
from metarun.errors import one_line

logger = logging.getLogger(__name__)

# The two halves of the official release, with the MD5s torchvision publishes (no SHA-256 is
# published for them). Tests replace the entries (monkeypatch) to serve a small zip from a file:// URL.
_OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_FILES: dict[str, KnownFile] = {
    part: KnownFile(f"{part}.zip", md5=md5, urls=(f"{_OMNIGLOT_URL}/{part}.zip",))
    for part, md5 in (
        ("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
        ("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"),
    )
}
PARTS = tuple(OMNIGLOT_FILES)

# torchvision's Omniglot dataset keeps its files in this subfolder of its root.
TORCHVISION_SUBDIR = "omniglot-py"

SPLITS = ("maml", "vinyals", "alphabets")

# The 20 alphabets of images_evaluation: the test alphabets of Lake et al.'s and Koch et al.'s
# (2015) one-shot protocol. The other 30 (images_background) are for training and validation.
EVALUATION_ALPHABETS = (
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic", "Gurmukhi",
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti",
    "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
)

# Bump when the decoding or the cache layout changes: it is part of the cache key, so old caches
# are simply not found any more (and can be deleted by hand).
CACHE_FORMAT_VERSION = 1

# Vinyals et al.'s split files name rotated classes "Alphabet/characterNN/rot090".
_ROTATION_SUFFIX = re.compile(r"/rot\d{3}$")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load_omniglot(
    root: str,
    download: bool,
    image_size: int,
    rotations: bool | str | list[str],
    split: str,
    split_seed: int,
    split_sizes: tuple[int, int, int] | list[int],
    split_dir: str | None,
    cache_dir: str | None,
    val_alphabets: int,
    within_group: bool | str | list[str],
    channels: int,
) -> ClassSplits:
    """Omniglot (Lake et al. 2015) cut into meta-train, meta-validation and meta-test classes.

    Two protocols:

    * ``split="maml"`` (Finn et al. 2017): a seeded shuffle of the 1623 characters cut into
      ``split_sizes`` (1100/100/423), then, if ``rotations``, every split gets the 90/180/270
      degree rotations of its own characters as extra classes (4400/400/1692 classes). Rotations
      of a train character are therefore never seen at validation or test time.
    * ``split="vinyals"`` (Vinyals et al. 2016): the classes listed in ``split_dir``'s
      ``train.txt``, ``val.txt`` and ``test.txt`` (one class name per line). When the names end in
      ``/rotNNN`` the rotated classes are built first and then selected by name, so the files
      alone decide which rotations exist and ``rotations`` must not be ``False``.
    * ``split="alphabets"`` (Koch et al. 2015): by alphabet. The 20 evaluation alphabets are the
      test split; the 30 background alphabets are shuffled with ``split_seed`` and
      ``val_alphabets`` of them (Koch: 10) become the validation split, the rest train.
      Rotations, if on, are added per split as for ``maml``. The Omniglot challenge's one-shot
      protocol (Lake et al. 2015, 2019) is this split with ``rotations="train"`` and
      ``within_group="eval"``: ``conf/dataset/omniglot_challenge.yaml`` holds its values.

    ``rotations`` may name the splits that get rotated classes: ``"train"`` (or ``["train"]``)
    trains on rotated characters and validates and tests on unrotated ones; ``True``/``"all"``
    and ``False``/``"none"`` are every split and none. With ``vinyals`` lists that name rotations,
    a split left out keeps only the ``/rot000`` classes of its list.

    With ``within_group`` every task's classes come from one alphabet (Koch's 20-way
    within-alphabet one-shot task); this works with every split.

    Args:
        root: folder holding ``images_background`` and ``images_evaluation`` as folders or as the
            official zips, directly or in an ``omniglot-py/`` subfolder. ``~`` is expanded.
        download: fetch the missing official zips into ``root`` (checked against their MD5).
        image_size: side ``S`` of the square images after resizing.
        rotations: ``maml`` split: add rotated copies (0/90/180/270 degrees) as new classes, to
            every split (``True``), none (``False``), or the splits named (``"train"``, a list;
            see :func:`metarun.data.base.split_set`). ``vinyals`` split: the lists decide; ``False``
            with lists naming rotations is an error.
        split: ``"maml"`` or ``"vinyals"``.
        split_seed: seed of the ``maml`` shuffle; independent of the run seed.
        split_sizes: train/val/test class counts of the ``maml`` split, before rotations; ``-1``
            for test means "all the rest".
        split_dir: folder with the ``vinyals`` split lists.
        val_alphabets: background alphabets held out for validation by the ``alphabets`` split.
        within_group: draw every task's classes from one alphabet: in every split (``True``), or in
            the splits named (``"test"``, ``["val", "test"]``; :func:`metarun.data.base.split_set`).
        channels: must be 1 (Omniglot is greyscale); the backbones read it from the config.
        cache_dir: where the decoded images are cached; ``None`` means ``$METARUN_CACHE`` or
            ``~/.cache/metarun``.

    Returns:
        Disjoint class splits. Each holds uint8 images ``[N, 1, S, S]`` (ink 255, background 0),
        int64 labels ``[N]`` and one name (``"Alphabet/characterNN"``, plus ``"/rotNNN"`` with
        rotations) and one group (the alphabet) per class.

    Raises:
        DatasetError: the data or the split files are missing or corrupt, or the arguments do not
            fit together.
    """
    # Check the cheap things (split arguments, split files) before decoding 32460 images.
    if channels != 1:
        raise DatasetError(f"Omniglot images have 1 channel, got dataset.channels={channels}; set dataset.channels=1")
    rotated_splits = split_set(rotations, "dataset.rotations")
    if split in ("maml", "alphabets"):
        sizes = check_split_sizes(split_sizes) if split == "maml" else None
        names, rotated = None, False
    elif split == "vinyals":
        names = _read_split_lists(split_dir)
        rotated = _names_are_rotated(names)
        if rotated and not rotated_splits:
            raise DatasetError(
                f"the split lists in {Path(split_dir).expanduser().resolve()} name rotated classes "
                "(.../rotNNN) but dataset.rotations=false; set dataset.rotations=true or use split "
                "lists without rotations"
            )
    else:
        raise DatasetError(
            f"unknown Omniglot split {split!r}; valid splits: 'maml' (Finn et al. 2017, seeded) or "
            "'vinyals' (Vinyals et al. 2016, needs dataset.split_dir) or 'alphabets' (Koch et al. 2015)"
        )

    classes = load_omniglot_classes(root, download=download, image_size=image_size, cache_dir=cache_dir)

    if split == "alphabets":
        splits = _split_by_alphabets(classes, val_alphabets, split_seed, rotated_splits)
        description = f"alphabets split (seed {split_seed}{_rotation_note(rotated_splits)})"
    elif names is None:
        splits = split_by_seed(classes, sizes, split_seed, rotated_splits)
        description = f"maml split (seed {split_seed}{_rotation_note(rotated_splits)})"
    else:
        if rotated:
            classes = with_rotations(classes)
            # A split left out of dataset.rotations keeps the unrotated characters of its list.
            names = {part: listed if part in rotated_splits else [n for n in listed if n.endswith("/rot000")]
                     for part, listed in names.items()}
        elif rotated_splits:
            # The files list unrotated classes, and they decide: no rotated classes are added.
            logger.info("the vinyals split lists name no rotations, so no rotated classes are added")
        splits = split_by_names(classes, names)
        description = f"vinyals split from {Path(split_dir).expanduser().resolve()}"

    logger.info(
        "Omniglot %s: %d train / %d val / %d test classes",
        description,
        splits.train.num_classes,
        splits.val.num_classes,
        splits.test.num_classes,
    )
    return dataclasses.replace(splits, within_group=within_group)


def _rotation_note(rotated_splits: frozenset[str]) -> str:
    """How a split description mentions the rotations: ``", with rotations"``, ``", with rotations in train"``."""
    if not rotated_splits:
        return ""
    if rotated_splits == set(SPLIT_NAMES):
        return ", with rotations"
    return f", with rotations in {'/'.join(s for s in SPLIT_NAMES if s in rotated_splits)}"


def _split_by_alphabets(classes: ImageClasses, val_alphabets: int, seed: int, rotations: frozenset[str]
                        ) -> ClassSplits:
    """Koch et al.'s (2015) split: background alphabets -> train/val (seeded), evaluation alphabets -> test."""
    background = sorted(set(classes.groups) - set(EVALUATION_ALPHABETS))
    if not 1 <= val_alphabets < len(background):
        raise DatasetError(
            f"dataset.val_alphabets={val_alphabets} but there are {len(background)} background alphabets; "
            "choose a number between 1 and one less than that"
        )
    evaluation = [a for a in EVALUATION_ALPHABETS if a in set(classes.groups)]
    if not evaluation:
        raise DatasetError("none of the 20 evaluation alphabets is in the data; the alphabets split needs the "
                           "images_evaluation part of Omniglot")
    random.Random(seed).shuffle(background)
    groups = {"train": background[val_alphabets:], "val": background[:val_alphabets], "test": evaluation}
    splits = split_by_groups(classes, groups)
    return ClassSplits(*(with_rotations(part) if name in rotations else part for name, part in splits.items()))


def load_omniglot_classes(
    root: str, download: bool = False, image_size: int = 28, cache_dir: str | None = None
) -> ImageClasses:
    """All 1623 Omniglot characters (Lake et al. 2015), before any split or rotation.

    The first call decodes every PNG (a few seconds) and caches the result in ``cache_dir``;
    later calls load the cache. The cache is keyed by the source path, ``image_size`` and the
    names and sizes of the source files, so changed data is decoded again.

    Args:
        root: folder holding ``images_background`` and ``images_evaluation`` as folders or as the
            official zips, directly or in an ``omniglot-py/`` subfolder. ``~`` is expanded.
        download: fetch the missing official zips into ``root`` (checked against their MD5).
        image_size: side ``S`` of the square images after resizing.
        cache_dir: where the decoded images are cached; ``None`` means ``$METARUN_CACHE`` or
            ``~/.cache/metarun``.

    Returns:
        ``ImageClasses`` with uint8 images ``[N, 1, S, S]`` (ink 255 on a 0 background), int64
        labels ``[N]`` in ascending order, class names ``"Alphabet/characterNN"`` sorted by
        (alphabet, character) across both parts, and the alphabet of each class as its group.
        The full dataset has N = 32460 images of 1623 classes.

    Raises:
        DatasetError: the data is missing (and not downloaded), a zip has the wrong checksum, or
            a zip or PNG cannot be read.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"dataset.image_size must be a positive integer, got {image_size!r}")

    base, parts = _locate_parts(Path(root).expanduser().resolve(), download)

    cache_path = cache_dir_of(cache_dir) / f"omniglot_{image_size}px_{_cache_key(base, parts, image_size)}.pt"

    def decode() -> ImageClasses:
        start = time.perf_counter()
        classes = _decode_all(parts, image_size)
        logger.info(
            "decoded %d Omniglot images of %d characters from %s in %.1f s",
            classes.images.shape[0],
            classes.num_classes,
            base,
            time.perf_counter() - start,
        )
        return classes

    classes = cached_classes(cache_path, decode, "Omniglot")
    if tuple(classes.images.shape[1:]) != (1, image_size, image_size):
        raise DatasetError(f"the Omniglot cache {cache_path} holds images of another size; delete it")
    return classes


# ----------------------------------------------------------------------------------------------
# Finding and downloading the files
# ----------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """Where one half of the release (``images_background`` or ``images_evaluation``) lives."""

    name: str
    path: Path  # the folder, or the .zip file
    is_zip: bool


def _find_parts(base: Path) -> dict[str, _Part]:
    """The parts present in ``base``; a folder wins over a zip of the same name (already extracted)."""
    found = {}
    for name in PARTS:
        if (base / name).is_dir():
            found[name] = _Part(name, base / name, is_zip=False)
        elif (base / f"{name}.zip").is_file():
            found[name] = _Part(name, base / f"{name}.zip", is_zip=True)
    return found


def _locate_parts(root: Path, download: bool) -> tuple[Path, list[_Part]]:
    """The folder holding both parts (``root`` or ``root/omniglot-py``) and the parts themselves.

    With ``download``, the missing zips are fetched into the folder that already holds a part
    (``root`` if none does).
    """
    candidates = [root, root / TORCHVISION_SUBDIR]
    for base in candidates:
        parts = _find_parts(base)
        if len(parts) == len(PARTS):
            return base, [parts[name] for name in PARTS]

    # Incomplete: prefer the folder that already holds one part so that both end up together.
    base = next((b for b in candidates if _find_parts(b)), root)
    missing = [name for name in PARTS if name not in _find_parts(base)]
    if not download:
        raise DatasetError(
            f"Omniglot not found: {base} lacks {' and '.join(missing)} (looked in {root} and "
            f"{root / TORCHVISION_SUBDIR}, for folders or .zip files); set dataset.root=... to a folder "
            "holding images_background and images_evaluation (folders or the official zips), or set "
            "dataset.download=true"
        )
    for name in missing:
        # Verified against the published MD5 before it gets its final name (metarun.data.files).
        download_file(OMNIGLOT_FILES[name], base / f"{name}.zip")
    parts = _find_parts(base)
    return base, [parts[name] for name in PARTS]


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """One Omniglot-style image file (black ink on white paper) as the dataset holds its images:
    uint8 ``[1, S, S]``, bright ink on a dark background, through :func:`decode_png` like every
    drawing of the dataset. ``metarun-eval --episodes`` reads episode images with it.

    Raises:
        DatasetError: the file cannot be read or decoded; the message names it.
    """
    return decode_png(read_bytes(path), image_size, str(path))[None]


def decode_png(data: bytes, image_size: int, source: str) -> np.ndarray:
    """One Omniglot PNG as a uint8 ``[S, S]`` array with bright ink on a dark background.

    BOX resampling averages the source pixels under each target pixel: it is antialiased like
    LANCZOS but has no ringing (no faint halo around the strokes), and is about twice as fast.

    Raises:
        DatasetError: the bytes are not a readable image; the message names ``source``.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            small = image.convert("L").resize((image_size, image_size), Image.BOX)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL reports broken PNGs as OSError (incl. UnidentifiedImageError) or SyntaxError.
        raise DatasetError(
            f"cannot decode {source} ({one_line(err)}); the file is corrupt: replace it with the official "
            "file (or delete the data and re-download)"
        ) from err
    # The PNGs are black ink (0) on white (255); models expect the ink to be the signal.
    return 255 - np.asarray(small, dtype=np.uint8)


def _iter_pngs(part: _Part) -> Iterator[tuple[str, str, str, str, bytes]]:
    """Every drawing of one part as ``(alphabet, character, file name, source for messages, bytes)``.

    Only files at ``<Alphabet>/<character>/<file>.png`` count; hidden files (e.g. macOS ``._*``
    and ``__MACOSX/``) are skipped.
    """
    if not part.is_zip:
        for dirpath, dirnames, filenames in os.walk(part.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            relative = Path(dirpath).relative_to(part.path).parts
            if len(relative) != 2:
                continue
            for file_name in sorted(filenames):
                if file_name.endswith(".png") and not file_name.startswith("."):
                    path = Path(dirpath) / file_name
                    yield relative[0], relative[1], file_name, str(path), path.read_bytes()
        return

    verify(part.path, OMNIGLOT_FILES[part.name])  # the official file, not a truncated or other release
    try:
        with zipfile.ZipFile(part.path) as archive:
            for member in archive.infolist():
                pieces = member.filename.split("/")
                if (
                    member.is_dir()
                    or not member.filename.endswith(".png")
                    or len(pieces) < 3
                    or any(p.startswith((".", "__MACOSX")) for p in pieces)
                ):
                    continue
                source = f"{part.path}:{member.filename}"
                yield pieces[-3], pieces[-2], pieces[-1], source, archive.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DatasetError(
            f"cannot read {part.path} ({one_line(err)}); the zip is corrupt: delete it and re-download "
            "(dataset.download=true), or supply the official file"
        ) from err


def _decode_all(parts: Sequence[_Part], image_size: int) -> ImageClasses:
    """Decode every drawing of every part into one :class:`ImageClasses` (sorted classes and files).

    Single-process on purpose: the full dataset takes a few seconds, so a worker pool would add
    complexity for little gain.
    """
    drawings: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = defaultdict(list)
    part_of: dict[tuple[str, str], str] = {}
    for part in parts:
        for alphabet, character, file_name, source, data in _iter_pngs(part):
            key = (alphabet, character)
            # Class names leave out the part, so the same character in both parts would merge silently.
            if part_of.setdefault(key, part.name) != part.name:
                raise DatasetError(
                    f"{alphabet}/{character} appears in both {part_of[key]} and {part.name}; the two "
                    "parts of Omniglot must hold different alphabets"
                )
            drawings[key].append((file_name, decode_png(data, image_size, source)))

    if not drawings:
        raise DatasetError(
            f"no Omniglot PNGs found in {', '.join(str(p.path) for p in parts)} (expected "
            "<part>/<Alphabet>/characterNN/*.png); set dataset.root=... to the official data"
        )

    class_keys = sorted(drawings)
    images, labels = [], []
    for label, key in enumerate(class_keys):
        for _, array in sorted(drawings[key], key=lambda item: item[0]):
            images.append(array)
            labels.append(label)
    return ImageClasses(
        images=torch.from_numpy(np.stack(images)).unsqueeze(1),  # [N, 1, S, S]
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=[f"{alphabet}/{character}" for alphabet, character in class_keys],
        groups=[alphabet for alphabet, _ in class_keys],
    )


# ----------------------------------------------------------------------------------------------
# Cache of decoded images
# ----------------------------------------------------------------------------------------------


def _cache_key(base: Path, parts: Sequence[_Part], image_size: int) -> str:
    """Hash of everything the decoded images depend on.

    The source files are described by (relative name, size): cheap to list (no reading), and any
    re-extraction, added or removed drawing or different zip changes it.
    """
    files = []
    for part in parts:
        if part.is_zip:
            files.append((part.path.name, part.path.stat().st_size))
            continue
        # os.scandir hands out the sizes with the listing: much faster than stat() per Path.
        for dirpath, _, _ in os.walk(part.path):
            relative_dir = Path(dirpath).relative_to(base).as_posix()
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    if entry.name.endswith(".png") and entry.is_file():
                        files.append((f"{relative_dir}/{entry.name}", entry.stat().st_size))
    description = {
        "format": CACHE_FORMAT_VERSION,
        "source": str(base),
        "image_size": image_size,
        "files": sorted(files),
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _read_split_lists(split_dir: str | None) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from ``split_dir``'s ``<split>.txt`` files."""
    if split_dir is None:
        raise DatasetError(
            "the vinyals split needs dataset.split_dir=... (a folder with train.txt, val.txt and test.txt)"
        )
    folder = Path(split_dir).expanduser().resolve()
    names = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.txt"
        if not path.is_file():
            raise DatasetError(
                f"split list {path} not found; dataset.split_dir must hold train.txt, val.txt and test.txt "
                "(one class name per line, e.g. Angelic/character01/rot090)"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        names[split] = [line.strip() for line in lines if line.strip()]
    return names


def _names_are_rotated(names: dict[str, list[str]]) -> bool:
    """Whether the split lists name rotated classes (``.../rotNNN``); a mix of both is an error."""
    flags = {bool(_ROTATION_SUFFIX.search(name)) for split_names in names.values() for name in split_names}
    if len(flags) > 1:
        raise DatasetError(
            "the split lists mix rotated (.../rotNNN) and unrotated class names; use one kind throughout"
        )
    return flags == {True}


