"""DNLNet = ResNetV1c-D8 backbone + DNLHead (stage 4) + FCN auxiliary head (stage 3), as mmseg's
EncoderDecoder with the dnlnet configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.learning.losses import cross_entropy
from components.learning.models.dnl import DNLHead
from components.learning.models.fcn import FCNHead
from components.learning.models.resnet import ResNetV1c


def resize_logits(logits: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize in fp32 (logits may be bf16 under autocast)."""
    logits = logits.float()
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


class DNLNet(nn.Module):
    def __init__(self, backbone: ResNetV1c, decode_head: DNLHead, auxiliary_head: FCNHead | None,
                 align_corners: bool = False, avg_non_ignore: bool = False, aux_weight: float = 0.4,
                 ignore_index: int = 255):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.align_corners = align_corners
        self.avg_non_ignore = avg_non_ignore
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    @property
    def num_classes(self) -> int:
        return self.decode_head.conv_seg.out_channels

    def extract_feat(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(img)

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Decode-head logits N×C×H×W (fp32) resized to the input's H×W."""
        feats = self.extract_feat(img)
        logits = self.decode_head(feats[3])
        return resize_logits(logits, tuple(img.shape[2:]), self.align_corners)

    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = resize_logits(logits, tuple(label.shape[1:]), self.align_corners)
        return cross_entropy(logits, label, self.ignore_index, self.avg_non_ignore)

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for a batch: img N×3×H×W normalized, label N×H×W long (255 = ignore)."""
        feats = self.extract_feat(img)
        decode_loss = self._loss(self.decode_head(feats[3]), label)
        if self.auxiliary_head is None:
            zero = torch.zeros_like(decode_loss)
            return {"loss": decode_loss, "decode_loss": decode_loss, "aux_loss": zero}
        aux_loss = self._loss(self.auxiliary_head(feats[2]), label)
        return {"loss": decode_loss + self.aux_weight * aux_loss, "decode_loss": decode_loss,
                "aux_loss": aux_loss}

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None):
        """`model(img, label)` -> loss dict; `model(img)` -> logits. Going through forward() is what
        DistributedDataParallel needs to synchronise gradients."""
        if label is not None:
            return self.forward_train(img, label)
        return self.encode_decode(img)
