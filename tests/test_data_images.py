"""Tests of the colour-image loaders (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB) and of
metarun.data.files.

Every test writes its own tiny files in ``tmp_path`` (a few classes, a few images) in each format a
loader reads, and passes their SHA-256 through the ``checksums`` option or replaces the registry
entry (monkeypatch), since the published checksums belong to the real files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import dataset_options
from metarun.data import cifar, cub, decode, files, miniimagenet, tieredimagenet
from metarun.data.base import DatasetError
from metarun.data.files import KnownFile

RAVI_SPLIT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splits" / "miniimagenet_ravi"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _dump(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _check_splits(splits, sizes: tuple[int, int, int], channels: int = 3, size: int | None = None) -> None:
    assert tuple(part.num_classes for _, part in splits.items()) == sizes
    names = [set(part.class_names) for _, part in splits.items()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for _, part in splits.items():
        assert part.images.dtype == torch.uint8 and part.images.shape[1] == channels
        if size is not None:
            assert part.images.shape[2:] == (size, size)
        assert (part.samples_per_class() > 0).all()


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def no_unpack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything is unpickled or a tarball is opened."""

    def refuse(*args, **kwargs):
        raise AssertionError("a file was unpickled or unpacked before it was verified")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(tarfile, "open", refuse)


# ----------------------------------------------------------------------------------------------
# metarun.data.files
# ----------------------------------------------------------------------------------------------


def test_verify_accepts_a_matching_file_and_rejects_others_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"hello world")
    known = KnownFile("data.bin", size=11, sha256=_sha256(path), md5=_md5(path))
    files.verify(path, known)

    path.write_bytes(b"hello world!")  # wrong size
    with pytest.raises(DatasetError) as error:
        files.verify(path, known)
    assert "data.bin" in _one_line(error) and known.sha256 in str(error.value) and "dataset.download" in str(error.value)

    path.write_bytes(b"hello worle")  # right size, wrong content
    with pytest.raises(DatasetError, match=known.sha256):
        files.verify(path, known)

    with pytest.raises(DatasetError, match="not found") as error:
        files.verify(tmp_path / "missing.bin", known)
    _one_line(error)

    with pytest.raises(DatasetError, match="no checksum is known.*dataset.checksums") as error:
        files.verify(path, KnownFile("data.bin"))
    _one_line(error)


def test_md5_only_entries_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    path.write_bytes(b"abc")
    files.verify(path, KnownFile("meta", md5=_md5(path)))
    with pytest.raises(DatasetError, match="0" * 32):
        files.verify(path, KnownFile("meta", md5="0" * 32))


def test_read_checksums_from_a_mapping_or_a_sha256sum_file(tmp_path: Path) -> None:
    digest = "ab" * 32
    assert files.read_checksums({"x.pkl": digest.upper()}) == {"x.pkl": digest}
    listing = tmp_path / "SHA256SUMS"
    listing.write_text(f"{digest}  some/dir/x.pkl\n{digest} *y.pkl\n")
    assert files.read_checksums(str(listing)) == {"x.pkl": digest, "y.pkl": digest}
    with pytest.raises(DatasetError, match="not a 64-digit"):
        files.read_checksums({"x.pkl": "1234"})
    known = files.with_checksums(KnownFile("x.pkl", size=3, md5="0" * 32), {"x.pkl": digest})
    assert (known.size, known.sha256, known.md5) == (None, digest, None)


def test_download_from_a_file_url_verifies_and_renames(tmp_path: Path) -> None:
    source = tmp_path / "server" / "good.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload " * 1000)
    known = KnownFile("good.bin", size=source.stat().st_size, sha256=_sha256(source), urls=(source.as_uri(),))
    dest = tmp_path / "data" / "good.bin"
    files.download(known, dest)
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["good.bin"]  # no temporary file left


def test_download_rejects_an_html_page_and_leaves_nothing(tmp_path: Path, no_unpack: None) -> None:
    page = tmp_path / "server" / "uc"
    page.parent.mkdir()
    page.write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>")
    known = KnownFile("mini-imagenet-cache-train.pkl", size=123456, sha256="cd" * 32, urls=(page.as_uri(),))
    dest = tmp_path / "data" / known.name
    with pytest.raises(DatasetError, match="could not download mini-imagenet-cache-train.pkl") as error:
        files.download(known, dest)
    assert "cd" * 32 in _one_line(error)
    assert list(dest.parent.iterdir()) == []


def test_download_without_a_checksum_refuses(tmp_path: Path) -> None:
    source = tmp_path / "x.pkl"
    source.write_bytes(b"x")
    with pytest.raises(DatasetError, match="no checksum is known for x.pkl.*dataset.checksums") as error:
        files.download(KnownFile("x.pkl", urls=(source.as_uri(),)), tmp_path / "out" / "x.pkl")
    _one_line(error)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# mini-ImageNet
# ----------------------------------------------------------------------------------------------

MINI_CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
PER_CLASS = 3


def _write_mini_pickles(root: Path) -> dict[str, str]:
    """learn2learn's three caches with 84x84 images; returns {file name: sha256}."""
    checksums = {}
    for split, wnids in MINI_CLASSES.items():
        n = len(wnids) * PER_CLASS
        data = {
            "image_data": _pixels(len(checksums), (n, 84, 84, 3)),
            "class_dict": {w: list(range(i * PER_CLASS, (i + 1) * PER_CLASS)) for i, w in enumerate(wnids)},
        }
        path = _dump(data, root / miniimagenet.PICKLES[split].name)
        checksums[path.name] = _sha256(path)
    return checksums


def test_miniimagenet_pickles(tmp_path: Path, cache: str) -> None:
    checksums = _write_mini_pickles(tmp_path)
    splits = miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path),
                                                              checksums=checksums, cache_dir=cache))
    _check_splits(splits, (3, 2, 2), size=84)
    assert splits.train.class_names == MINI_CLASSES["train"] and splits.train.groups == MINI_CLASSES["train"]
    raw = pickle.loads((tmp_path / "mini-imagenet-cache-train.pkl").read_bytes())["image_data"]
    assert torch.equal(splits.train.images, torch.from_numpy(raw).permute(0, 3, 1, 2))

    small = miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path),
                                                             checksums=checksums, image_size=21, cache_dir=cache))
    assert small.val.images.shape == (2 * PER_CLASS, 3, 21, 21)


def test_miniimagenet_pickle_without_checksum_is_not_opened(tmp_path: Path, cache: str, no_unpack: None) -> None:
    _write_mini_pickles(tmp_path)
    with pytest.raises(DatasetError, match="no checksum is known.*mini-imagenet-cache-train.pkl") as error:
        miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path), cache_dir=cache))
    _one_line(error)


def test_miniimagenet_tampered_pickle_is_rejected_unopened(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checksums = _write_mini_pickles(tmp_path)
    # A "pickle" that would run code when loaded, with the size of the original.
    path = tmp_path / "mini-imagenet-cache-validation.pkl"
    evil = pickle.dumps(print)
    path.write_bytes(evil + b"\0" * (path.stat().st_size - len(evil)))
    real_load = pickle.load

    def load(fh, **kwargs):  # the good train file may be read; the tampered one never
        assert fh.name != str(path), "the tampered file was unpickled"
        return real_load(fh, **kwargs)

    monkeypatch.setattr(pickle, "load", load)
    with pytest.raises(DatasetError) as error:
        miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path),
                                                         checksums=checksums, cache_dir=cache))
    message = _one_line(error)
    assert str(path) in message and checksums[path.name] in message


def test_miniimagenet_missing_data_is_one_line(tmp_path: Path, cache: str) -> None:
    with pytest.raises(DatasetError, match="mini-ImageNet not found") as error:
        miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path), cache_dir=cache))
    _one_line(error)
    checksums = _write_mini_pickles(tmp_path)
    (tmp_path / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DatasetError, match="mini-imagenet-cache-test.pkl not found") as error:
        miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(tmp_path), format="pickle",
                                                         checksums=checksums, cache_dir=cache))
    _one_line(error)


def _write_mini_folder(root: Path, csv_dir: Path, nested: bool = False) -> None:
    """Ravi's layout: images/nXXXXXXXXYYYYYYYY.jpg (JPEGs of varied sizes) and the three CSVs."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    for split, wnids in MINI_CLASSES.items():
        with open(csv_dir / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["filename", "label"])
            for c, wnid in enumerate(wnids):
                label = f"{wnid}000000"
                for i in range(PER_CLASS):
                    name = f"{label}{i + 1:08d}.jpg"
                    folder = root / "images" / (label if nested else "")
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(_pixels(c * 10 + i, (40 + 7 * i, 50, 3))).save(folder / name)
                    writer.writerow([name, label])


@pytest.mark.parametrize("nested", [False, True])
def test_miniimagenet_folder_with_ravi_csvs(tmp_path: Path, cache: str, nested: bool) -> None:
    root, csv_dir = tmp_path / "mini", tmp_path / "splits"
    _write_mini_folder(root, csv_dir, nested)
    splits = miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(root),
                                                              split_dir=str(csv_dir), cache_dir=cache))
    _check_splits(splits, (3, 2, 2), size=84)
    assert splits.test.samples_per_class().tolist() == [PER_CLASS, PER_CLASS]

    with pytest.raises(DatasetError, match="split file .*train.csv not found") as error:
        miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(root),
                                                         cache_dir=cache))  # the CSVs are not in root
    _one_line(error)


def test_miniimagenet_folder_is_decoded_once(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root, csv_dir = tmp_path / "mini", tmp_path / "splits"
    _write_mini_folder(root, csv_dir)
    first = miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(root),
                                                             split_dir=str(csv_dir), cache_dir=cache))
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    second = miniimagenet.load_miniimagenet(**dataset_options("miniimagenet", root=str(root),
                                                              split_dir=str(csv_dir), cache_dir=cache))
    assert torch.equal(first.train.images, second.train.images)


@pytest.mark.data
def test_ravi_split_files_have_64_16_20_classes_of_600() -> None:
    if not RAVI_SPLIT_DIR.is_dir():
        pytest.skip(f"Ravi's split files not found at {RAVI_SPLIT_DIR}")
    labels = {split: [label for _, label in miniimagenet._read_csv(RAVI_SPLIT_DIR / f"{split}.csv")]
              for split in ("train", "val", "test")}
    assert [len(set(v)) for v in labels.values()] == [64, 16, 20]
    assert all(v.count(label) == 600 for v in labels.values() for label in set(v))
    assert not set(labels["train"]) & set(labels["val"]) and not set(labels["val"]) & set(labels["test"])


# ----------------------------------------------------------------------------------------------
# tiered-ImageNet
# ----------------------------------------------------------------------------------------------

TIERED = {  # split -> [(class, superclass)]
    "train": [("n10", "dog"), ("n11", "dog"), ("n12", "bird")],
    "val": [("n20", "tool"), ("n21", "tool")],
    "test": [("n30", "fruit"), ("n31", "boat")],
}


def _write_tiered_pickles(folder: Path) -> dict[str, str]:
    checksums = {}
    for s, (split, classes) in enumerate(TIERED.items()):
        general_names = sorted({g for _, g in classes})
        # Images interleaved by class, stored as Ren et al. do (uint8 arrays of PNG bytes) for train.
        labels = [i % len(classes) for i in range(len(classes) * PER_CLASS)]
        pngs = [_encode(_pixels(100 * s + i, (84, 84, 3))) for i in range(len(labels))]
        if split == "train":
            pngs = [np.frombuffer(p, dtype=np.uint8) for p in pngs]
        label_file = {
            "label_specific": np.array(labels),
            "label_general": np.array([general_names.index(classes[c][1]) for c in labels]),
            "label_specific_str": [c for c, _ in classes],
            "label_general_str": general_names,
        }
        for path in (_dump(pngs, folder / f"{split}_images_png.pkl"), _dump(label_file, folder / f"{split}_labels.pkl")):
            checksums[path.name] = _sha256(path)
    return checksums


def test_tieredimagenet_pickles_grouped_by_superclass(tmp_path: Path, cache: str) -> None:
    checksums = _write_tiered_pickles(tmp_path / "tiered-imagenet")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    splits = tieredimagenet.load_tieredimagenet(**dataset_options("tieredimagenet", root=str(tmp_path),
                                                                  checksums=str(sums), cache_dir=cache))
    _check_splits(splits, (3, 2, 2), size=84)
    assert splits.train.class_names == ["n10", "n11", "n12"]
    assert splits.train.groups == ["dog", "dog", "bird"] and splits.test.groups == ["fruit", "boat"]
    assert splits.train.samples_per_class().tolist() == [PER_CLASS] * 3


def test_tieredimagenet_tampered_labels_rejected_unopened(tmp_path: Path, cache: str, no_unpack: None) -> None:
    folder = tmp_path / "tiered-imagenet"
    checksums = _write_tiered_pickles(folder)
    (folder / "train_labels.pkl").write_bytes(b"\x80\x04tampered")
    with pytest.raises(DatasetError) as error:
        tieredimagenet.load_tieredimagenet(**dataset_options("tieredimagenet", root=str(tmp_path),
                                                             checksums=checksums, cache_dir=cache))
    message = _one_line(error)
    assert "train_labels.pkl" in message and checksums["train_labels.pkl"] in message


def test_tieredimagenet_folders(tmp_path: Path, cache: str) -> None:
    for s, (split, classes) in enumerate(TIERED.items()):
        for c, (name, _) in enumerate(classes):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(PER_CLASS):
                Image.fromarray(_pixels(s * 100 + c * 10 + i, (30, 30, 3))).save(tmp_path / split / name / f"{i}.jpg")
    splits = tieredimagenet.load_tieredimagenet(**dataset_options("tieredimagenet", root=str(tmp_path),
                                                                  image_size=16, cache_dir=cache))
    _check_splits(splits, (3, 2, 2), size=16)
    assert splits.val.groups == ["n20", "n21"]
    with pytest.raises(DatasetError, match="tiered-ImageNet not found"):
        tieredimagenet.load_tieredimagenet(**dataset_options("tieredimagenet", root=str(tmp_path / "nothing"),
                                                             cache_dir=cache))


# ----------------------------------------------------------------------------------------------
# CIFAR-FS and FC100
# ----------------------------------------------------------------------------------------------


def _write_cifar_release(root: Path) -> Path:
    """A tiny cifar-100-python/ (1 train + 1 test image per class) and its .tar.gz; returns the folder."""
    folder = root / cifar.ARCHIVE_DIR
    coarse_names = sorted(cifar.SUPERCLASSES)
    for name, seed in (("train", 1), ("test", 2)):
        fine = list(range(100))
        _dump({
            "data": _pixels(seed, (100, 3072)),
            "fine_labels": fine,
            "coarse_labels": [coarse_names.index(cifar.SUPERCLASS_OF[cifar.FINE_NAMES[f]]) for f in fine],
        }, folder / name)
    _dump({"fine_label_names": cifar.FINE_NAMES, "coarse_label_names": coarse_names}, folder / "meta")
    with tarfile.open(root / cifar.ARCHIVE.name, "w:gz") as tar:
        tar.add(folder, arcname=cifar.ARCHIVE_DIR)
    return folder


@pytest.fixture
def cifar_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny release, with the registry's checksums replaced by the tiny files' own."""
    folder = _write_cifar_release(tmp_path)
    archive = tmp_path / cifar.ARCHIVE.name
    monkeypatch.setattr(cifar, "ARCHIVE", KnownFile(
        archive.name, size=archive.stat().st_size, sha256=_sha256(archive), urls=cifar.ARCHIVE.urls))
    for name in cifar.MEMBERS:
        monkeypatch.setitem(cifar.MEMBERS, name, KnownFile(name, md5=_md5(folder / name)))
    return tmp_path


def test_published_split_lists_partition_cifar100() -> None:
    for split_lists, sizes in ((cifar.CIFARFS_SPLIT, [64, 16, 20]), (cifar.FC100_SPLIT, [60, 20, 20])):
        assert [len(v) for v in split_lists.values()] == sizes
        assert sorted(sum(split_lists.values(), [])) == cifar.FINE_NAMES
    assert len(cifar.FINE_NAMES) == 100 and len(cifar.SUPERCLASSES) == 20


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_cifarfs_and_fc100_from_the_release(cifar_release: Path, cache: str, layout: str) -> None:
    if layout == "archive":
        for name in cifar.MEMBERS:
            (cifar_release / cifar.ARCHIVE_DIR / name).unlink()
        (cifar_release / cifar.ARCHIVE_DIR).rmdir()
    fs = cifar.load_cifarfs(**dataset_options("cifarfs", root=str(cifar_release), cache_dir=cache))
    _check_splits(fs, (64, 16, 20), size=32)
    assert fs.test.samples_per_class().tolist() == [2] * 20  # train and test images merged
    assert fs.val.groups == fs.val.class_names
    # The first train image of "apple" (fine label 0) is row 0 of the train pickle, channel-first.
    raw = _pixels(1, (100, 3072)).reshape(100, 3, 32, 32)
    apple = fs.train.class_names.index("apple")
    assert torch.equal(fs.train.images[fs.train.labels == apple][0], torch.from_numpy(raw[0]))

    fc = cifar.load_fc100(**dataset_options("fc100", root=str(cifar_release), cache_dir=cache))
    _check_splits(fc, (60, 20, 20), size=32)
    supers = [set(part.groups) for _, part in fc.items()]
    assert [len(s) for s in supers] == [12, 4, 4] and not (supers[0] & supers[2] or supers[0] & supers[1])


def test_cifar_tampered_archive_rejected_unopened(cifar_release: Path, cache: str, no_unpack: None) -> None:
    for name in cifar.MEMBERS:
        (cifar_release / cifar.ARCHIVE_DIR / name).unlink()
    (cifar_release / cifar.ARCHIVE_DIR).rmdir()
    archive = cifar_release / cifar.ARCHIVE.name
    data = bytearray(archive.read_bytes())
    data[-5] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as error:
        cifar.load_cifarfs(**dataset_options("cifarfs", root=str(cifar_release), cache_dir=cache))
    message = _one_line(error)
    assert str(archive) in message and cifar.ARCHIVE.sha256 in message


def test_cifar_tampered_member_rejected_unopened(cifar_release: Path, cache: str, no_unpack: None) -> None:
    meta = cifar_release / cifar.ARCHIVE_DIR / "meta"
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    meta.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=cifar.MEMBERS["meta"].md5) as error:
        cifar.load_fc100(**dataset_options("fc100", root=str(cifar_release), cache_dir=cache))
    assert str(meta) in _one_line(error)


def test_cifar_download_from_file_url(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = tmp_path / "server"
    _write_cifar_release(server)
    archive = server / cifar.ARCHIVE.name
    monkeypatch.setattr(cifar, "ARCHIVE", KnownFile(
        archive.name, size=archive.stat().st_size, sha256=_sha256(archive), urls=(archive.as_uri(),)))
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="CIFAR-100 not found"):
        cifar.load_cifarfs(**dataset_options("cifarfs", root=str(root), cache_dir=cache))
    splits = cifar.load_cifarfs(**dataset_options("cifarfs", root=str(root), download=True, cache_dir=cache))
    _check_splits(splits, (64, 16, 20))
    assert (root / cifar.ARCHIVE.name).is_file()


def test_cifarfs_learn2learn_png_folders(tmp_path: Path, cache: str) -> None:
    data = tmp_path / "cifarfs" / "cifar100" / "data"
    for i, name in enumerate(cifar.FINE_NAMES):
        (data / name).mkdir(parents=True)
        Image.fromarray(_pixels(i, (32, 32, 3))).save(data / name / f"{i}.png")
    splits = cifar.load_cifarfs(**dataset_options("cifarfs", root=str(tmp_path), cache_dir=cache))
    _check_splits(splits, (64, 16, 20), size=32)
    apple = splits.train.labels == splits.train.class_names.index("apple")
    assert torch.equal(splits.train.images[apple][0], torch.from_numpy(
        _pixels(0, (32, 32, 3)).transpose(2, 0, 1).copy()))


def test_fc100_metaoptnet_pickles(tmp_path: Path, cache: str) -> None:
    checksums = {}
    for split, names in cifar.FC100_SPLIT.items():
        labels = [cifar.FINE_NAMES.index(n) for n in names for _ in range(2)]
        path = _dump({"data": _pixels(len(labels), (len(labels), 32, 32, 3)), "labels": labels},
                     tmp_path / f"FC100_{split}.pickle")
        checksums[path.name] = _sha256(path)
    splits = cifar.load_fc100(**dataset_options("fc100", root=str(tmp_path), checksums=checksums,
                                                cache_dir=cache))
    _check_splits(splits, (60, 20, 20), size=32)
    assert set(splits.test.groups) == set(cifar.FC100_SUPERCLASSES["test"])
    with pytest.raises(DatasetError, match="no checksum is known.*FC100_train.pickle"):
        cifar.load_fc100(**dataset_options("fc100", root=str(tmp_path), cache_dir=str(Path(cache) / "other")))


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------

CUB_CLASSES = [f"{i:03d}.Bird_{i}" for i in range(1, 9)]  # 8 classes: closer_look gives 4/2/2


def _write_cub(root: Path) -> Path:
    folder = root / cub.FOLDER
    images, labels, boxes = [], [], []
    for c, name in enumerate(CUB_CLASSES):
        (folder / "images" / name).mkdir(parents=True)
        for i in range(2):
            image_id = len(images) + 1
            relative = f"{name}/{name[4:]}_{i:04d}.jpg"
            array = np.zeros((60, 80, 3), dtype=np.uint8)
            array[10:30, 20:60] = 25 * c + 10 * i + 30  # the "bird", inside the bounding box
            Image.fromarray(array).save(folder / "images" / relative, quality=95)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c + 1}")
            boxes.append(f"{image_id} 20.0 10.0 40.0 20.0")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CUB_CLASSES)))
    (folder / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return folder


def test_cub_closer_look_split_and_bounding_boxes(tmp_path: Path, cache: str) -> None:
    _write_cub(tmp_path)
    splits = cub.load_cub(**dataset_options("cub", root=str(tmp_path), image_size=20, cache_dir=cache))
    _check_splits(splits, (4, 2, 2), size=20)
    assert splits.train.class_names == CUB_CLASSES[0::2]
    assert splits.val.class_names == [CUB_CLASSES[1], CUB_CLASSES[5]]
    assert splits.test.class_names == [CUB_CLASSES[3], CUB_CLASSES[7]]
    assert splits.test.groups == splits.test.class_names
    cropped = cub.load_cub(**dataset_options("cub", root=str(tmp_path), image_size=20, bounding_box=True,
                                             cache_dir=cache))
    # Whole images have a black border around the bird; cropped ones are all bird.
    assert splits.train.images[:, :, 0, 0].max() < 10 and cropped.train.images[2:, :, 0, 0].min() > 20


def test_cub_tarball_is_verified_then_extracted(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    _write_cub(staging)
    tarball = tmp_path / "data" / cub.TARBALL.name
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(staging / cub.FOLDER, arcname=cub.FOLDER)
    good = KnownFile(tarball.name, size=tarball.stat().st_size, sha256=_sha256(tarball))
    monkeypatch.setattr(cub, "TARBALL", good)
    splits = cub.load_cub(**dataset_options("cub", root=str(tarball.parent), cache_dir=cache))
    _check_splits(splits, (4, 2, 2), size=84)
    assert (tarball.parent / cub.FOLDER / "images.txt").is_file()


def test_cub_tampered_tarball_rejected_unextracted(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch,
                                                   no_unpack: None) -> None:
    tarball = tmp_path / cub.TARBALL.name
    tarball.write_bytes(b"<html>not the tarball</html>")
    with pytest.raises(DatasetError) as error:
        cub.load_cub(**dataset_options("cub", root=str(tmp_path), cache_dir=cache))
    message = _one_line(error)
    assert str(tarball) in message and cub.TARBALL.sha256 in message and str(cub.TARBALL.size) in message
    assert not (tmp_path / cub.FOLDER).exists()


def test_channels_and_image_size_are_checked(tmp_path: Path, cache: str) -> None:
    _write_cub(tmp_path)
    with pytest.raises(DatasetError, match="dataset.channels must be 3"):
        cub.load_cub(**dataset_options("cub", root=str(tmp_path), channels=1, cache_dir=cache))
    with pytest.raises(DatasetError, match="dataset.image_size"):
        cub.load_cub(**dataset_options("cub", root=str(tmp_path), image_size=0, cache_dir=cache))


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["miniimagenet", "tieredimagenet", "cifarfs", "fc100", "cub"])
def test_dataset_configs_match_their_loaders(name: str) -> None:
    """Every key of the YAML is a parameter of its ``_target_`` (and the loader has no required extras)."""
    import inspect

    from hydra.utils import get_method
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / f"{name}.yaml")
    params = inspect.signature(get_method(cfg._target_)).parameters
    keys = set(cfg) - {"_target_"}
    assert keys <= set(params)
    assert {p for p, v in params.items() if v.default is inspect.Parameter.empty} <= keys
    assert cfg.channels == 3 and isinstance(cfg.image_size, int)


@pytest.mark.parametrize("algorithm,backbone", [("maml", "conv4"), ("protonet", "conv4"), ("relation", "conv4_relation"),
                                                ("maml", "conv4_84")])
def test_an_image_benchmark_trains_with_any_algorithm_and_augmentation(compose_cfg, tmp_path: Path, algorithm: str,
                                                                       backbone: str) -> None:
    """mini-ImageNet (tiny pickles) through the whole run: RGB channels reach the backbone, training tasks are
    augmented, and evaluation runs on the fixed tasks."""
    from metarun.loop import run

    root = tmp_path / "data"
    root.mkdir()
    checksums = _write_mini_pickles(root)
    sums = tmp_path / "SHA256SUMS"  # the user vouches for their copies with a sha256sum file
    sums.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    checksum_override = f"dataset.checksums={sums}"
    cfg = compose_cfg("dataset=miniimagenet", f"dataset.root={root}", checksum_override, f"algorithm={algorithm}",
                      f"backbone={backbone}", "augment=crop_flip_jitter", "ways=2", "shots=1", "query_shots=2",
                      f"dataset.cache_dir={tmp_path / 'cache'}")
    run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test/acc_mean"] <= 1.0
    assert results["config"]["backbone"]["in_channels"] == 3
