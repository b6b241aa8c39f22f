"""Model definitions. The Hub-enabled public classes `GMIMForPretraining` / `GMIMForSegmentation` live in
`gmim_hub.models.hub_models`."""

from gmim_hub.models.encoder import MaskedSwinEncoder, swin_kwargs
from gmim_hub.models.heads import ConvUpsampleDecoder, TokenProjector
from gmim_hub.models.merging import PATCH_MERGING, patch_merging_class
from gmim_hub.models.pretraining import GMIMModel, PretrainingOutput
from gmim_hub.models.segmentation import GMIMSegmenter, monai_swin_unetr

__all__ = [
    "PATCH_MERGING", "ConvUpsampleDecoder", "GMIMModel", "GMIMSegmenter", "MaskedSwinEncoder", "PretrainingOutput",
    "TokenProjector", "monai_swin_unetr", "patch_merging_class", "swin_kwargs",
]
