"""The Swin UNETR encoder ("SwinViT") with GMIM's hierarchical mask insertion points.

Parameter names are exactly MONAI's `SwinUNETR.swinViT.*`, so weights move into a plain
`monai.networks.nets.SwinUNETR` with `strict=True`. With no masks the forward pass is MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.models.merging import patch_merging_class

# Insertion points (docs/method.md, "Architecture"): patch-embedding output (before and after pos_drop, both 1/2
# resolution), the input of the stage-2 blocks (1/4) and the input of the stage-3 blocks (1/8). Stage 4 is never masked.
NUM_MASK_POINTS = 4


def swin_kwargs(cfg: GMIMConfig) -> dict:
    """Keyword arguments shared by MONAI's `SwinUNETR` and this encoder, derived from one config."""
    return {
        "in_channels": cfg.in_channels,
        "feature_size": cfg.feature_size,
        "patch_size": cfg.patch_size,
        "depths": tuple(cfg.depths),
        "num_heads": tuple(cfg.num_heads),
        "window_size": cfg.window_size,
        "drop_rate": cfg.drop_rate,
        "attn_drop_rate": cfg.attn_drop_rate,
        "dropout_path_rate": cfg.dropout_path_rate,
        "use_checkpoint": cfg.use_checkpoint,
        "use_v2": cfg.use_v2,
        # our own module class, not MONAI's string: MONAI 1.5 changed what "merging" computes (models/merging.py)
        "downsample": patch_merging_class(cfg.patch_merging),
    }


class MaskedSwinEncoder(SwinTransformer):
    """MONAI `SwinTransformer` whose forward optionally zeroes masked tokens at the GMIM insertion points."""

    def __init__(self, cfg: GMIMConfig) -> None:
        kw = swin_kwargs(cfg)
        super().__init__(
            in_chans=kw["in_channels"],
            embed_dim=kw["feature_size"],
            window_size=ensure_tuple_rep(kw["window_size"], 3),
            patch_size=ensure_tuple_rep(kw["patch_size"], 3),
            depths=kw["depths"],
            num_heads=kw["num_heads"],
            drop_rate=kw["drop_rate"],
            attn_drop_rate=kw["attn_drop_rate"],
            drop_path_rate=kw["dropout_path_rate"],
            use_checkpoint=kw["use_checkpoint"],
            spatial_dims=3,
            downsample=kw["downsample"],
            use_v2=kw["use_v2"],
        )

    def forward(  # type: ignore[override]
        self, x: Tensor, masks: Sequence[Tensor | None] | None = None, normalize: bool = True
    ) -> list[Tensor]:
        """x: (B, C, D, H, W). masks: up to four bool tensors (B, d, h, w), True = masked, or None entries, at
        the insertion points (NUM_MASK_POINTS). Returns the five hidden states (B, F*2^i, D/2^(i+1), ...), layer-normed
        over channels when `normalize` (as MONAI's `proj_out`)."""
        m = list(masks) if masks is not None else []
        if len(m) > NUM_MASK_POINTS:
            raise ValueError(f"at most {NUM_MASK_POINTS} masks are supported, got {len(m)}")
        m += [None] * (NUM_MASK_POINTS - len(m))
        x0 = _apply(self.patch_embed(x), m[0])
        x0 = self.pos_drop(x0)
        x0_out = self.proj_out(x0, normalize)
        x0 = _apply(x0, m[1])
        x1 = self._stage(x0, 1)
        x1_out = self.proj_out(x1, normalize)
        x1 = _apply(x1, m[2])
        x2 = self._stage(x1, 2)
        x2_out = self.proj_out(x2, normalize)
        x2 = _apply(x2, m[3])
        x3 = self._stage(x2, 3)
        x3_out = self.proj_out(x3, normalize)
        x4 = self._stage(x3, 4)
        x4_out = self.proj_out(x4, normalize)
        return [x0_out, x1_out, x2_out, x3_out, x4_out]

    def _stage(self, x: Tensor, k: int) -> Tensor:
        if self.use_v2:
            x = getattr(self, f"layers{k}c")[0](x.contiguous())
        return getattr(self, f"layers{k}")[0](x.contiguous())


def _apply(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the masked tokens of x (B, C, d, h, w) across all channels; out of place, so autograd stays sound."""
    if mask is None:
        return x
    if not torch.jit.is_tracing() and (mask.shape[0] != x.shape[0] or mask.shape[1:] != x.shape[2:]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit features {tuple(x.shape)}; "
            "masks must be (B, d, h, w) at each insertion point (see gmim_hub.masking.token_grids)"
        )
    return x * (~mask).unsqueeze(1).to(x.dtype)
