"""Old class names of the two networks, kept for one release: each now has one public name (`gmim_hub.GMIMFor*`,
the network with save/load) and one bare-network name in this package."""

from __future__ import annotations

import warnings
from typing import Any

# old name -> (bare network in gmim_hub.models, public class in gmim_hub)
RENAMED = {
    "GMIMModel": ("PretrainingNetwork", "GMIMForPretraining"),
    "GMIMSegmenter": ("SegmentationNetwork", "GMIMForSegmentation"),
}


def renamed_attribute(module: str, name: str, namespace: dict[str, Any]) -> Any:
    """For a module's `__getattr__`: the network an old name stands for, with a DeprecationWarning."""
    new, public = RENAMED.get(name, ("", ""))
    if new not in namespace:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release: use gmim_hub.{public} "
                  f"(the same network with save_pretrained / from_pretrained), or gmim_hub.models.{new} for the "
                  "bare network", DeprecationWarning, stacklevel=3)
    return namespace[new]
