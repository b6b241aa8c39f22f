"""Old import path of `GMIMForPretraining`, `GMIMForSegmentation` and `load_saved_folder`, kept for one release:
they live in the Hub layer, `gmim_hub.hub.pretrained`, which builds on these networks. Import them from `gmim_hub`
(or `gmim_hub.hub`)."""

from gmim_hub.hub.pretrained import GMIMForPretraining, GMIMForSegmentation, load_saved_folder

__all__ = ["GMIMForPretraining", "GMIMForSegmentation", "load_saved_folder"]
