"""The networks (plain `nn.Module`s). The public classes with save_pretrained / from_pretrained,
`GMIMForPretraining` and `GMIMForSegmentation`, are these networks plus the Hub layer (`gmim_hub.hub`)."""

from typing import Any

from gmim_hub.models._renamed import renamed_attribute
from gmim_hub.models.encoder import MaskedSwinEncoder, swin_kwargs
from gmim_hub.models.heads import ConvUpsampleDecoder, TokenProjector
from gmim_hub.models.merging import PATCH_MERGING, patch_merging_class
from gmim_hub.models.pretraining import PretrainingNetwork, PretrainingOutput
from gmim_hub.models.segmentation import SegmentationNetwork, monai_swin_unetr


def __getattr__(name: str) -> Any:
    return renamed_attribute(__name__, name, globals())  # GMIMModel, GMIMSegmenter: deprecated names


__all__ = [
    "PATCH_MERGING", "ConvUpsampleDecoder", "MaskedSwinEncoder", "PretrainingNetwork", "PretrainingOutput",
    "SegmentationNetwork", "TokenProjector", "monai_swin_unetr", "patch_merging_class", "swin_kwargs",
]
