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
import torch.nn.functional as F
from torch import nn

from metarun._learn2learn import l2l
from metarun.errors import ConfigError

# learn2learn's ResNet-12 (MetaOptNet's code): ResNet12 below takes its blocks' layers and DropBlock from it.
l2l_resnet12 = l2l.vision.models.resnet12


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

    The values of the paper networks are in conf/backbone/ (conv4, conv4_maxpool, conv4_84, conv4_relation), once:
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


class ResidualBlock(l2l_resnet12.BasicBlock):
    """One block of ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): three 3x3 conv -> BatchNorm ->
    LeakyReLU(0.1) layers (no ReLU after the third BatchNorm), a 1x1 conv -> BatchNorm shortcut added
    before the last LeakyReLU, then 2x2 max-pooling; optionally dropout (``drop_block=False``) or
    DropBlock (Ghiasi et al. 2018) on its output in training mode.

    learn2learn's ``BasicBlock`` (``learn2learn.vision.models.resnet12``, MetaOptNet's code) builds the
    layers, under its names (``conv1``, ``bn1``, ..., ``downsample``, ``DropBlock``), so its and MetaOptNet's
    state dicts load into this one. Only ``forward`` is metarun's: learn2learn's raises DropBlock's rate
    along MetaOptNet's linear schedule, keyed to a plain Python counter of forward calls (every call, in
    evaluation too) that no checkpoint saves and that learn2learn's ``clone()`` copies, so under MAML the
    meta-model's counter never moves and DropBlock would stay almost off. Here the rate is constant, the
    schedule's final value (``keep = 1 - drop_rate``), and nothing mutates in a forward pass.
    learn2learn's DropBlock draws its mask on the CPU and indexes it with ``nonzero()``: with
    ``drop_rate > 0`` a training pass on a GPU waits for the host in blocks 3 and 4.

    Args:
        in_channels: channels in.
        channels: channels out (this block's width).
        drop_rate: dropout / DropBlock rate (0: none).
        drop_block: DropBlock (square blocks of ``block_size``) instead of plain dropout.
        block_size: DropBlock's block side.

    Shapes: ``[B, in_channels, H, W] -> [B, channels, H // 2, W // 2]``.
    """

    def __init__(self, in_channels: int, channels: int, drop_rate: float, drop_block: bool, block_size: int) -> None:
        shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels))
        super().__init__(in_channels, channels, stride=2, downsample=shortcut, drop_rate=drop_rate,
                         drop_block=drop_block, block_size=block_size)
        del self.num_batches_tracked  # learn2learn's schedule counter (see above); unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if self.drop_rate > 0 and self.training:
            if self.drop_block:
                side = out.shape[-1]
                # Ghiasi et al. (2018), Eq. 1, as learn2learn/MetaOptNet compute it: the rate of block
                # centres that drops a fraction drop_rate of the units.
                gamma = self.drop_rate / self.block_size**2 * side**2 / (side - self.block_size + 1) ** 2
                out = self.DropBlock(out, gamma=gamma)
            else:
                out = F.dropout(out, p=self.drop_rate, training=True)
        return out


class ResNet12(nn.Sequential):
    """ResNet-12 of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019): 4 residual blocks
    (:class:`ResidualBlock`: three 3x3 conv-BN-LeakyReLU(0.1) layers, a 1x1 conv-BN shortcut, 2x2
    max-pool), widths 64-160-320-640 (MetaOptNet; TADAM's are 64-128-256-512). With ``drop_rate > 0``,
    as in MetaOptNet's code, the first two blocks drop units and the last two drop blocks (DropBlock,
    Ghiasi et al. 2018), in training mode only.

    What comes from learn2learn (``learn2learn.vision.models.ResNet12``, MetaOptNet's code): each block's
    layers (its ``BasicBlock``), DropBlock's mask (its ``DropBlock``) and the initialisation (its
    ``ResNet12Backbone``'s, repeated below: Kaiming-normal fan-out convolutions). What is metarun's, because
    learn2learn's model cannot do it: any widths (it has only the two lists above, ``wider``), the input
    size (its readout is a fixed 5x5 average pool, which fits 84x84 images only; here the spatial mean or
    the flattened maps of any size, with the size computed), the block's forward (a constant DropBlock
    rate, see :class:`ResidualBlock`), and DropBlock's block clipped to the maps it drops in (MetaOptNet's
    5 would not fit the 3x3 and 1x1 maps of 28x28 images).

    The residual branch makes this more than a chain of layers, so the batched meta-batch
    (:mod:`metarun.algorithms.vectorized`) does not run it: ``vectorize=auto`` takes the per-task path.

    Args:
        in_channels: image channels.
        widths: the 4 blocks' widths.
        image_size: input height and width, used to size the output.
        flatten: features are the flattened last maps (MetaOptNet: 640 x 5 x 5 = 16000 at 84x84) instead
            of their spatial mean (TADAM's global average pool; learn2learn's default).
        drop_rate: dropout / DropBlock rate; 0 turns both off (MetaOptNet: 0.1).
        dropblock_size: DropBlock's block side (MetaOptNet: 5 on mini-ImageNet, 2 on CIFAR-FS / FC100).

    The values are in conf/backbone/resnet12.yaml, once.

    Shapes: ``[B, in_channels, image_size, image_size] -> [B, out_features]``;
    ``feature_maps``: ``-> [B, widths[-1], side, side]`` (``map_shape``), ``side = image_size // 16``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] | list[int], image_size: int, flatten: bool,
                 drop_rate: float, dropblock_size: int) -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError(f"backbone.widths must be 4 positive widths, got {widths}")
        if not 0 <= drop_rate < 1 or dropblock_size < 1:
            raise ConfigError(f"backbone.drop_rate must be in [0, 1) and dropblock_size >= 1, got "
                              f"{drop_rate}/{dropblock_size}")
        blocks = []
        channels, side = in_channels, image_size
        for index, width in enumerate(widths):
            side //= 2  # size-preserving 3x3 convolutions, then a 2x2 max-pool (computed, not measured: see Conv4)
            if side < 1:
                raise ConfigError(f"backbone.image_size={image_size} is too small for ResNet-12 (4 halvings); "
                                  f"use images of at least 16x16")
            blocks.append(ResidualBlock(channels, width, drop_rate, drop_block=index >= 2,
                                        block_size=min(dropblock_size, side)))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.readout = nn.Flatten() if flatten else SpatialMean()
        self.map_shape = (channels, side, side)
        self.out_features = channels * side * side if flatten else channels
        for module in self.modules():  # learn2learn's ResNet12Backbone initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, *map_shape]``: the last block's maps."""
        return self.blocks(x)
