"""GMIM segmentation network: MONAI's Swin UNETR, built from a `GMIMConfig`. `gmim_hub.GMIMForSegmentation` is this
network with save_pretrained / from_pretrained."""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import InputError
from gmim_hub.models._renamed import renamed_attribute
from gmim_hub.models.encoder import swin_kwargs


def monai_swin_unetr(cfg: GMIMConfig) -> SwinUNETR:
    """A plain MONAI `SwinUNETR` with the architecture of `cfg`: the reference our state dicts must load into."""
    return SwinUNETR(out_channels=cfg.out_channels, norm_name=cfg.norm_name, **swin_kwargs(cfg))


class SegmentationNetwork(SwinUNETR):
    """Swin UNETR whose state dict is exactly MONAI's; `forward(image) -> logits` (B, out_channels, D, H, W)."""

    def __init__(self, config: GMIMConfig) -> None:
        super().__init__(out_channels=config.out_channels, norm_name=config.norm_name, **swin_kwargs(config))
        self.config = config

    def forward(self, x_in: Tensor) -> Tensor:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            c = self.config
            if x_in.ndim != 5 or x_in.shape[1] != c.in_channels:
                raise InputError(
                    f"expected input (B, {c.in_channels}, D, H, W), got {tuple(x_in.shape)}; "
                    f"the model takes {c.in_channels} channel(s) {list(c.data.channel_names) or ''}".rstrip()
                )
            bad = [int(s) for s in x_in.shape[2:] if int(s) % 32]
            if bad:
                raise InputError(
                    f"spatial size {tuple(x_in.shape[2:])} must be divisible by 32; pad or crop to a multiple of 32 "
                    f"(or use sliding-window prediction with roi {c.roi_size})"
                )
        return super().forward(x_in)


def __getattr__(name: str) -> type:
    return renamed_attribute(__name__, name, globals())  # GMIMSegmenter: the old name of SegmentationNetwork
