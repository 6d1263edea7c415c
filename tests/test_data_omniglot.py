"""Tests of metarun.data.omniglot.

Most tests build a tiny fake Omniglot in ``tmp_path`` (PNGs drawn with PIL, as folders and as zips),
so they are fast and need no data. The tests marked ``data`` use the real dataset from
``../shared/data`` beside the repository and skip when it is absent.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import dataset_options
from metarun.data import omniglot
from metarun.data.base import ClassSplits, DatasetError
from metarun.data.files import KnownFile
from metarun.data.omniglot import EVALUATION_ALPHABETS, load_omniglot, load_omniglot_classes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VINYALS_SPLIT_DIR = SHARED_DATA / "splits" / "omniglot_vinyals"


def load(root: str, **options) -> ClassSplits:
    """load_omniglot with conf/dataset/omniglot.yaml's values but ``root`` and ``options`` (the loader has no
    defaults: its values live in the config)."""
    return load_omniglot(**dataset_options("omniglot", root=root, **options))


# The fake dataset: part -> {alphabet: number of characters}; every character has DRAWINGS PNGs.
FAKE_ALPHABETS = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 3},
}
DRAWINGS = 4
FAKE_CLASS_NAMES = [
    "Alpha/character01",
    "Alpha/character02",
    "Alpha/character03",
    "Beta/character01",
    "Beta/character02",
    "Gamma/character01",
    "Gamma/character02",
    "Gamma/character03",
]
FAKE_CLASSES = len(FAKE_CLASS_NAMES)


# ----------------------------------------------------------------------------------------------
# Building a fake Omniglot
# ----------------------------------------------------------------------------------------------


def _fake_png(class_index: int, drawing: int) -> Image.Image:
    """A 105x105 1-bit image like Omniglot's: white paper, a black stroke in the top-left corner.

    The stroke is asymmetric (a thick L-shape), so rotations are distinguishable, and its length
    depends on class and drawing, so images differ.
    """
    image = Image.new("1", (105, 105), color=1)
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 40, 20), fill=0)  # horizontal bar, top-left
    draw.rectangle((8, 8, 20, 45 + 3 * class_index + drawing), fill=0)  # vertical bar, length varies
    return image


def _write_fake_folders(base: Path, parts: dict[str, dict[str, int]] = FAKE_ALPHABETS,
                        drawings: int = DRAWINGS) -> None:
    """``base/images_background/<Alphabet>/characterNN/*.png`` and the same for images_evaluation: for
    each part, ``{alphabet: characters}``, each character drawn ``drawings`` times."""
    class_index = 0
    for part, alphabets in parts.items():
        for alphabet, characters in alphabets.items():
            for character in range(1, characters + 1):
                folder = base / part / alphabet / f"character{character:02d}"
                folder.mkdir(parents=True)
                for drawing in range(drawings):
                    _fake_png(class_index, drawing).save(folder / f"{class_index:04d}_{drawing + 1:02d}.png")
                class_index += 1


def _write_fake_zips(base: Path) -> dict[str, str]:
    """``base/images_background.zip`` and ``base/images_evaluation.zip``, laid out like the official
    zips; returns their MD5s."""
    staging = base / "staging"
    _write_fake_folders(staging)
    md5s = {}
    for part in FAKE_ALPHABETS:
        zip_path = base / f"{part}.zip"
        with zipfile.ZipFile(zip_path, "w") as archive:
            for png in sorted((staging / part).rglob("*.png")):
                archive.write(png, png.relative_to(staging).as_posix())
        md5s[part] = hashlib.md5(zip_path.read_bytes()).hexdigest()
    for png in sorted(staging.rglob("*"), reverse=True):  # leave only the zips
        png.unlink() if png.is_file() else png.rmdir()
    staging.rmdir()
    return md5s


def _accept_zips(
    monkeypatch: pytest.MonkeyPatch, md5s: dict[str, str], urls: dict[str, str] | None = None
) -> None:
    """Make the fake zips the 'official' files: their MD5s (and optionally download URLs)."""
    for part, md5 in md5s.items():
        official = omniglot.OMNIGLOT_FILES[part]
        url = urls[part] if urls else official.urls[0]
        monkeypatch.setitem(omniglot.OMNIGLOT_FILES, part, KnownFile(official.name, md5=md5, urls=(url,)))


@pytest.fixture
def fake_folders(tmp_path: Path) -> Path:
    root = tmp_path / "omniglot"
    _write_fake_folders(root)
    return root


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def test_folders_give_sorted_classes_with_shapes_and_groups(fake_folders: Path, cache: str) -> None:
    classes = load_omniglot_classes(str(fake_folders), image_size=28, cache_dir=cache)

    assert classes.images.shape == (FAKE_CLASSES * DRAWINGS, 1, 28, 28)
    assert classes.images.dtype == torch.uint8
    assert classes.labels.dtype == torch.int64
    assert torch.equal(classes.labels, torch.arange(FAKE_CLASSES).repeat_interleave(DRAWINGS))
    assert classes.class_names == FAKE_CLASS_NAMES
    assert classes.groups == [name.split("/")[0] for name in FAKE_CLASS_NAMES]
    assert classes.samples_per_class().tolist() == [DRAWINGS] * FAKE_CLASSES


def test_ink_is_bright_on_a_dark_background(fake_folders: Path, cache: str) -> None:
    images = load_omniglot_classes(str(fake_folders), cache_dir=cache).images
    # The black horizontal bar covers source pixels 8..40 x 8..20, i.e. about 2..10 x 2..5 at 28 px.
    assert images[:, 0, 3:5, 3:10].float().mean() > 240
    # The bottom-right corner of the paper was white and is now dark.
    assert images[:, 0, 20:, 20:].max() == 0


def test_load_image_decodes_a_file_as_the_loader_decodes_the_dataset(fake_folders: Path, cache: str) -> None:
    """``load_image`` (what metarun-eval reads episode images with) goes through the loader's own
    ``decode_png``: a drawing's file gives exactly the image the dataset holds for it."""
    classes = load_omniglot_classes(str(fake_folders), image_size=20, cache_dir=cache)
    first = sorted((fake_folders / "images_background" / "Beta" / "character02").glob("*.png"))[0]
    label = classes.class_names.index("Beta/character02")
    expected = classes.images[classes.labels == label][0]  # the class's first drawing, files sorted
    image = omniglot.load_image(first, 20)
    assert image.shape == (1, 20, 20) and image.dtype == np.uint8
    assert torch.equal(torch.from_numpy(image), expected)
    with pytest.raises(DatasetError, match="cannot read .*missing.png"):
        omniglot.load_image(fake_folders / "missing.png", 20)


def test_image_size(fake_folders: Path, cache: str) -> None:
    classes = load_omniglot_classes(str(fake_folders), image_size=20, cache_dir=cache)
    assert classes.images.shape == (FAKE_CLASSES * DRAWINGS, 1, 20, 20)
    with pytest.raises(DatasetError, match="image_size"):
        load_omniglot_classes(str(fake_folders), image_size=0, cache_dir=cache)


@pytest.mark.parametrize("layout", ["zips", "torchvision_folders", "torchvision_zips"])
def test_other_layouts_give_the_same_classes(
    layout: str, fake_folders: Path, tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = load_omniglot_classes(str(fake_folders), cache_dir=cache)

    root = tmp_path / "other"
    base = root / "omniglot-py" if layout.startswith("torchvision") else root
    if layout.endswith("zips"):
        base.mkdir(parents=True)
        _accept_zips(monkeypatch, _write_fake_zips(base))
    else:
        _write_fake_folders(base)
    before = _listing(root)

    classes = load_omniglot_classes(str(root), cache_dir=cache)

    assert classes.class_names == expected.class_names
    assert classes.groups == expected.groups
    assert torch.equal(classes.labels, expected.labels)
    assert torch.equal(classes.images, expected.images)
    assert _listing(root) == before  # nothing extracted or written next to the user's data


def test_root_with_tilde_is_expanded(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_fake_folders(tmp_path / "data" / "omniglot")
    assert load_omniglot_classes("~/data/omniglot", cache_dir=cache).num_classes == FAKE_CLASSES


def test_missing_root_names_the_path_and_the_fix(tmp_path: Path, cache: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load_omniglot_classes(str(missing), cache_dir=cache)
    message = str(info.value)
    assert str(missing) in message
    assert "dataset.root=" in message and "dataset.download=true" in message
    assert "\n" not in message
    assert not missing.exists()  # download=False never creates anything


def test_missing_part_is_named(fake_folders: Path, cache: str) -> None:
    for png in sorted((fake_folders / "images_evaluation").rglob("*"), reverse=True):
        png.unlink() if png.is_file() else png.rmdir()
    (fake_folders / "images_evaluation").rmdir()
    with pytest.raises(DatasetError, match="lacks images_evaluation"):
        load_omniglot_classes(str(fake_folders), cache_dir=cache)


def test_corrupt_png_names_the_file(fake_folders: Path, cache: str) -> None:
    broken = fake_folders / "images_background" / "Beta" / "character02" / "0004_02.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match="0004_02.png") as info:
        load_omniglot_classes(str(fake_folders), cache_dir=cache)
    assert "\n" not in str(info.value)

    broken.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="0004_02.png"):
        load_omniglot_classes(str(fake_folders), cache_dir=cache)


def test_corrupt_zip_names_the_file(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "zips"
    root.mkdir()
    md5s = _write_fake_zips(root)
    broken = root / "images_evaluation.zip"
    broken.write_bytes(b"PK\x03\x04 this is no zip")
    md5s["images_evaluation"] = hashlib.md5(broken.read_bytes()).hexdigest()  # passes the MD5 check
    _accept_zips(monkeypatch, md5s)
    with pytest.raises(DatasetError, match="images_evaluation.zip"):
        load_omniglot_classes(str(root), cache_dir=cache)


def test_user_zip_with_wrong_md5_is_refused(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "zips"
    root.mkdir()
    md5s = _write_fake_zips(root)
    _accept_zips(monkeypatch, {**md5s, "images_background": "0" * 32})
    with pytest.raises(DatasetError) as info:
        load_omniglot_classes(str(root), cache_dir=cache)
    message = str(info.value)
    assert str(root / "images_background.zip") in message
    assert "0" * 32 in message and md5s["images_background"] in message
    assert "re-download" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _refuse_to_decode(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded a PNG although the cache should have been used")


def test_second_call_loads_the_cache(fake_folders: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_omniglot_classes(str(fake_folders), cache_dir=cache)
    files = list(Path(cache).iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind

    monkeypatch.setattr(omniglot, "decode_png", _refuse_to_decode)
    second = load_omniglot_classes(str(fake_folders), cache_dir=cache)

    assert second.class_names == first.class_names
    assert second.groups == first.groups
    assert torch.equal(second.images, first.images)
    assert torch.equal(second.labels, first.labels)


def test_cache_dir_defaults_to_metarun_cache(
    fake_folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "env-cache"))
    load_omniglot_classes(str(fake_folders))
    assert len(list((tmp_path / "env-cache").glob("omniglot_*.pt"))) == 1


def test_changed_files_are_decoded_again(fake_folders: Path, cache: str) -> None:
    load_omniglot_classes(str(fake_folders), cache_dir=cache)
    extra = fake_folders / "images_evaluation" / "Gamma" / "character03" / "9999_99.png"
    _fake_png(0, 0).save(extra)
    classes = load_omniglot_classes(str(fake_folders), cache_dir=cache)
    assert classes.images.shape[0] == FAKE_CLASSES * DRAWINGS + 1
    assert len(list(Path(cache).glob("omniglot_*.pt"))) == 2  # one cache per source state


def test_corrupt_cache_is_rebuilt_with_a_warning(
    fake_folders: Path, cache: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_omniglot_classes(str(fake_folders), cache_dir=cache)
    (cache_file,) = Path(cache).glob("omniglot_*.pt")
    cache_file.write_bytes(b"garbage, not a torch file")

    with caplog.at_level(logging.WARNING, logger="metarun.data.omniglot"):
        rebuilt = load_omniglot_classes(str(fake_folders), cache_dir=cache)

    assert any("unreadable Omniglot cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(rebuilt.images, first.images)
    assert torch.load(cache_file, weights_only=True)["images"].shape == first.images.shape  # rewritten


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Fake official zips in a folder served through file:// URLs: ``(urls, md5s)``."""
    folder = tmp_path / "server"
    folder.mkdir()
    md5s = _write_fake_zips(folder)
    urls = {part: (folder / f"{part}.zip").as_uri() for part in md5s}
    return urls, md5s


def test_download_fetches_checks_and_loads(
    server: tuple[dict[str, str], dict[str, str]], tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, md5s = server
    _accept_zips(monkeypatch, md5s, urls)
    root = tmp_path / "new" / "omniglot"

    classes = load_omniglot_classes(str(root), download=True, cache_dir=cache)

    assert classes.class_names == FAKE_CLASS_NAMES
    assert _listing(root) == ["images_background.zip", "images_evaluation.zip"]  # no .part, nothing extracted


def test_download_fetches_only_missing_parts(
    server: tuple[dict[str, str], dict[str, str]], tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, md5s = server
    # A request for the background part would fail: it is already there as a folder.
    _accept_zips(monkeypatch, md5s, {**urls, "images_background": (tmp_path / "absent.zip").as_uri()})
    root = tmp_path / "partial"
    _write_fake_folders(root)
    for path in sorted((root / "images_evaluation").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "images_evaluation").rmdir()

    classes = load_omniglot_classes(str(root), download=True, cache_dir=cache)

    assert classes.num_classes == FAKE_CLASSES
    assert (root / "images_evaluation.zip").is_file()
    assert not (root / "images_background.zip").exists()


def test_tampered_download_is_rejected_and_nothing_kept(
    server: tuple[dict[str, str], dict[str, str]], tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, md5s = server
    served = tmp_path / "server" / "images_evaluation.zip"
    with zipfile.ZipFile(served, "a") as archive:  # tamper: an extra member changes the checksum
        archive.writestr("images_evaluation/Gamma/character01/evil.png", b"x")
    actual = hashlib.md5(served.read_bytes()).hexdigest()
    _accept_zips(monkeypatch, md5s, urls)
    root = tmp_path / "target"

    with pytest.raises(DatasetError) as info:
        load_omniglot_classes(str(root), download=True, cache_dir=cache)

    message = str(info.value)
    assert "images_evaluation.zip" in message and md5s["images_evaluation"] in message and actual in message
    assert "\n" not in message
    # The good part may have been downloaded first; the bad one left nothing, and nothing was extracted.
    assert _listing(root) in ([], ["images_background.zip"])
    assert not Path(cache).exists() or not any(Path(cache).iterdir())


def test_network_failure_says_where_and_how_to_supply(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = (tmp_path / "no-server" / "images_background.zip").as_uri()
    monkeypatch.setitem(omniglot.OMNIGLOT_FILES, "images_background",
                        KnownFile("images_background.zip", md5="0" * 32, urls=(absent,)))
    root = tmp_path / "target"

    with pytest.raises(DatasetError) as info:
        load_omniglot_classes(str(root), download=True, cache_dir=cache)

    message = str(info.value)
    assert absent in message and str(root) in message and "by hand" in message
    assert "\n" not in message
    assert _listing(root) == []  # the .part file is removed


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _names(split) -> set[str]:
    return set(split.class_names)


def test_maml_split_sizes_disjoint_and_seeded(fake_folders: Path, cache: str) -> None:
    def split(seed: int):
        return load(
            str(fake_folders), rotations=False, split_seed=seed, split_sizes=[4, 2, 2], cache_dir=cache
        )

    splits = split(1)
    assert [s.num_classes for _, s in splits.items()] == [4, 2, 2]
    assert [s.images.shape[0] for _, s in splits.items()] == [4 * DRAWINGS, 2 * DRAWINGS, 2 * DRAWINGS]
    train, val, test = _names(splits.train), _names(splits.val), _names(splits.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(FAKE_CLASS_NAMES)

    assert [s.class_names for _, s in split(1).items()] == [s.class_names for _, s in splits.items()]
    others = [[s.class_names for _, s in split(seed).items()] for seed in range(2, 7)]
    assert any(other != [s.class_names for _, s in splits.items()] for other in others)


def test_maml_rotations_stay_in_the_split_of_their_character(fake_folders: Path, cache: str) -> None:
    plain = load(str(fake_folders), rotations=False, split_sizes=(4, 2, 2), cache_dir=cache)
    rotated = load(str(fake_folders), rotations=True, split_sizes=(4, 2, 2), cache_dir=cache)

    for (_, before), (_, after) in zip(plain.items(), rotated.items(), strict=True):
        assert after.num_classes == 4 * before.num_classes
        assert after.images.shape[0] == 4 * before.images.shape[0]
        assert {name.rsplit("/", 1)[0] for name in after.class_names} == set(before.class_names)

    train = rotated.train
    name = train.class_names[0].rsplit("/", 1)[0]
    upright = train.images[train.labels == train.class_names.index(f"{name}/rot000")]
    turned = train.images[train.labels == train.class_names.index(f"{name}/rot090")]
    assert torch.equal(turned, torch.rot90(upright, k=1, dims=(2, 3)))
    assert not torch.equal(turned, upright)


def test_rotations_for_training_only_leave_val_and_test_unrotated(fake_folders: Path, cache: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load(str(fake_folders), rotations=False, split_sizes=(4, 2, 2), cache_dir=cache)
    rotated = load(str(fake_folders), rotations="train", split_sizes=(4, 2, 2), cache_dir=cache)
    assert rotated.train.num_classes == 4 * plain.train.num_classes == 16
    assert {name.rsplit("/", 1)[0] for name in rotated.train.class_names} == set(plain.train.class_names)
    for part in ("val", "test"):
        assert getattr(rotated, part).class_names == getattr(plain, part).class_names
        assert torch.equal(getattr(rotated, part).images, getattr(plain, part).images)
    # Koch's alphabets split takes the same option.
    monkeypatch.setattr("metarun.data.omniglot.EVALUATION_ALPHABETS", ("Gamma",))
    alphabets = load(str(fake_folders), split="alphabets", val_alphabets=1, rotations=["train"],
                     cache_dir=cache)
    unrotated = load(str(fake_folders), split="alphabets", val_alphabets=1, rotations="none", cache_dir=cache)
    assert alphabets.train.num_classes == 4 * unrotated.train.num_classes
    assert alphabets.test.class_names == unrotated.test.class_names == ["Gamma/character01", "Gamma/character02",
                                                                         "Gamma/character03"]


def _write_split_files(folder: Path, splits: dict[str, list[str]]) -> Path:
    folder.mkdir()
    for split, names in splits.items():
        (folder / f"{split}.txt").write_text("\n".join(names) + "\n\n")  # a trailing blank line is ignored
    return folder


ROTATED_LISTS = {
    "train": [f"{c}/rot{a:03d}" for c in FAKE_CLASS_NAMES[:5] for a in (0, 90, 180, 270)],
    "val": [f"{FAKE_CLASS_NAMES[5]}/rot{a:03d}" for a in (0, 90, 180, 270)],
    "test": [f"{c}/rot{a:03d}" for c in FAKE_CLASS_NAMES[6:] for a in (0, 90, 180, 270)],
}


def test_vinyals_split_with_rotated_names(fake_folders: Path, tmp_path: Path, cache: str) -> None:
    split_dir = _write_split_files(tmp_path / "lists", ROTATED_LISTS)
    splits = load(str(fake_folders), split="vinyals", split_dir=str(split_dir), cache_dir=cache)
    for split, part in splits.items():
        assert part.class_names == ROTATED_LISTS[split]
        assert part.images.shape[0] == DRAWINGS * len(ROTATED_LISTS[split])


def test_vinyals_rotated_lists_with_rotations_for_training_only(fake_folders: Path, tmp_path: Path, cache: str) -> None:
    """The lists name every rotation; a split left out of dataset.rotations keeps its rot000 classes."""
    split_dir = _write_split_files(tmp_path / "lists", ROTATED_LISTS)
    splits = load(str(fake_folders), split="vinyals", rotations="train", split_dir=str(split_dir),
                  cache_dir=cache)
    assert splits.train.class_names == ROTATED_LISTS["train"]
    for part in ("val", "test"):
        assert getattr(splits, part).class_names == [n for n in ROTATED_LISTS[part] if n.endswith("/rot000")]


def test_vinyals_split_without_rotations(fake_folders: Path, tmp_path: Path, cache: str) -> None:
    lists = {"train": FAKE_CLASS_NAMES[:4], "val": FAKE_CLASS_NAMES[4:6], "test": FAKE_CLASS_NAMES[6:]}
    split_dir = _write_split_files(tmp_path / "lists", lists)
    for rotations in (True, False):  # the files decide: unrotated names give unrotated classes
        splits = load(
            str(fake_folders), split="vinyals", rotations=rotations, split_dir=str(split_dir), cache_dir=cache
        )
        assert {split: part.class_names for split, part in splits.items()} == lists


def test_vinyals_rotated_names_conflict_with_rotations_false(
    fake_folders: Path, tmp_path: Path, cache: str
) -> None:
    split_dir = _write_split_files(tmp_path / "lists", ROTATED_LISTS)
    with pytest.raises(DatasetError, match="rotations=false"):
        load(
            str(fake_folders), split="vinyals", rotations=False, split_dir=str(split_dir), cache_dir=cache
        )


def test_vinyals_split_errors(fake_folders: Path, tmp_path: Path, cache: str) -> None:
    with pytest.raises(DatasetError, match="split_dir"):
        load(str(fake_folders), split="vinyals", cache_dir=cache)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.txt").write_text(FAKE_CLASS_NAMES[0])
    with pytest.raises(DatasetError, match="val.txt") as info:
        load(str(fake_folders), split="vinyals", split_dir=str(partial), cache_dir=cache)
    assert "\n" not in str(info.value)

    mixed = _write_split_files(tmp_path / "mixed", {**ROTATED_LISTS, "val": [FAKE_CLASS_NAMES[5]]})
    with pytest.raises(DatasetError, match="mix"):
        load(str(fake_folders), split="vinyals", split_dir=str(mixed), cache_dir=cache)

    unknown = _write_split_files(tmp_path / "unknown", {**ROTATED_LISTS, "val": ["Delta/character01/rot000"]})
    with pytest.raises(DatasetError, match="Delta/character01/rot000"):
        load(str(fake_folders), split="vinyals", split_dir=str(unknown), cache_dir=cache)


@pytest.mark.parametrize("sizes", [(4, 2), 5, ("four", 2, 2)])
def test_maml_split_sizes_must_be_three_numbers(sizes: object, fake_folders: Path, cache: str) -> None:
    with pytest.raises(DatasetError, match="three ints"):
        load(str(fake_folders), split_sizes=sizes, cache_dir=cache)


def test_unknown_split_lists_the_valid_ones(fake_folders: Path, cache: str) -> None:
    with pytest.raises(DatasetError) as info:
        load(str(fake_folders), split="random", cache_dir=cache)
    assert "'maml'" in str(info.value) and "'vinyals'" in str(info.value)


def test_split_logs_the_class_counts(
    fake_folders: Path, cache: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="metarun.data.omniglot"):
        load(str(fake_folders), split_sizes=(4, 2, 2), cache_dir=cache)
    assert any("16 train / 8 val / 8 test classes" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# The real dataset (../shared/data beside the repository)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_omniglot(omniglot_root: Path, data_cache: Path) -> tuple[Path, str]:
    """The real Omniglot (extracted once per session by conftest) and the session cache: ``(root, cache_dir)``."""
    return omniglot_root, str(data_cache)


@pytest.mark.data
def test_real_omniglot_classes(real_omniglot: tuple[Path, str]) -> None:
    root, cache_dir = real_omniglot
    classes = load_omniglot_classes(str(root), cache_dir=cache_dir)

    assert classes.num_classes == 1623
    assert classes.images.shape == (32460, 1, 28, 28)
    assert classes.images.dtype == torch.uint8
    assert classes.samples_per_class().tolist() == [20] * 1623
    assert classes.class_names == sorted(classes.class_names)
    assert len(set(classes.class_names)) == 1623
    # Ink is bright: mostly dark background, full-intensity strokes.
    assert classes.images.float().mean() < 64 and classes.images.max() == 255

    for part, characters, alphabets in (("images_background", 964, 30), ("images_evaluation", 659, 20)):
        part_alphabets = {p.name for p in (root / part).iterdir() if p.is_dir()}
        assert len(part_alphabets) == alphabets
        assert sum(group in part_alphabets for group in classes.groups) == characters


@pytest.mark.data
def test_real_omniglot_maml_split(real_omniglot: tuple[Path, str]) -> None:
    root, cache_dir = real_omniglot
    plain = load(str(root), rotations=False, cache_dir=cache_dir)
    assert [s.num_classes for _, s in plain.items()] == [1100, 100, 423]
    assert [s.images.shape[0] for _, s in plain.items()] == [22000, 2000, 8460]

    rotated = load(str(root), cache_dir=cache_dir)
    assert [s.num_classes for _, s in rotated.items()] == [4400, 400, 1692]
    assert all(s.samples_per_class().eq(20).all() for _, s in rotated.items())


@pytest.mark.data
def test_real_omniglot_vinyals_split(real_omniglot: tuple[Path, str]) -> None:
    if not VINYALS_SPLIT_DIR.is_dir():
        pytest.skip(f"Vinyals et al.'s split lists not available: {VINYALS_SPLIT_DIR} is absent")
    root, cache_dir = real_omniglot
    splits = load(str(root), split="vinyals", split_dir=str(VINYALS_SPLIT_DIR), cache_dir=cache_dir)

    for split, part in splits.items():
        lines = [
            line for line in (VINYALS_SPLIT_DIR / f"{split}.txt").read_text().splitlines() if line.strip()
        ]
        assert part.num_classes == len(lines)
        assert part.samples_per_class().eq(20).all()
    assert [s.num_classes for _, s in splits.items()] == [4112, 688, 1692]


def test_alphabets_split_is_by_alphabet_and_seeded(
    fake_folders: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Koch et al.'s split: evaluation alphabets are the test split; background alphabets are cut into train/val."""
    monkeypatch.setattr("metarun.data.omniglot.EVALUATION_ALPHABETS", ("Gamma",))
    splits = load(str(fake_folders), split="alphabets", val_alphabets=1, rotations=False, within_group=True,
                  cache_dir=cache)
    assert set(splits.test.groups) == {"Gamma"} and splits.test.num_classes == 3
    assert {*splits.train.groups, *splits.val.groups} == {"Alpha", "Beta"}
    assert len(set(splits.train.groups)) == 1 and len(set(splits.val.groups)) == 1
    assert splits.within_group
    seeds = {tuple(load(str(fake_folders), split="alphabets", val_alphabets=1, rotations=False,
                        split_seed=seed, cache_dir=cache).val.groups[:1]) for seed in range(8)}
    assert seeds == {("Alpha",), ("Beta",)}, "the seed decides which background alphabets validate"
    rotated = load(str(fake_folders), split="alphabets", val_alphabets=1, cache_dir=cache)
    assert rotated.test.num_classes == 12 and set(rotated.test.groups) == {"Gamma"}


def test_alphabets_split_errors(fake_folders: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="evaluation alphabets"):  # the fake has none of the real names
        load(str(fake_folders), split="alphabets", val_alphabets=1, cache_dir=cache)
    monkeypatch.setattr("metarun.data.omniglot.EVALUATION_ALPHABETS", ("Gamma",))
    with pytest.raises(DatasetError, match=r"val_alphabets=2 but there are 2 background alphabets"):
        load(str(fake_folders), split="alphabets", val_alphabets=2, cache_dir=cache)


@pytest.mark.data
def test_real_omniglot_alphabets_split_and_within_alphabet_tasks(real_omniglot: tuple[Path, str]) -> None:
    from metarun.tasks.sampling import TaskSampler

    root, cache_dir = real_omniglot
    splits = load(str(root), split="alphabets", rotations=False, within_group=True, cache_dir=cache_dir)
    assert len(set(splits.train.groups)) == 30 - 10 and len(set(splits.val.groups)) == 10
    assert splits.train.num_classes + splits.val.num_classes == 964 and splits.test.num_classes == 659
    assert set(splits.test.groups) == set(EVALUATION_ALPHABETS)
    sampler = TaskSampler(splits.test, ways=20, shots=1, query_shots=1, within_group="test" in splits.within_group)
    for index, label in (sampler.sample_indices() for _ in range(20)):
        alphabets = {splits.test.groups[int(splits.test.labels[i])] for i in index}
        assert len(alphabets) == 1 and len(set(label.tolist())) == 20
