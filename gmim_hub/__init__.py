"""gmim-hub: GMIM self-supervised pre-training for Swin UNETR, with a Hugging Face style API."""

from gmim_hub.config import PRESETS, DataConfig, GMIMConfig, LossConfig, MaskingConfig, get_preset
from gmim_hub.errors import ConfigError, GMIMError, InputError, ServingError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ConfigError", "DataConfig", "GMIMConfig", "GMIMError", "InputError", "LossConfig",
    "MaskingConfig", "ServingError", "WeightsError", "get_preset", "__version__",
]
