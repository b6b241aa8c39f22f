"""The public models: `GMIMForPretraining` and `GMIMForSegmentation` (re-exported as `gmim_hub.GMIMFor*`).

Each is one network of `gmim_hub.models` (`PretrainingNetwork`, `SegmentationNetwork`) plus `HubMixin`
(save_pretrained / from_pretrained / push_to_hub). `GMIMForSegmentation.from_pretrained_encoder` starts a segmenter
from the encoder of a saved pre-training model, the hand-over between GMIM pre-training and fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, WeightsError
from gmim_hub.hub.mixin import HubMixin, _device, _read_config
from gmim_hub.hub.resolve import WEIGHTS_NAME, resolve_model_files
from gmim_hub.hub.state import compare_state, read_kind, read_weights
from gmim_hub.models.pretraining import PretrainingNetwork
from gmim_hub.models.segmentation import SegmentationNetwork

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "swinViT."
# Config fields that fix the encoder's tensor shapes: they must agree between pre-training and fine-tuning.
ENCODER_FIELDS = ("in_channels", "feature_size", "depths", "num_heads", "window_size", "patch_size", "use_v2")


class GMIMForPretraining(HubMixin, PretrainingNetwork):
    """GMIM pre-training network (online encoder, target branch, projectors, decoder) with the Hub API."""

    model_kind = "pretraining"


class GMIMForSegmentation(HubMixin, SegmentationNetwork):
    """Swin UNETR segmenter (MONAI's state dict) with the Hub API."""

    model_kind = "segmentation"
    base_model_revision: str | None = None

    @classmethod
    def from_pretrained_encoder(
        cls,
        source: str | Path,
        *,
        config: GMIMConfig | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        device: str | torch.device = "cpu",
    ) -> GMIMForSegmentation:
        """A segmenter whose encoder (`swinViT.*`) comes from a saved GMIM model (folder or Hub repo), strictly:
        every encoder tensor must be present with the right shape, else a `WeightsError` lists the keys.

        config: the segmenter's config (out_channels, label names, ...); None = the source's config. Its encoder
        fields must equal the source's. The rest of the network (encoder1..4, decoders, out) keeps its fresh
        initialisation. Returned in **train mode**, since it is meant for fine-tuning; `base_model` and
        `base_model_revision` record the source for the model card."""
        files = resolve_model_files(source, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token, force_download=force_download)
        cfg = _segmenter_config(_read_config(files.config_path), config, files.source)
        tensors, _ = read_weights(files.weights_path)
        model = cls(cfg)
        loaded, total = _load_encoder(model, tensors, f"{files.source} ({WEIGHTS_NAME})")
        model.base_model = files.source if files.from_hub else str(Path(files.source).resolve())
        model.base_model_revision = files.revision
        model.to(_device(device))
        model.train()
        logger.info("loaded %d of %d tensors (the swinViT encoder) from %s", loaded, total, files.source)
        return model


def load_saved_folder(folder: str | Path) -> GMIMForPretraining | GMIMForSegmentation:
    """Load a folder written by save_pretrained with the class its weights were saved from (strictly)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise WeightsError(f"no folder at {folder}; pass a folder written by save_pretrained or gmim convert")
    files = resolve_model_files(path)
    kind = read_kind(files.weights_path)
    if kind is None:
        raise WeightsError(f"cannot tell whether {files.weights_path} is a pre-training or a segmentation model; "
                           "re-save it with save_pretrained")
    cls = GMIMForPretraining if kind == "pretraining" else GMIMForSegmentation
    return cls.from_pretrained(path)


def _segmenter_config(source_cfg: GMIMConfig, given: GMIMConfig | None, source: str) -> GMIMConfig:
    if given is None:
        return source_cfg
    differ = [f"{f} {getattr(given, f)!r} vs {getattr(source_cfg, f)!r}" for f in ENCODER_FIELDS
              if getattr(given, f) != getattr(source_cfg, f)]
    if differ:
        raise ConfigError(f"config does not fit the encoder of {source}: {', '.join(differ)} (given vs source); "
                          "start from the source config, e.g. dataclasses.replace(source_config, out_channels=...)")
    if given.patch_merging != source_cfg.patch_merging:  # a property of the weights: they compute nothing else
        logger.warning("patch_merging %r of %s replaces the config's %r: the encoder was trained with it",
                       source_cfg.patch_merging, source, given.patch_merging)
    return dataclasses.replace(given, patch_merging=source_cfg.patch_merging)


def _load_encoder(model: GMIMForSegmentation, tensors: dict[str, Tensor], where: str) -> tuple[int, int]:
    """Copy every `swinViT.*` tensor; returns (tensors loaded, tensors in the segmenter's state dict)."""
    state = model.state_dict()
    expected = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    found = {k: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    if not found:
        raise WeightsError(f"{where} holds no {ENCODER_PREFIX}* tensors, so it has no encoder to start from; "
                           "convert foreign checkpoints with `gmim convert` first")
    diff = compare_state(expected, found)
    if diff:
        raise WeightsError(f"{where}: its encoder does not fit the segmenter: {diff.describe()}. Check that the "
                           "source is a GMIM model with the same architecture")
    with torch.no_grad():
        model.load_state_dict(found, strict=False)
    return len(found), len(state)
