"""Tests of metarun.data.glyphs, the generated Omniglot-shaped dataset.

Most tests use a small generation (4 alphabets x 5 characters) and a cache in ``tmp_path``. The
tests of difficulty use the size of conf/dataset/glyphs.yaml (1200 characters x 20 drawings, a few
seconds), generated once for the module.
"""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from conftest import glyph_generation_options, glyphs_options
from glyphs_difficulty import one_nn_accuracy  # scripts/, on the path through conftest
from metarun.data import glyphs
from metarun.data.base import ClassSplits, DatasetError, ImageClasses, split_by_seed
from metarun.data.glyphs import generate_glyphs, load_glyphs

SMALL = {"num_alphabets": 4, "characters_per_alphabet": 5, "samples_per_class": 6}
SMALL_CLASSES = 4 * 5
SMALL_SPLIT = [12, 4, -1]  # 12 / 4 / 4 of the 20 classes


def generate(**options) -> ImageClasses:
    """generate_glyphs with conf/dataset/glyphs.yaml's values but ``options`` (the function has no defaults)."""
    return generate_glyphs(**glyph_generation_options(**options))


def load(**options) -> ClassSplits:
    """load_glyphs with conf/dataset/glyphs.yaml's values but ``options`` (the function has no defaults)."""
    return load_glyphs(**glyphs_options(**options))


@pytest.fixture(scope="module")
def small() -> ImageClasses:
    return generate(**SMALL)


@pytest.fixture(scope="module")
def default_size() -> ImageClasses:
    return generate()


def flat(classes: ImageClasses) -> torch.Tensor:
    """float images in [0, 1], one row per image: ``[N, H * W]``."""
    return classes.images.float().div(255).flatten(1)


# ----------------------------------------------------------------------------------------------
# What generate_glyphs returns
# ----------------------------------------------------------------------------------------------


def test_shapes_dtypes_labels_and_names(small):
    n = SMALL_CLASSES * SMALL["samples_per_class"]
    assert small.images.shape == (n, 1, 28, 28) and small.images.dtype == torch.uint8
    assert small.labels.shape == (n,) and small.labels.dtype == torch.int64
    # Sorted by label: all drawings of class 0 first, and so on.
    assert torch.equal(
        small.labels, torch.arange(SMALL_CLASSES).repeat_interleave(SMALL["samples_per_class"])
    )
    assert small.num_classes == SMALL_CLASSES
    assert (
        small.class_names[0] == "alphabet00/character00" and small.class_names[-1] == "alphabet03/character04"
    )
    assert len(set(small.class_names)) == SMALL_CLASSES
    assert small.groups == [name.split("/")[0] for name in small.class_names]
    assert len(set(small.groups)) == SMALL["num_alphabets"]


def test_ink_is_bright_on_a_dark_background(small):
    images = small.images.float()
    assert images.amax() == 255
    # Strokes cover a minority of the pixels; the border (outside the character box) is background.
    assert 0.03 < images.mean().item() / 255 < 0.35
    assert images[:, :, 0, :].mean() < 5 and images[:, :, :, 0].mean() < 5
    # Every drawing has ink.
    assert (small.images.flatten(1).amax(1) > 200).all()


@pytest.mark.parametrize("image_size", [8, 16, 56])
def test_image_size(image_size):
    classes = generate(
        num_alphabets=1, characters_per_alphabet=2, samples_per_class=3, image_size=image_size
    )
    assert classes.images.shape == (6, 1, image_size, image_size)
    assert (classes.images.flatten(1).amax(1) > 100).all()


def test_same_arguments_give_identical_images_and_other_seeds_differ(small):
    again = generate(**SMALL)
    assert torch.equal(again.images, small.images) and torch.equal(again.labels, small.labels)
    assert again.class_names == small.class_names
    other = generate(**SMALL, seed=1)
    assert not torch.equal(other.images, small.images)


def test_generation_ignores_the_global_random_state(small):
    torch.manual_seed(123)
    import numpy as np

    np.random.seed(123)
    assert torch.equal(generate(**SMALL).images, small.images)


def test_a_character_does_not_depend_on_how_many_others_are_generated(small):
    fewer = generate(
        num_alphabets=2, characters_per_alphabet=3, samples_per_class=SMALL["samples_per_class"]
    )
    for label, name in enumerate(fewer.class_names):
        same = small.class_names.index(name)
        assert torch.equal(fewer.images[fewer.labels == label], small.images[small.labels == same])


def test_drawings_of_a_character_differ_but_are_closer_to_each_other_than_to_other_characters(small):
    x = flat(small).view(SMALL_CLASSES, SMALL["samples_per_class"], -1)
    k = SMALL["samples_per_class"]
    within, between = [], []
    for c in range(SMALL_CLASSES):
        d = torch.cdist(x[c], x[c])
        off_diagonal = d[~torch.eye(k, dtype=torch.bool)]
        # Different people's drawings, not copies.
        assert off_diagonal.min() > 0.5
        within.append(off_diagonal.mean())
        others = torch.cat([x[o] for o in range(SMALL_CLASSES) if o != c])
        between.append(torch.cdist(x[c], others).mean())
    within, between = torch.stack(within), torch.stack(between)
    assert within.mean() < 0.93 * between.mean()
    assert (within < between).float().mean() >= 0.9


# ----------------------------------------------------------------------------------------------
# Difficulty (default size)
# ----------------------------------------------------------------------------------------------


def test_one_nn_in_pixel_space_is_far_above_chance_and_far_from_perfect(default_size):
    # The generator was tuned to about 0.63 on the test split (Omniglot: 0.6-0.7); the band is wide.
    split = glyphs_options()  # conf/dataset/glyphs.yaml's split
    test_classes = split_by_seed(default_size, tuple(split["split_sizes"]), split["split_seed"]).test
    accuracy = one_nn_accuracy(test_classes)
    assert 0.30 < accuracy < 0.85, accuracy


def test_characters_of_one_alphabet_are_more_confusable_than_characters_of_different_alphabets(default_size):
    # Measured: about 0.56 within one alphabet, 0.63 across alphabets.
    assert one_nn_accuracy(default_size, one_alphabet=True) < one_nn_accuracy(default_size) - 0.03


def test_characters_of_one_alphabet_look_more_alike_than_characters_of_different_alphabets(default_size):
    per_class = int(default_size.samples_per_class()[0])
    means = flat(default_size).view(default_size.num_classes, per_class, -1).mean(1)
    distances = torch.cdist(means, means)
    group = torch.tensor([int(name.removeprefix("alphabet")) for name in default_size.groups])
    same = group[:, None] == group[None, :]
    same_alphabet = distances[same & ~torch.eye(len(group), dtype=torch.bool)].mean()
    other_alphabet = distances[~same].mean()
    assert same_alphabet < 0.95 * other_alphabet


# ----------------------------------------------------------------------------------------------
# load_glyphs: cache, splits, rotations
# ----------------------------------------------------------------------------------------------


def cache_files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def assert_same_splits(a: ClassSplits, b: ClassSplits) -> None:
    for (_, x), (_, y) in zip(a.items(), b.items(), strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert x.class_names == y.class_names and x.groups == y.groups


def test_cache_round_trip_reads_the_file_the_second_time(tmp_path, monkeypatch):
    first = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    files = cache_files(tmp_path)
    # One complete file, named by version and parameter hash; no temporary file left over.
    assert (
        len(files) == 1
        and files[0].startswith(f"glyphs-v{glyphs.FORMAT_VERSION}-")
        and files[0].endswith(".pt")
    )

    def must_not_generate(**kwargs):
        raise AssertionError("generate_glyphs was called although the cache file exists")

    monkeypatch.setattr(glyphs, "generate_glyphs", must_not_generate)
    second = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    assert_same_splits(first, second)


def test_cache_file_name_depends_on_every_generation_parameter(tmp_path):
    load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, seed=3)
    load(cache_dir=str(tmp_path), **{**SMALL, "samples_per_class": 5}, split_sizes=SMALL_SPLIT)
    load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, image_size=20)
    # The split and the rotations are applied after the cache: they add no file.
    load(cache_dir=str(tmp_path), **SMALL, split_sizes=[10, 5, 5], split_seed=7, rotations=True)
    assert len(cache_files(tmp_path)) == 4


def test_corrupt_cache_file_is_regenerated_with_a_warning(tmp_path, caplog):
    fresh = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    (name,) = cache_files(tmp_path)
    (tmp_path / name).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="metarun.data.glyphs"):
        again = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    assert any("regenerating" in record.getMessage() for record in caplog.records)
    assert_same_splits(fresh, again)
    # The file was rewritten and now loads.
    assert cache_files(tmp_path) == [name]
    assert torch.load(tmp_path / name, weights_only=True)["images"].shape[0] == SMALL_CLASSES * 6


def test_cache_dir_defaults_to_the_metarun_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "from-env"))
    load(**SMALL, split_sizes=SMALL_SPLIT)
    assert len(cache_files(tmp_path / "from-env")) == 1


def test_unwritable_cache_dir_only_warns(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="metarun.data.glyphs"):
        splits = load(cache_dir=str(blocker / "cache"), **SMALL, split_sizes=SMALL_SPLIT)
    assert splits.train.num_classes == 12
    assert any("could not write" in record.getMessage() for record in caplog.records)


def test_split_sizes_and_disjoint_classes(tmp_path):
    splits = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    assert [part.num_classes for _, part in splits.items()] == [12, 4, 4]
    names = [set(part.class_names) for _, part in splits.items()]
    for a, b in itertools.combinations(names, 2):
        assert not a & b
    assert set.union(*names) == set(generate(**SMALL).class_names)
    for _, part in splits.items():
        assert part.images.shape == (part.num_classes * 6, 1, 28, 28)
        assert torch.equal(part.samples_per_class(), torch.full((part.num_classes,), 6))
    # The split seed decides which classes go where.
    other = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, split_seed=2)
    assert other.train.class_names != splits.train.class_names


def test_split_sizes_accept_a_hydra_list(tmp_path):
    from omegaconf import OmegaConf

    sizes = OmegaConf.create({"split_sizes": SMALL_SPLIT}).split_sizes
    splits = load(cache_dir=str(tmp_path), **SMALL, split_sizes=sizes)
    assert splits.test.num_classes == 4


def test_rotations_quadruple_the_classes_of_every_split(tmp_path):
    plain = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    rotated = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations=True)
    for (_, p), (_, r) in zip(plain.items(), rotated.items(), strict=True):
        assert r.num_classes == 4 * p.num_classes and len(r.labels) == 4 * len(p.labels)
        assert r.class_names[:4] == [f"{p.class_names[0]}/rot{a:03d}" for a in (0, 90, 180, 270)]
        # Rotation 0 of a class is the class itself.
        assert torch.equal(r.images[r.labels == 0], p.images[p.labels == 0])


def test_rotations_for_training_only_leave_val_and_test_unrotated(tmp_path):
    plain = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT)
    rotated = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations="train")
    assert rotated.train.num_classes == 4 * plain.train.num_classes == 48
    assert rotated.train.class_names[1] == f"{plain.train.class_names[0]}/rot090"
    for name in ("val", "test"):
        assert getattr(rotated, name).class_names == getattr(plain, name).class_names  # no "/rotNNN" classes
        assert torch.equal(getattr(rotated, name).images, getattr(plain, name).images)
    # A list of splits, and the names of true/false.
    some = load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations=["train", "val"])
    assert [part.num_classes for _, part in some.items()] == [48, 16, 4]
    for alias, flag in (("all", True), ("none", False)):
        assert_same_splits(load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations=alias),
                           load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations=flag))
    with pytest.raises(DatasetError, match=r"dataset.rotations must be true, false, all, none, eval .* got 'trian'"):
        load(cache_dir=str(tmp_path), **SMALL, split_sizes=SMALL_SPLIT, rotations="trian")


def test_an_image_file_of_a_drawing_loads_back_as_the_same_image(small, tmp_path):
    """``load_image`` is the dataset's own preprocessing (``preprocess``, which the generator's
    drawings pass through): a PNG of a drawing decodes to that drawing, bit for bit; a larger
    image is box-filtered down as the generator reduces its supersampled canvas."""
    from PIL import Image

    image = small.images[7]  # uint8 [1, 28, 28]
    Image.fromarray(image[0].numpy()).save(tmp_path / "glyph.png")
    assert torch.equal(torch.from_numpy(glyphs.load_image(tmp_path / "glyph.png", 28)), image)
    big = Image.fromarray(image[0].numpy()).resize((112, 112), Image.NEAREST)
    big.convert("RGB").save(tmp_path / "big.png")  # colour, 4x: greyscale and reduced
    assert torch.equal(torch.from_numpy(glyphs.load_image(tmp_path / "big.png", 28)), image)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode .*broken.png"):
        glyphs.load_image(tmp_path / "broken.png", 28)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_alphabets": 0}, "num_alphabets"),
        ({"characters_per_alphabet": -2}, "characters_per_alphabet"),
        ({"characters_per_alphabet": 2.5}, "characters_per_alphabet"),
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"image_size": 7}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"split_sizes": [10, 5]}, "split_sizes"),
        ({"split_sizes": "10,5,5"}, "split_sizes"),
        ({"split_sizes": [0, 5, 5]}, "split_sizes"),
        ({"split_sizes": [15, 10, -1]}, "split"),  # 25 classes asked of 20
        ({"split_seed": "one"}, "split_seed"),
    ],
)
def test_invalid_arguments_raise_dataset_error(tmp_path, kwargs, message):
    args = {**SMALL, "split_sizes": SMALL_SPLIT, **kwargs}
    with pytest.raises(DatasetError, match=message):
        load(cache_dir=str(tmp_path), **args)


def test_generate_glyphs_checks_its_arguments_too():
    with pytest.raises(DatasetError, match="image_size"):
        generate(image_size=4)
