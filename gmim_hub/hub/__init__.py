"""The Hub layer, above the networks of `gmim_hub.models`: the public model classes (`GMIMForPretraining`,
`GMIMForSegmentation`), save/load/push (`HubMixin`), model cards and the conversion of foreign checkpoints.

Words, as used here: a *saved model* is a folder written by `save_pretrained` (config.json, model.safetensors,
README.md), or a Hub repo holding one; its *weights file* is model.safetensors (`state.py`). A *checkpoint* is only
ever a training run's saved state: ours (`gmim_hub.engine.checkpoint`, for resuming) or a foreign one, such as the
original GMIM code's or MONAI's `model_swinvit.pt`, which `convert.py` turns into a saved model.
"""

from gmim_hub.hub.card import render_model_card
from gmim_hub.hub.convert import LAYOUTS, ConversionReport, convert_checkpoint, remap_state_dict
from gmim_hub.hub.mixin import HubMixin, upload_model_folder
from gmim_hub.hub.pretrained import GMIMForPretraining, GMIMForSegmentation, load_saved_folder
from gmim_hub.hub.resolve import ResolvedFiles, check_repo_id, resolve_model_files

__all__ = [
    "LAYOUTS", "ConversionReport", "GMIMForPretraining", "GMIMForSegmentation", "HubMixin", "ResolvedFiles",
    "check_repo_id", "convert_checkpoint", "load_saved_folder", "remap_state_dict", "render_model_card",
    "resolve_model_files", "upload_model_folder",
]
