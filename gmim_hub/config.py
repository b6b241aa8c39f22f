"""Configuration: frozen dataclasses that are the single source of `config.json`.

`GMIMConfig` describes one model family member completely: the Swin UNETR architecture (shared by the pre-training
and the segmentation model, so encoder weights move between them), the pre-training heads, the masking and loss
settings of the GMIM method, and a description of the data the model expects (in the spirit of MONAI bundles'
`network_data_format`), so a saved model can be used on new images without guessing the preprocessing.

Unknown keys are errors, never silently dropped: a typo in a config.json must not train a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gmim_hub.atomic import write_text
from gmim_hub.errors import ConfigError
from gmim_hub.presets import AMOS_ORGANS, RECIPES

__all__ = ["AMOS_ORGANS", "FORMAT_VERSION", "INTENSITY_RANGES", "PRESETS", "DataConfig", "GMIMConfig",
           "IntensityReference", "LossConfig", "MaskingConfig", "PatchMergingName", "get_preset", "masking_reach_problems",
           "upgrade_config_dict"]

# 2: `patch_merging` and the masking entropy estimator recorded. A version-1 config.json has neither; version-1 models
# were trained under MONAI 1.5/1.6 (all eight neighbours in `downsample="merging"`) with distinct-value entropies, so
# they load as patch_merging="merging", entropy_estimator="unique" (`upgrade_config_dict`).
FORMAT_VERSION = 2
_V1_PATCH_MERGING = "merging"
# Where each DataConfig.intensity puts the image, for the histogram cell entropy (GMIMConfig.histogram_range).
INTENSITY_RANGES: dict[str, tuple[float, float]] = {"ct_window": (0.0, 1.0), "minmax": (0.0, 1.0),
                                                    "zscore_nonzero": (-3.0, 3.0)}
PatchMergingName = Literal["legacy", "merging", "mergingv2"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class MaskingConfig:
    """Adaptive (entropy-driven), hierarchical grid masking (`gmim_hub/method.py`, docs/method.md). Defaults are the
    original code's README pre-training run (`--dynamic_masking --basic_mask_ratio 0.5 --scale 0.3 --drop_ratio 0.3
    --hierarchical_masking 0.5`); "original" below names the original's value where ours differs or is a new option.
    Insertion points ("calls") t = 0..3 are the four places inside the encoder where tokens are masked."""

    # Candidate grids (cells per axis); each sample gets the one whose cell entropies vary most. Every grid must
    # divide roi_size. Original: 4, 8, 16 (hard-coded, for ROI 128).
    grids: tuple[int, ...] = (4, 8, 16)
    # Grid score = g^-grid_penalty * std/mean of the grid's cell entropies; the factor favours coarser grids.
    # Original: 0.1 (hard-coded).
    grid_penalty: float = 0.1
    base_ratio: float = 0.5  # r0: the middle of the per-cell ratio range at call 0. Original --basic_mask_ratio 0.5
    # Cell ratios span [r0(1-scale), r0(1+scale)], linear in the cell's entropy rank (0.35..0.65). Original --scale 0.3
    scale: float = 0.3
    dynamic: bool = True  # entropy-ranked ratios; False: every cell gets base_ratio. Original --dynamic_masking (on)
    # h: the ratio at call t is r * h^t (computed as repeated float64 products); 0 switches calls t >= 1 off.
    # Original --hierarchical_masking 0.5 in the README run (its argparse default, 0, switches them off).
    hierarchical_decay: float = 0.5
    extra_mask_prob: float = 0.3  # p: probability that a call t >= 1 masks at all. Original --drop_ratio 0.3
    # True: the original's buffer-reuse bug, the 2nd and 3rd grids' "cells" are scrambled pieces of the 1st grid's
    # (docs/method.md, "Grid choice"). Original: True (the bug); ours: spatial cells.
    legacy_chained_cells: bool = False
    # Cell entropy: "unique" = Shannon entropy of the distinct voxel values (the original; meaningful on native
    # integer grids only: after resampling almost every value is distinct); "histogram" = of `histogram_bins` fixed
    # bins over `histogram_range` (values outside go to the end bins). None = the range the data's intensity
    # normalisation produces (GMIMConfig.histogram_range). docs/method.md, "Cell entropy".
    entropy_estimator: Literal["unique", "histogram"] = "histogram"  # measured: benchmarks/entropy_estimators.py
    histogram_bins: int = 64  # bins of the "histogram" estimator (no original: it used "unique")
    histogram_range: tuple[float, float] | None = None  # (low, high) of those bins; None: from data.intensity
    entropy_decimals: int | None = None  # round entropies before ranking; None = exact, as the original
    count_rounding: Literal["floor", "round"] = "floor"  # masked tokens per cell, T*r floored (original) or rounded
    per_sample_draws: bool = True  # whether call t >= 1 masks: drawn per sample; False: once per batch (original)
    loss_mask: Literal["first", "union"] = "first"  # voxels supervised: masked at t=0 only (original) or any call
    # "adaptive" = GMIM (entropy-driven grid and ratios); "uniform" = the SimMIM-style baseline of the ablation:
    # every insertion point masks tokens uniformly at random over the whole token grid at `uniform_ratio` (None =
    # base_ratio, the mean of the adaptive ratio range), independent of the image. docs/method.md, "Uniform masking".
    strategy: Literal["adaptive", "uniform"] = "adaptive"
    uniform_ratio: float | None = None

    @property
    def mean_uniform_ratio(self) -> float:
        """The ratio every token gets at insertion point 0 under strategy="uniform"."""
        return self.base_ratio if self.uniform_ratio is None else self.uniform_ratio

    def __post_init__(self) -> None:
        _check(self.strategy in ("adaptive", "uniform"),
               f"masking.strategy must be 'adaptive' or 'uniform', got {self.strategy!r}")
        _check(self.uniform_ratio is None or 0.0 < self.uniform_ratio < 1.0,
               f"masking.uniform_ratio must be None or in (0, 1), got {self.uniform_ratio!r}")
        _check(len(self.grids) > 0 and all(isinstance(g, int) and g >= 1 for g in self.grids),
               f"masking.grids must be a non-empty tuple of positive ints, got {self.grids!r}")
        _check(0.0 < self.base_ratio < 1.0, f"masking.base_ratio must be in (0, 1), got {self.base_ratio!r}")
        _check(0.0 <= self.scale < 1.0, f"masking.scale must be in [0, 1), got {self.scale!r}")
        _check(self.base_ratio * (1 + self.scale) <= 1.0,
               f"masking.base_ratio*(1+scale) must be <= 1, got {self.base_ratio}*(1+{self.scale})")
        _check(0.0 <= self.hierarchical_decay <= 1.0,
               f"masking.hierarchical_decay must be in [0, 1], got {self.hierarchical_decay!r}")
        _check(0.0 <= self.extra_mask_prob <= 1.0,
               f"masking.extra_mask_prob must be in [0, 1], got {self.extra_mask_prob!r}")
        _check(self.grid_penalty >= 0.0, f"masking.grid_penalty must be >= 0, got {self.grid_penalty!r}")
        _check(self.entropy_decimals is None or 0 <= self.entropy_decimals <= 15,
               f"masking.entropy_decimals must be None or in [0, 15], got {self.entropy_decimals!r}")
        _check(self.entropy_estimator in ("unique", "histogram"),
               f"masking.entropy_estimator must be 'unique' or 'histogram', got {self.entropy_estimator!r}")
        _check(isinstance(self.histogram_bins, int) and 2 <= self.histogram_bins <= 65536,
               f"masking.histogram_bins must be an int in [2, 65536], got {self.histogram_bins!r}")
        _check(self.histogram_range is None or (len(self.histogram_range) == 2
                                                and self.histogram_range[0] < self.histogram_range[1]),
               f"masking.histogram_range must be None or (low, high) with low < high, got {self.histogram_range!r}")
        _check(self.count_rounding in ("floor", "round"),
               f"masking.count_rounding must be 'floor' or 'round', got {self.count_rounding!r}")
        _check(self.loss_mask in ("first", "union"),
               f"masking.loss_mask must be 'first' or 'union', got {self.loss_mask!r}")


@dataclass(frozen=True)
class LossConfig:
    """GMIM objective: alpha_cc * cross-correlation + alpha_rec * masked reconstruction (docs/method.md)."""

    alpha_cc: float = 0.005  # weight of the cross-correlation loss. Original --alpha1 0.005
    alpha_rec: float = 1.0  # weight of the masked reconstruction loss. Original --alpha2 1
    lambd: float = 0.005  # weight of the off-diagonal terms of the cross-correlation. Original --lambd 0.005
    standardize: bool = False  # standardise features over tokens before correlating (Barlow Twins); original: off
    # The reconstruction's squared error on masked voxels divided by all voxels (original: MSE on zeroed tensors)
    # or by the masked voxels only.
    rec_normalize: Literal["all_voxels", "masked_voxels"] = "all_voxels"

    def __post_init__(self) -> None:
        for name in ("alpha_cc", "alpha_rec", "lambd"):
            v = getattr(self, name)
            _check(v >= 0.0, f"loss.{name} must be >= 0, got {v!r}")
        _check(self.rec_normalize in ("all_voxels", "masked_voxels"),
               f"loss.rec_normalize must be 'all_voxels' or 'masked_voxels', got {self.rec_normalize!r}")


@dataclass(frozen=True)
class IntensityReference:
    """What the training images looked like, recorded by `gmim train`, so that prediction can say when an input does
    not look like them (a CT sent to an MRI model). Over every voxel as stored: the fraction that is negative (CT air
    is; MRI magnitudes are not), the fraction that is non-zero (the foreground) and the 1st/50th/99th percentiles;
    over the foreground after the `intensity` normalisation (what the network sees): percentiles, mean and std."""

    volumes: int = 0  # how many training volumes were measured
    negative_fraction: float = 0.0  # of all stored voxels, the fraction below 0
    foreground_fraction: float = 0.0  # of all stored voxels, the fraction that is not 0
    raw_percentiles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # 1st/50th/99th of all stored voxels
    percentiles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # 1st/50th/99th of the normalised foreground
    mean: float = 0.0  # of the normalised foreground
    std: float = 0.0  # of the normalised foreground


@dataclass(frozen=True)
class DataConfig:
    """What the model expects as input, so that preprocessing travels with the weights (the original hard-coded it
    per script; the presets in `gmim_hub/presets.py` record each recipe's)."""

    modality: Literal["CT", "MRI"] = "MRI"  # the kind of scanner the training images came from
    channel_names: tuple[str, ...] = ()  # empty = unnamed; else one name per input channel
    # How voxel values are normalised: "ct_window" clips ct_window and maps it to [0, 1] (the original's CT
    # pre-training), "zscore_nonzero" per channel over non-zero voxels (the original's MRI), "minmax" to [0, 1].
    intensity: Literal["ct_window", "zscore_nonzero", "minmax"] = "zscore_nonzero"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU window for "ct_window". Original --a_min/--a_max
    # Voxel size in mm the images are resampled to, from each file's affine; None keeps the native grid. Original
    # pre-training default --space_x/y/z 2, 2, 1.5 (docs/method.md, deviation 10).
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    orientation: str = "RAS"  # axis code the images are reoriented to, from each file's affine
    label_names: tuple[str, ...] = ()  # empty = unnamed; else one name per output channel
    multi_label: bool = False  # True: sigmoid, overlapping labels (BraTS); False: softmax, argmax
    reference: IntensityReference | None = None  # the training data's intensities (gmim train); None: not recorded

    def __post_init__(self) -> None:
        _check(self.modality in ("CT", "MRI"), f"data.modality must be 'CT' or 'MRI', got {self.modality!r}")
        _check(self.intensity in ("ct_window", "zscore_nonzero", "minmax"),
               f"data.intensity must be 'ct_window', 'zscore_nonzero' or 'minmax', got {self.intensity!r}")
        _check(len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1],
               f"data.ct_window must be (low, high) with low < high, got {self.ct_window!r}")
        _check(self.spacing is None or (len(self.spacing) == 3 and all(s > 0 for s in self.spacing)),
               f"data.spacing must be None or three positive numbers, got {self.spacing!r}")
        _check(len(self.orientation) == 3 and set(self.orientation) <= set("RLAPSI"),
               f"data.orientation must be a 3-letter axis code such as 'RAS', got {self.orientation!r}")


@dataclass(frozen=True)
class GMIMConfig:
    """One GMIM / Swin UNETR model. `feature_size` sets every width: the deepest features have 16*feature_size
    channels, which sizes the projectors and the reconstruction decoder (no hard-coded 768)."""

    in_channels: int = 1  # image channels (4 for BraTS). Original --in_channels 1
    out_channels: int = 2  # segmentation outputs (classes incl. background, or regions when data.multi_label)
    # Width of the first stage; stage i has feature_size * 2^i channels. A multiple of 12 (MONAI's Swin UNETR).
    # Original --feature_size 48 (Swin UNETR base).
    feature_size: int = 48
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)  # attention blocks per stage. Original: 2-2-2-2
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)  # attention heads per stage. Original: 3-6-12-24
    window_size: int = 7  # shifted-window size in tokens per axis. Original: 7
    patch_size: int = 2  # fixed at 2 by MONAI's Swin UNETR (the masks assume it). Original: 2
    use_v2: bool = False  # Swin UNETR v2 (residual conv blocks before each stage); the original: v1
    # Which MONAI patch merging the weights were trained with (gmim_hub/models/merging.py): "legacy" = MONAI <= 1.4
    # (duplicated slices; the original GMIM and every pre-2025 Swin UNETR checkpoint), "merging" = MONAI >= 1.5 (all
    # eight neighbours; the default: no token is dropped), "mergingv2" = PatchMergingV2. gmim convert sets "legacy".
    patch_merging: PatchMergingName = "merging"
    # Pre-training crop (both views) and the fine-tuning / inference sliding window, voxels per axis (multiples of
    # 32). Original --roi_x/y/z 128.
    roi_size: tuple[int, int, int] = (128, 128, 128)
    norm_name: str = "instance"  # normalisation in the segmentation decoder (MONAI's SwinUNETR default)
    drop_rate: float = 0.0  # encoder dropout: after the patch embedding, attention projection and MLPs. Original: 0
    attn_drop_rate: float = 0.0  # dropout on attention weights. Original: 0
    dropout_path_rate: float = 0.0  # stochastic depth, the largest drop-path rate. Original --dropout_path_rate 0
    use_checkpoint: bool = False  # activation checkpointing: less memory, ~30% slower. Original --use_checkpoint off
    projector_dim: int = 512  # output size of the two linear projectors of the deepest tokens. Original: 512
    # 0 = the paper: the target branch shares the online weights under stop-gradient; > 0 keeps an EMA copy instead,
    # t <- m t + (1 - m) online after every optimizer step (no original: it always shared the weights).
    target_momentum: float = 0.0
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # the GMIM masking (above)
    loss: LossConfig = field(default_factory=LossConfig)  # the GMIM objective (above)
    data: DataConfig = field(default_factory=DataConfig)  # the input the model expects (above)
    format_version: int = FORMAT_VERSION  # of config.json; a version-1 file is upgraded on reading

    def __post_init__(self) -> None:
        _check(self.format_version == FORMAT_VERSION,
               f"format_version {self.format_version!r} is not supported by this gmim-hub "
               f"(it writes {FORMAT_VERSION}; from_dict upgrades version-1 files); upgrade gmim-hub")
        _check(self.patch_merging in ("legacy", "merging", "mergingv2"),
               f"patch_merging must be 'legacy', 'merging' or 'mergingv2', got {self.patch_merging!r}")
        _check(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels!r}")
        _check(self.out_channels >= 1, f"out_channels must be >= 1, got {self.out_channels!r}")
        _check(self.feature_size >= 12 and self.feature_size % 12 == 0,
               f"feature_size must be a positive multiple of 12, got {self.feature_size!r}")
        _check(len(self.depths) == 4 and all(d >= 1 for d in self.depths),
               f"depths must be four positive ints, got {self.depths!r}")
        _check(len(self.num_heads) == 4 and all(h >= 1 for h in self.num_heads),
               f"num_heads must be four positive ints, got {self.num_heads!r}")
        for i, h in enumerate(self.num_heads):
            _check((self.feature_size * 2**i) % h == 0,
                   f"num_heads[{i}]={h} must divide the stage width feature_size*2^{i}={self.feature_size * 2**i}")
        _check(self.window_size >= 1, f"window_size must be >= 1, got {self.window_size!r}")
        _check(self.patch_size == 2, f"patch_size must be 2 (MONAI's Swin UNETR), got {self.patch_size!r}")
        _check(len(self.roi_size) == 3 and all(isinstance(r, int) and r > 0 and r % 32 == 0 for r in self.roi_size),
               f"roi_size must be three positive multiples of 32 (5 halvings in Swin UNETR), got {self.roi_size!r}")
        bad = [g for g in self.masking.grids if any(r % g for r in self.roi_size)]
        _check(not bad, f"masking.grids {list(bad)} do not divide roi_size {self.roi_size}: every grid (cells per "
               "axis) must divide the ROI; choose grids such as (4, 8, 16) for ROI 128 or (2, 4, 8) for ROI 64")
        t0 = [p for p in masking_reach_problems(self) if p.startswith("insertion point 0")]
        _check(not t0, f"{t0[0] if t0 else ''}: the first insertion point must mask tokens in every sample (its mask "
               "is the loss mask)")
        for name in ("drop_rate", "attn_drop_rate", "dropout_path_rate"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v!r}")
        _check(0.0 <= self.target_momentum < 1.0, f"target_momentum must be in [0, 1), got {self.target_momentum!r}")
        _check(self.projector_dim >= 1, f"projector_dim must be >= 1, got {self.projector_dim!r}")
        _check(not self.data.channel_names or self.in_channels == len(self.data.channel_names),
               f"in_channels={self.in_channels} but data.channel_names has {len(self.data.channel_names)} names; "
               "make them agree")
        _check(not self.data.label_names or self.out_channels == len(self.data.label_names),
               f"out_channels={self.out_channels} but data.label_names has {len(self.data.label_names)} names; "
               "make them agree (use dataclasses.replace on both)")

    @property
    def histogram_range(self) -> tuple[float, float]:
        """Intensity range of the histogram cell entropy: masking.histogram_range, else what data.intensity maps
        the image to ([0, 1] for ct_window and minmax; [-3, 3] for zscore_nonzero, whose background stays 0)."""
        if self.masking.histogram_range is not None:
            return self.masking.histogram_range
        return INTENSITY_RANGES[self.data.intensity]

    @property
    def encoder_dim(self) -> int:
        """Channels of the deepest encoder features: 16 * feature_size (768 for the paper's 48)."""
        return 16 * self.feature_size

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, partial: bool = False) -> GMIMConfig:
        """Strict inverse of `to_dict`. `partial=True` lets missing keys take their defaults (hand-written
        configs); a saved config.json is read with `partial=False`, so a truncated file is an error. A version-1
        dict is upgraded to the current version with what its model was trained with (`upgrade_config_dict`)."""
        return _from_dict(cls, upgrade_config_dict(data), "", partial)

    def to_json_file(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> GMIMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, partial=False)


def _masked_count(tokens: int, ratio: float, rounding: str) -> int:
    x = tokens * min(ratio, 1.0)
    return math.floor(x + 0.5 if rounding == "round" else x)


def masking_reach_problems(cfg: GMIMConfig) -> list[str]:
    """Why an insertion point of the GMIM masking could never mask a token, one message per point (empty = fine).

    Insertion point 0 (the patch embedding, roi/patch tokens per axis) must mask something in every sample, even
    when every cell gets the lowest ratio (a flat crop): that needs floor(T * base_ratio*(1-scale)) >= 1 for the
    largest cell of EVERY grid. A later point t (applied when hierarchical_decay and extra_mask_prob are > 0) must
    be able to mask something with SOME grid at the highest ratio base_ratio*(1+scale)*h^t. T, the tokens in the
    largest cell, is the product over axes of ceil(tokens per axis / grid) (docs/method.md, "Token masks")."""
    m = cfg.masking
    lowest = m.base_ratio * (1 - m.scale) if m.dynamic else m.base_ratio
    highest = m.base_ratio * (1 + m.scale) if m.dynamic else m.base_ratio
    grids: tuple[int, ...] = m.grids
    if m.strategy == "uniform":  # one cell: the whole token grid
        lowest = highest = m.mean_uniform_ratio
        grids = (1,)
    first = [r // cfg.patch_size for r in cfg.roi_size]
    points = [first, first, [n // 2 for n in first], [n // 4 for n in first]]
    problems = []
    for t, tokens in enumerate(points):
        cells = {g: math.prod(-(-n // g) for n in tokens) for g in grids}
        if t == 0:
            dead = [g for g, size in cells.items() if _masked_count(size, lowest, m.count_rounding) < 1]
            if dead:
                problems.append(
                    f"insertion point 0 never masks with masking.grids {dead}: roi_size {tuple(cfg.roi_size)} gives "
                    f"{min(cells[g] for g in dead)} token(s) per cell and {m.count_rounding}(tokens * "
                    f"masking.base_ratio*(1-masking.scale) = {lowest:.3g}) = 0; use coarser masking.grids, a larger "
                    "roi_size or a larger masking.base_ratio")
            continue
        if m.hierarchical_decay <= 0 or m.extra_mask_prob <= 0:
            continue
        ratio = highest
        for _ in range(t):
            ratio *= m.hierarchical_decay
        if all(_masked_count(size, ratio, m.count_rounding) < 1 for size in cells.values()):
            problems.append(
                f"insertion point {t} never masks: at most {max(cells.values())} token(s) per cell (roi_size "
                f"{tuple(cfg.roi_size)}, masking.grids {tuple(m.grids)}) times the ratio masking.base_ratio*"
                f"(1+masking.scale)*masking.hierarchical_decay^{t} = {ratio:.3g} is below one token; use coarser "
                "masking.grids, a larger roi_size, or masking.hierarchical_decay 0 to switch the later points off")
    return problems


# Keys that version 2 added, with the values that reproduce what a version-1 model was trained with.
_V1_ADDED = {"patch_merging": _V1_PATCH_MERGING}
_V1_ADDED_MASKING = {"entropy_estimator": "unique", "histogram_bins": 64, "histogram_range": None}


def upgrade_config_dict(data: Any) -> Any:
    """A version-1 config dict as the current version, meaning what it meant: patch_merging="merging" (what MONAI
    1.5+, which version-1 models were trained under, computes for `downsample="merging"`) and the distinct-value
    cell entropy (entropy_estimator="unique"), the only one version 1 had. Other dicts are returned unchanged."""
    if not isinstance(data, dict) or data.get("format_version") != 1:
        return data
    masking = data.get("masking", {})
    added = [k for k in _V1_ADDED if k in data] + [f"masking.{k}" for k in _V1_ADDED_MASKING
                                                   if isinstance(masking, dict) and k in masking]
    if added:
        raise ConfigError(f"format_version 1 has no {', '.join(added)} key; set format_version to "
                          f"{FORMAT_VERSION} or remove {', '.join(added)}")
    out = {**data, **_V1_ADDED, "format_version": FORMAT_VERSION}
    if isinstance(masking, dict):
        out["masking"] = {**masking, **_V1_ADDED_MASKING}
    return out


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


# Keys added after FORMAT_VERSION 1 was published: a config.json written before them is still complete.
_ADDED_LATER = ("data.reference",)


def _from_dict(cls: type, data: dict[str, Any], prefix: str, partial: bool) -> Any:
    """Build a (nested) config dataclass from JSON data, strictly: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    missing = sorted(names - set(data) - {k[len(prefix):] for k in _ADDED_LATER if k.startswith(prefix)})
    if missing and not partial:
        raise ConfigError(f"missing config key(s) {', '.join(prefix + k for k in missing)}; "
                          "regenerate the file with save_pretrained or add them")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, prefix + k, partial) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"invalid config: {e}") from e


def _coerce(tp: Any, value: Any, key: str, partial: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key + ".", partial)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, partial)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, partial) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, key, partial) for a, v in zip(args, value, strict=True))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp in (int, bool, str):
        if type(value) is not tp:
            raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value  # pragma: no cover


# The presets (`gmim_hub/presets.py`, plain data) read with the same strict reader as a config.json.
PRESETS: dict[str, GMIMConfig] = {name: GMIMConfig.from_dict(recipe, partial=True) for name, recipe in RECIPES.items()}


def get_preset(name: str) -> GMIMConfig:
    """Look a preset up by name, with an error that lists the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
