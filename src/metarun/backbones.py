"""Feature extractors. Each maps ``[B, C, H, W]`` images to ``[B, out_features]`` features.

Methods that compare feature *maps* (the Relation Network) call ``feature_maps`` instead, which
every backbone has: ``[B, C, H, W] -> [B, *map_shape]`` (a vector backbone gives 1x1 maps).

Algorithms add their own heads (a linear classifier for the gradient-based family), so a
backbone never knows the number of ways. BatchNorm layers keep running statistics during
meta-training; whether evaluation uses them or the batch statistics is the run option
``eval.bn_batch_stats`` (see ``metarun.loop``), not a property of the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.errors import ConfigError


class SpatialMean(nn.Module):
    """The mean over the spatial dimensions: ``[B, C, H, W] -> [B, C]`` (MAML's Omniglot readout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Conv4(nn.Sequential):
    """The 4-block convolutional network of Vinyals et al. (2016), as used by MAML (Finn et al. 2017).

    Each block is 3x3 conv -> BatchNorm -> ReLU, then either a stride-2 convolution (MAML's
    Omniglot model: "strided convolutions instead of max-pooling") or 2x2 max-pooling (MAML's
    mini-ImageNet model). Features are the spatial mean of the last block (MAML's Omniglot
    code) or the flattened map (its mini-ImageNet code).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for mini-ImageNet).
        hidden: filters per block (64 Omniglot, 32 mini-ImageNet).
        image_size: input height and width, used to size the output.
        pool: ``"stride"`` or ``"max"``.
        flatten: flatten the last feature map instead of averaging it spatially.
        pooled_blocks: how many of the 4 blocks (the first ones) downsample; the others keep the
            size. The Relation Network's embedding (Sung et al. 2018) pools in the first 2 only.
        pooled_padding: padding of the downsampling blocks' convolutions (Sung et al.: 0); the
            other blocks pad by 1.

    The values of the paper networks are in conf/backbone/ (conv4, conv4_84, conv4_relation), once:
    only ``pooled_blocks`` and ``pooled_padding`` have Python defaults, the layout of every config but
    the Relation Network's, which sets its own.

    Shapes: ``[B, in_channels, image_size, image_size] -> [B, out_features]``;
    ``feature_maps``: ``-> [B, hidden, side, side]`` (``map_shape``).
    """

    def __init__(self, in_channels: int, hidden: int, image_size: int, pool: str, flatten: bool,
                 pooled_blocks: int = 4, pooled_padding: int = 1) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ConfigError(f"backbone.pool must be 'stride' or 'max', got {pool!r}")
        if not 0 <= pooled_blocks <= 4 or pooled_padding not in (0, 1):
            raise ConfigError(f"backbone.pooled_blocks must be 0..4 and pooled_padding 0 or 1, got "
                             f"{pooled_blocks}/{pooled_padding}")
        blocks = []
        channels = in_channels
        # Computed, not measured with a dummy forward pass: that pass would run BatchNorm in train
        # mode and move its running statistics before training starts.
        side = image_size
        for block in range(4):
            downsample = block < pooled_blocks
            stride = 2 if downsample and pool == "stride" else 1
            padding = pooled_padding if downsample else 1
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, stride=stride, padding=padding),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
            ]
            side = (side + 2 * padding - 3) // stride + 1  # 3x3 convolution
            if downsample and pool == "max":
                blocks.append(nn.MaxPool2d(2))
                side //= 2
            channels = hidden
        if side < 1:
            raise ConfigError(f"backbone.image_size={image_size} is too small for this Conv4; use larger images")
        # Two children, run in order by nn.Sequential: the blocks, then the readout. Being a plain
        # Sequential of standard layers is what lets the batched meta-batch run it (vectorized.py).
        self.blocks = nn.Sequential(*blocks)
        self.readout = nn.Flatten() if flatten else SpatialMean()
        self.map_shape = (hidden, side, side)
        self.out_features = hidden * side * side if flatten else hidden

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, *map_shape]``: the last block's maps, before pooling."""
        return self.blocks(x)



class MLP(nn.Sequential):
    """MAML's fully connected networks (Finn et al. 2017): the "non-convolutional" Omniglot network
    (256-128-64-64 with BatchNorm and ReLU) and the sinusoid regressor's features (1-40-40, ReLU,
    no BatchNorm; the algorithm's linear head makes it 1-40-40-1).

    Args:
        in_features: flattened input size (784 for 28x28 Omniglot, 1 for sinusoids).
        hidden: sizes of the hidden layers.
        batch_norm: BatchNorm after every linear layer (the Omniglot network); the sinusoid
            network has none.

    The values are in conf/backbone/mlp.yaml and mlp_sinusoid.yaml, once: only ``batch_norm`` has a
    Python default, the Omniglot network's, which the sinusoid config turns off.

    Shapes: ``[B, C, H, W]`` (or ``[B, in_features]``) ``-> [B, hidden[-1]]``.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...] | list[int], batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for width in hidden:
            layers += [nn.Linear(size, width), nn.BatchNorm1d(width) if batch_norm else nn.Identity(), nn.ReLU()]
            size = width
        self.layers = nn.Sequential(*layers)
        self.out_features = size
        self.map_shape = (size, 1, 1)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [B, out_features, 1, 1]``: the features as 1x1 maps."""
        return self.layers(x)[:, :, None, None]
