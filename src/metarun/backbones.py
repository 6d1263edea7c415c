"""Feature extractors. Each maps ``[B, C, H, W]`` images to ``[B, out_features]`` features.

Algorithms add their own heads (a linear classifier for the gradient-based family), so a
backbone never knows the number of ways. BatchNorm layers keep running statistics during
meta-training; whether evaluation uses them or the batch statistics is the run option
``eval.bn_batch_stats`` (see ``metarun.loop``), not a property of the backbone.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv4(nn.Module):
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

    Shapes: ``[B, in_channels, image_size, image_size] -> [B, out_features]``.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 pool: str = "stride", flatten: bool = False) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"backbone.pool must be 'stride' or 'max', got {pool!r}")
        blocks = []
        channels = in_channels
        for _ in range(4):
            stride = 2 if pool == "stride" else 1
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, stride=stride, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
            ]
            if pool == "max":
                blocks.append(nn.MaxPool2d(2))
            channels = hidden
        self.blocks = nn.Sequential(*blocks)
        self.flatten = flatten
        # Computed, not measured with a dummy forward pass: that pass would run BatchNorm in train
        # mode and move its running statistics before training starts.
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2 if pool == "stride" else side // 2  # 3x3 stride-2 pad-1 conv | 2x2 pool
        self.out_features = hidden * side * side if flatten else hidden

    def _pool(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(1) if self.flatten else maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.blocks(x))


class MLP(nn.Module):
    """MAML's fully connected networks (Finn et al. 2017): the "non-convolutional" Omniglot network
    (256-128-64-64 with BatchNorm and ReLU) and the sinusoid regressor's features (1-40-40, ReLU,
    no BatchNorm; the algorithm's linear head makes it 1-40-40-1).

    Args:
        in_features: flattened input size (784 for 28x28 Omniglot, 1 for sinusoids).
        hidden: sizes of the hidden layers.
        batch_norm: BatchNorm after every linear layer (the Omniglot network); the sinusoid
            network has none.

    Shapes: ``[B, C, H, W]`` (or ``[B, in_features]``) ``-> [B, hidden[-1]]``.
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] | list[int] = (256, 128, 64, 64),
                 batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for width in hidden:
            layers += [nn.Linear(size, width), nn.BatchNorm1d(width) if batch_norm else nn.Identity(), nn.ReLU()]
            size = width
        self.layers = nn.Sequential(*layers)
        self.out_features = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
