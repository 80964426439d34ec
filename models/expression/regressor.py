"""The opening regressor: eye and mouth patches in, the face's four openings out.

One small convolutional network reads an eye patch (both eyes through the same weights: the
image-right eye arrives mirrored), a second one the mouth patch; each ends in global average
pooling and a linear layer. Trained on dlib's landmarks of the training clips
(``models.expression.train``), it is (1) what the sender measures and sends beside the keypoints,
and (2) a frozen, differentiable judge of a rendered patch's opening for training a renderer.
Outputs are openings in ``openings.CHANNELS`` order, in the labels' units (over the inter-ocular
distance), normalised internally by the training labels' mean and spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from models.expression.openings import CHANNELS


@dataclass
class OpeningConfig:
    width: int = 16  # channels of the first conv; doubled at each stride-2 stage
    stages: int = 3  # stride-2 stages after the first conv
    # label statistics (set by training): outputs are mean + std * network output
    mean: list[float] = field(default_factory=lambda: [0.0] * len(CHANNELS))
    std: list[float] = field(default_factory=lambda: [1.0] * len(CHANNELS))

    def to_dict(self) -> dict:
        return asdict(self)


def _branch(width: int, stages: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    c = width
    for _ in range(stages):
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True)]
        c *= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, outputs)]
    return nn.Sequential(*layers)


class OpeningNet(nn.Module):
    def __init__(self, config: OpeningConfig | None = None) -> None:
        super().__init__()
        self.config = config or OpeningConfig()
        self.eye = _branch(self.config.width, self.config.stages, 1)
        self.mouth = _branch(self.config.width, self.config.stages, 2)
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32))

    def normalised(self, eyes: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        """eyes (B, 2, 3, 32, 32), mouth (B, 3, 32, 48), floats in [0, 1] -> (B, 4) standardised openings."""
        b = eyes.shape[0]
        e = self.eye(eyes.flatten(0, 1) * 2 - 1).view(b, 2)
        m = self.mouth(mouth * 2 - 1)
        return torch.cat([e, m], 1)

    def forward(self, eyes: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        """(B, 4) openings in label units (``CHANNELS`` order)."""
        return self.mean + self.std * self.normalised(eyes, mouth)

    def set_label_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.config.mean, self.config.std = mean.tolist(), std.tolist()
