"""Tests of metarun.augment: shapes, range, per-sample randomness, identity at zero strength,
determinism under a seed, and the conf/augment configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metarun import augment

CONF = Path(__file__).resolve().parents[1] / "conf" / "augment"

STRONG = [
    augment.RandomCrop(padding=4),
    augment.RandomHorizontalFlip(p=0.5),
    augment.ColorJitter(0.4, 0.4, 0.4),
    augment.RandomAffine(degrees=10, translate=0.05, scale=(0.8, 1.2), shear=0.3),
]
IDENTITY = [
    augment.RandomCrop(padding=0),
    augment.RandomHorizontalFlip(p=0.0),
    augment.ColorJitter(0.0, 0.0, 0.0),
    augment.RandomAffine(degrees=0, translate=0, scale=(1, 1), shear=0),
]


def _batch(n: int = 16, c: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("transform", STRONG, ids=repr)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_range_and_per_sample_randomness(transform, channels: int) -> None:
    images = _batch(c=channels)
    # The same image n times: per-sample randomness makes the outputs differ.
    same = images[:1].expand(16, -1, -1, -1).contiguous()
    out = transform(same)
    assert out.shape == same.shape and out.dtype == same.dtype
    assert out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 1


@pytest.mark.parametrize("transform", IDENTITY, ids=repr)
def test_zero_strength_is_the_identity(transform) -> None:
    images = _batch()
    torch.testing.assert_close(transform(images), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", STRONG, ids=repr)
def test_same_seed_same_output(transform) -> None:
    images = _batch()
    torch.manual_seed(3)
    first = transform(images)
    torch.manual_seed(3)
    torch.testing.assert_close(transform(images), first)


def test_crop_is_a_shifted_window_and_flip_mirrors() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) / 32
    out = augment.RandomCrop(padding=1)(images)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for i in range(2):
        windows = [padded[i, :, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)
    torch.testing.assert_close(augment.RandomHorizontalFlip(p=1.0)(images), images.flip(-1))


def test_affine_pure_shift_moves_the_content() -> None:
    images = torch.zeros(1, 1, 10, 10)
    images[0, 0, 4, 4] = 1.0
    # translate 0.1 of 10 px = exactly 1 px at the extremes of the draw; check the mass moved, not lost.
    out = augment.RandomAffine(translate=0.1)(images)
    assert out.sum() > 0.5 and not torch.equal(out, images)


@pytest.mark.parametrize("name", ["crop_flip", "crop_flip_jitter", "koch_affine"])
def test_configs_instantiate_and_run(name: str) -> None:
    transform = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(transform, augment.Compose) and len(transform.transforms) >= 1
    images = _batch(size=32)
    out = transform(images)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1


def test_affine_scale_enlarges_the_content() -> None:
    """Scale 2 maps an input point to twice its distance from the centre: a centred square gets 4x the area."""
    images = torch.zeros(1, 1, 16, 16)
    images[0, 0, 6:10, 6:10] = 1.0
    out = augment.RandomAffine(scale=(2.0, 2.0))(images)
    assert out.sum().item() == pytest.approx(4 * images.sum().item(), rel=0.05)
    assert out[0, 0, 5:11, 5:11].min() > 0.9 and out[0, 0, :3].max() == 0
