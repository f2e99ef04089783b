"""U-Net baseline (segmentation-models-pytorch, ResNet-18 encoder, no pretrained weights)."""

from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import Tensor, nn


class UNet(nn.Module):
    """U-Net with a ResNet-18 encoder trained from scratch; returns ``[logits]``.

    Input height and width must be multiples of 32 px.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.net = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=in_channels, classes=num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]
