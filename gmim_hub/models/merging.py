"""Swin UNETR patch merging, owned here so a model computes the same function under every installed MONAI.

Patch merging halves each spatial side between encoder stages: it concatenates strided slices of the
(B, D, H, W, C) tokens along channels (8C), layer-normalises them and projects to 2C with a bias-free linear layer.
The parameters (`norm.weight`, `norm.bias`, `reduction.weight`) are the same in every variant and keep MONAI's
names, so the weights load into `monai.networks.nets.SwinUNETR` either way. Which slices go where differs, and with
it the function the weights compute:

* ``"legacy"``: MONAI <= 1.4 `PatchMerging` (``downsample="merging"``). Its eight slices have offsets (d, h, w)
  (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1): (0,1,0) and (0,0,1) appear twice and (1,1,0) and
  (0,1,1) never. Every Swin UNETR checkpoint published before 2025 (the original GMIM code, MONAI's
  self-supervised `model_swinvit.pt`, the model-zoo bundles) was trained with it.
* ``"merging"``: MONAI >= 1.5 `PatchMerging`: all eight neighbours, order (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,1,0)
  (1,0,1) (0,1,1) (1,1,1).
* ``"mergingv2"``: MONAI's `PatchMergingV2` (unchanged since it appeared): all eight neighbours in
  `itertools.product` order (0,0,0) (0,0,1) (0,1,0) (0,1,1) (1,0,0) ... (1,1,1).

Odd sides are zero-padded at the end first, as MONAI does. See docs/method.md ("Patch merging").
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MERGING_OFFSETS", "PATCH_MERGING", "PatchMerging3d", "patch_merging_class"]

Offset = tuple[int, int, int]
MERGING_OFFSETS: dict[str, tuple[Offset, ...]] = {
    "legacy": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
    "merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "mergingv2": tuple(itertools.product(range(2), range(2), range(2))),  # type: ignore[arg-type]
}
PATCH_MERGING = tuple(MERGING_OFFSETS)


class PatchMerging3d(nn.Module):
    """(B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C) with the slice offsets of `offsets`.

    Constructed by MONAI's `BasicLayer` as `downsample(dim=..., norm_layer=..., spatial_dims=3)`; subclasses fix
    the offsets (see `patch_merging_class`)."""

    offsets: tuple[Offset, ...] = MERGING_OFFSETS["merging"]
    variant: str = "merging"

    def __init__(self, dim: int, norm_layer: type[nn.LayerNorm] = nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"gmim-hub's patch merging is 3-D only, got spatial_dims={spatial_dims}")
        self.dim = dim
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"patch merging expects (B, D, H, W, C) tokens, got shape {tuple(x.shape)}")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.offsets], -1)
        return self.reduction(self.norm(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, variant={self.variant!r}"


class LegacyPatchMerging(PatchMerging3d):
    offsets, variant = MERGING_OFFSETS["legacy"], "legacy"


class AllNeighboursPatchMerging(PatchMerging3d):
    offsets, variant = MERGING_OFFSETS["merging"], "merging"


class PatchMergingV2(PatchMerging3d):
    offsets, variant = MERGING_OFFSETS["mergingv2"], "mergingv2"


_CLASSES: dict[str, type[PatchMerging3d]] = {
    "legacy": LegacyPatchMerging, "merging": AllNeighboursPatchMerging, "mergingv2": PatchMergingV2,
}


def patch_merging_class(name: str) -> type[PatchMerging3d]:
    """The module class for a `GMIMConfig.patch_merging` value, to pass as MONAI's `downsample=`."""
    if name not in _CLASSES:
        raise ValueError(f"patch_merging must be one of {', '.join(map(repr, PATCH_MERGING))}, got {name!r}")
    return _CLASSES[name]
