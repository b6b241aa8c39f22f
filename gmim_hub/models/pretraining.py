"""GMIM pre-training network: masked online branch, stop-gradient target branch, projectors and decoder
(docs/method.md). `gmim_hub.GMIMForPretraining` is this network with save_pretrained / from_pretrained."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmim_hub.config import GMIMConfig
from gmim_hub.models._renamed import renamed_attribute
from gmim_hub.models.encoder import MaskedSwinEncoder
from gmim_hub.models.heads import ConvUpsampleDecoder, TokenProjector


@dataclass
class PretrainingOutput:
    """z_x, z_y: (B, N, P) projected deepest tokens of the online / target view; reconstruction: (B, C, D, H, W)."""

    z_x: Tensor
    z_y: Tensor
    reconstruction: Tensor


class PretrainingNetwork(nn.Module):
    """Siamese GMIM network. One set of encoder weights (`swinViT.*`, MONAI's names): the online branch sees the
    masked view x, the target branch sees the intensity-augmented view y through the same weights without gradient
    (the paper). With `target_momentum > 0` the target is instead an EMA copy (`target_swinViT.*`) that the training
    engine updates with `update_target()` after each optimizer step."""

    def __init__(self, config: GMIMConfig) -> None:
        super().__init__()
        self.config = config
        self.swinViT = MaskedSwinEncoder(config)
        self.target_swinViT: MaskedSwinEncoder | None = None
        if config.target_momentum > 0:
            self.target_swinViT = copy.deepcopy(self.swinViT).requires_grad_(False)
        self.projector_x = TokenProjector(config.encoder_dim, config.projector_dim)
        self.projector_y = TokenProjector(config.encoder_dim, config.projector_dim)
        self.decoder = ConvUpsampleDecoder(config.encoder_dim, config.feature_size, config.in_channels)

    def forward(self, x: Tensor, y: Tensor, masks: Sequence[Tensor | None] | None = None) -> PretrainingOutput:
        """x, y: (B, C, *roi) online and target views; masks: bool token masks per insertion point (True = masked),
        from `gmim_hub.masking.sample_stage_masks`."""
        f_x = self.swinViT(x, masks)[4]
        target = self.target_swinViT if self.target_swinViT is not None else self.swinViT
        with torch.no_grad():
            f_y = target(y)[4]
        return PretrainingOutput(
            z_x=self.projector_x(f_x),
            z_y=self.projector_y(f_y),  # its own, trainable head (as the original), fed a stop-grad feature
            reconstruction=self.decoder(f_x),
        )

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA step of the target encoder: t <- m t + (1 - m) online. A no-op for momentum 0 (shared weights)."""
        if self.target_swinViT is None:
            return
        m = self.config.target_momentum
        for t, o in zip(self.target_swinViT.parameters(), self.swinViT.parameters(), strict=True):
            t.mul_(m).add_(o.detach(), alpha=1 - m)


def __getattr__(name: str) -> type:
    return renamed_attribute(__name__, name, globals())  # GMIMModel: the old name of PretrainingNetwork
