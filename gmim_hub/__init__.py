"""gmim-hub: GMIM self-supervised pre-training for Swin UNETR, with a Hugging Face style API."""

import logging
import warnings
from typing import TYPE_CHECKING, Any

from gmim_hub.config import PRESETS, DataConfig, GMIMConfig, LossConfig, MaskingConfig, get_preset
from gmim_hub.errors import ConfigError, GMIMError, InputError, ServingError, WeightsError

if TYPE_CHECKING:
    from gmim_hub.hub.pretrained import GMIMForPretraining, GMIMForSegmentation

from gmim_hub._version import __version__

# With pydicom installed (DICOM inputs), every MONAI LoadImage builds MONAI's GPU DICOM reader, which says twice (a
# log line and a UserWarning) that nvImageCodec is missing, on every `gmim predict`, although gmim never uses that
# reader (gmim_hub.inference.formats reads DICOM): silenced, narrowly.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)

# Imported on first use, so that `import gmim_hub` (and `gmim --help`) does not pay for torch and MONAI.
_LAZY = {"GMIMForPretraining": "gmim_hub.hub.pretrained", "GMIMForSegmentation": "gmim_hub.hub.pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gmim_hub' has no attribute {name!r}")


__all__ = [
    "PRESETS", "ConfigError", "DataConfig", "GMIMConfig", "GMIMError", "GMIMForPretraining", "GMIMForSegmentation",
    "InputError", "LossConfig", "MaskingConfig", "ServingError", "WeightsError", "get_preset", "__version__",
]
