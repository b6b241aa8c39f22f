"""Hugging Face Hub integration: save/load/push (`HubMixin`), model cards and foreign-checkpoint conversion.

The public model classes that use it live in `gmim_hub.models.hub_models` (re-exported as `gmim_hub.GMIMFor*`).
"""

from gmim_hub.hub.card import render_model_card
from gmim_hub.hub.convert import LAYOUTS, ConversionReport, convert_checkpoint, remap_state_dict
from gmim_hub.hub.mixin import HubMixin, upload_model_folder
from gmim_hub.hub.resolve import ResolvedFiles, check_repo_id, resolve_model_files

__all__ = [
    "LAYOUTS", "ConversionReport", "HubMixin", "ResolvedFiles", "check_repo_id", "convert_checkpoint",
    "remap_state_dict", "render_model_card", "resolve_model_files", "upload_model_folder",
]
