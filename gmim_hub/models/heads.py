"""Pre-training heads: the token projectors of the cross-correlation loss and the reconstruction decoder."""

from __future__ import annotations

from torch import Tensor, nn


class TokenProjector(nn.Module):
    """Linear projection of every deepest-stage token: (B, E, d, h, w) -> (B, d*h*w, P), raster order."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, E)
        return self.linear(tokens)


class ConvUpsampleDecoder(nn.Module):
    """The original "vae" head: five [Conv3x3 + InstanceNorm + LeakyReLU + trilinear x2] blocks, then Conv1x1.

    Widths halve from the encoder width (16F) down to F, as in the original for F=48 (768->384->192->96->48->48).
    It reads only the deepest features; (B, 16F, D/32, ...) -> (B, C_in, D, H, W).
    """

    def __init__(self, in_dim: int, feature_size: int, out_channels: int) -> None:
        super().__init__()
        widths = [in_dim, in_dim // 2, in_dim // 4, in_dim // 8, feature_size, feature_size]
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [
                nn.Conv3d(c_in, c_out, kernel_size=3, padding=1),
                nn.InstanceNorm3d(c_out),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        blocks.append(nn.Conv3d(feature_size, out_channels, kernel_size=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, features: Tensor) -> Tensor:
        return self.blocks(features)
