"""Training-time image augmentations, batched and random per sample.

Each transform is a callable ``images [n, C, H, W] float in [0, 1] -> same shape``, runs on the
images' device and draws from torch's global RNG (so ``torch.manual_seed`` makes it repeatable).
They transform meta-training batches; evaluation tasks are augmented only for test-time
augmentation (``eval.tta_views``: :class:`metarun.tasks.sampling.AugmentedTasks`, which seeds each
view).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import ConfigError

Transform = Callable[[Tensor], Tensor]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, like: Tensor) -> Tensor:
    """``[n]`` samples of U(low, high) on ``like``'s device and dtype."""
    return low + (high - low) * torch.rand(n, device=like.device, dtype=like.dtype)


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, images: Tensor) -> Tensor:
        for transform in self.transforms:
            images = transform(images)
        return images

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomCrop:
    """Zero-pad by ``padding`` pixels, then crop a random ``H x W`` window per sample.

    The standard CIFAR augmentation (He et al. 2016, padding 4), used for few-shot training on
    CIFAR-FS/FC100 and mini-ImageNet by e.g. MetaOptNet (Lee et al. 2019, padding 4 and 8).
    """

    def __init__(self, padding: int) -> None:
        if padding < 0:
            raise ConfigError(f"padding must be >= 0, got {padding}")
        self.padding = padding

    def __call__(self, images: Tensor) -> Tensor:
        if self.padding == 0:
            return images
        n, _, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (n,), device=images.device)
        left = torch.randint(0, 2 * p + 1, (n,), device=images.device)
        rows = (top[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [n, H, 1]
        cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [n, 1, W]
        batch = torch.arange(n, device=images.device)[:, None, None]
        # Advanced indexing puts the indexed dims first: [n, H, W, C] -> [n, C, H, W].
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p`` (Krizhevsky et al. 2012)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, images: Tensor) -> Tensor:
        flip = torch.rand(images.shape[0], device=images.device) < self.p
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation per sample, as torchvision's ``ColorJitter``.

    Each factor is drawn from U(max(0, 1 - s), 1 + s) for strength ``s``; brightness scales the
    pixels, contrast blends with the image's mean grey level, saturation with its grey image.
    Used with strength 0.4 each by MetaOptNet (Lee et al. 2019) for mini-ImageNet/CIFAR-FS/FC100.
    Unlike torchvision the three are applied in a fixed order (brightness, contrast, saturation),
    so the batch stays one vectorised operation. Single-channel images have no saturation.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0) -> None:
        if min(brightness, contrast, saturation) < 0:
            raise ConfigError("ColorJitter strengths must be >= 0")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, images: Tensor) -> Tensor:
        n, c = images.shape[:2]

        def factor(strength: float) -> Tensor:
            return _uniform(n, max(0.0, 1 - strength), 1 + strength, images)[:, None, None, None]

        def grey(x: Tensor) -> Tensor:  # [n, 1, H, W]
            if c == 1:
                return x
            weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)[None, :, None, None]
            return (x * weights).sum(1, keepdim=True)

        out = images
        if self.brightness:
            out = (out * factor(self.brightness)).clamp(0, 1)
        if self.contrast:
            mean = grey(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (mean + factor(self.contrast) * (out - mean)).clamp(0, 1)
        if self.saturation and c == 3:
            g = grey(out)
            out = (g + factor(self.saturation) * (out - g)).clamp(0, 1)
        return out

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


class RandomAffine:
    """Random rotation, shear, per-axis scale and translation per sample, by one ``grid_sample``.

    Koch, Zemel and Salakhutdinov (2015), "Siamese Neural Networks for One-shot Image Recognition",
    section 4.3: ``T = (theta, rho_x, rho_y, s_x, s_y, t_x, t_y)`` with rotation theta in
    [-10, 10] degrees, shears rho in [-0.3, 0.3], scales s in [0.8, 1.2] and translations t in
    [-2, 2] pixels of a 105-pixel image, i.e. ``translate = 2 / 105`` as a fraction of the side.
    Pixels that come from outside the image are 0 (the background of metarun's character data).
    Assumes square images (the rotation acts on normalised coordinates).

    Args:
        degrees: maximum absolute rotation.
        translate: maximum absolute shift as a fraction of the side.
        scale: ``(low, high)`` range of the x and y scale factors (drawn independently).
        shear: maximum absolute shear coefficient.
    """

    def __init__(
        self,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
        shear: float = 0.0,
    ) -> None:
        low, high = scale
        if not 0 < low <= high:
            raise ConfigError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, (low, high), shear

    def __call__(self, images: Tensor) -> Tensor:
        n = images.shape[0]
        dtype = images.dtype if images.is_floating_point() else torch.float32
        like = torch.empty(0, device=images.device, dtype=dtype)
        angle = _uniform(n, -self.degrees, self.degrees, like) * (math.pi / 180)
        shear_x, shear_y = (_uniform(n, -self.shear, self.shear, like) for _ in range(2))
        scale_x, scale_y = (_uniform(n, *self.scale, like) for _ in range(2))
        # Normalised coordinates span 2 units per side, so a shift of f * side is 2 f.
        shift = torch.stack([_uniform(n, -self.translate, self.translate, like) for _ in range(2)], 1) * 2

        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        ones = torch.ones_like(angle)
        shearing = torch.stack([torch.stack([ones, shear_x], -1), torch.stack([shear_y, ones], -1)], -2)
        scaling = torch.diag_embed(torch.stack([scale_x, scale_y], -1))
        forward = rotation @ shearing @ scaling  # [n, 2, 2]: where an input point goes
        # grid_sample needs, for each output point, where to read in the input: the inverse map.
        inverse = torch.linalg.inv(forward)
        theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)  # [n, 2, 3]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale}, "
                f"shear={self.shear})")
