"""Evaluate a segmentation model on a datalist: hard Dice and HD95 (mm) per class, per case and averaged.

The same code scores the validation set inside `gmim train` (Dice only, for picking the best checkpoint) and the
final model card (Dice + HD95), so a later `gmim evaluate` on the same split reproduces the card's numbers.

Metrics are computed on the model's grid: after the validation transforms (orientation, resampling to
`config.data.spacing`, nearest-neighbour labels), with HD95 scaled by that grid's voxel spacing read from the image
affine. See `gmim_hub.engine.metrics` for the NaN conventions (a class absent from both prediction and ground truth
has no Dice; an empty mask has no HD95; both are left out of the means and written as `null` in JSON).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data.utils import affine_to_spacing
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from gmim_hub.atomic import write_text
from gmim_hub.config import GMIMConfig
from gmim_hub.engine import metrics as M
from gmim_hub.errors import ConfigError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (cases done, cases total)


@dataclass(frozen=True)
class CaseResult:
    """Scores of one case; dict keys are the scored class names (background excluded for softmax tasks)."""

    image: str
    spacing: tuple[float, ...]
    dice: dict[str, float]
    hd95: dict[str, float]


@dataclass(frozen=True)
class EvalReport:
    """Per-case and mean scores. `mean_dice` / `mean_hd95` average the per-class means over classes; NaN entries
    (undefined cases) are left out of every mean."""

    model: str
    split: str
    class_names: tuple[str, ...]
    cases: tuple[CaseResult, ...]
    dice: dict[str, float] = field(default_factory=dict)  # per class, mean over cases
    hd95: dict[str, float] = field(default_factory=dict)
    mean_dice: float = float("nan")
    mean_hd95: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes None (`null`), since NaN is not valid JSON."""
        return _json_safe({
            "model": self.model, "split": self.split, "classes": list(self.class_names),
            "mean_dice": self.mean_dice, "mean_hd95_mm": self.mean_hd95,
            "dice": self.dice, "hd95_mm": self.hd95,
            "cases": [{"image": c.image, "spacing_mm": list(c.spacing), "dice": c.dice, "hd95_mm": c.hd95}
                      for c in self.cases],
            "notes": "Dice on hard predictions (argmax / sigmoid>0.5); background excluded for softmax tasks; "
                     "HD95 = symmetric 95th-percentile surface distance in mm on the model's resampled grid; "
                     "null = undefined (class absent from prediction and ground truth, or an empty mask for HD95), "
                     "left out of the means.",
        })

    def card_metrics(self) -> dict[str, float]:
        """Model-card metrics: `dice`, `hd95_mm` (means) and `dice/<class>`, `hd95_mm/<class>`; undefined (NaN)
        values are left out, since a card holds finite numbers only."""
        out = {"dice": self.mean_dice, "hd95_mm": self.mean_hd95}
        out.update({f"dice/{k}": v for k, v in self.dice.items()})
        out.update({f"hd95_mm/{k}": v for k, v in self.hd95.items()})
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def build_report(cases: Sequence[CaseResult], *, model: str, split: str, class_names: Sequence[str]) -> EvalReport:
    """Average per-case scores into an `EvalReport` (NaN-safe)."""
    dice = {k: M.nanmean([c.dice[k] for c in cases]) for k in class_names}
    hd95 = {k: M.nanmean([c.hd95[k] for c in cases]) for k in class_names}
    return EvalReport(model=model, split=split, class_names=tuple(class_names), cases=tuple(cases), dice=dice,
                      hd95=hd95, mean_dice=M.nanmean(list(dice.values())), mean_hd95=M.nanmean(list(hd95.values())))


def sliding_window_logits(model: nn.Module, image: Tensor, cfg: GMIMConfig, *, sw_batch_size: int = 1,
                          overlap: float = 0.5) -> Tensor:
    """image: (B, C, D, H, W) of any size -> logits (B, out_channels, D, H, W): ROI-sized windows with gaussian
    blending (the model only accepts multiples of 32, so whole volumes always go through the window)."""
    with torch.no_grad():
        out = sliding_window_inference(image, roi_size=cfg.roi_size, sw_batch_size=sw_batch_size, predictor=model,
                                       overlap=overlap, mode="gaussian")
    return torch.as_tensor(out)  # drop MetaTensor bookkeeping


def score_case(logits: Tensor, label: Tensor, cfg: GMIMConfig, *, spacing: Sequence[float] | None,
               with_hd95: bool) -> tuple[dict[str, float], dict[str, float]]:
    """logits: (1, C, *spatial); label: (1, 1, *spatial) class map, or (1, C, *spatial) for multi-label tasks.
    Returns ({class: dice}, {class: hd95_mm}) for the scored classes (HD95 all NaN when `with_hd95` is False)."""
    multi = cfg.data.multi_label
    pred = M.discretize(logits, multi)
    target = M.target_masks(torch.as_tensor(label).to(pred.device), cfg.out_channels, multi)
    names = M.foreground_names(cfg)
    dice = M.dice_per_class(pred, target, include_background=multi)[0].tolist()
    if with_hd95:
        hd = M.hd95_per_class(pred, target, spacing=spacing, include_background=multi)[0].tolist()
    else:
        hd = [float("nan")] * len(names)
    return dict(zip(names, map(float, dice), strict=True)), dict(zip(names, map(float, hd), strict=True))


def evaluate_loader(model: nn.Module, loader: Iterable[dict[str, Any]], cfg: GMIMConfig, *, device: torch.device,
                    sw_batch_size: int = 1, overlap: float = 0.5, with_hd95: bool = True, model_name: str = "model",
                    split: str = "validation", progress: ProgressFn | None = None) -> EvalReport:
    """Score every batch (batch size 1: whole volumes) of `loader` with `model` in eval mode; the model's train/eval
    mode is restored afterwards so this can run in the middle of training."""
    was_training = model.training
    model.eval()
    cases: list[CaseResult] = []
    total = _len_or_zero(loader)
    try:
        for i, batch in enumerate(loader):
            image = batch["image"].to(device)
            spacing = _spacing_of(batch["image"])
            logits = sliding_window_logits(model, image, cfg, sw_batch_size=sw_batch_size, overlap=overlap)
            dice, hd = score_case(logits, batch["label"], cfg, spacing=spacing, with_hd95=with_hd95)
            cases.append(CaseResult(image=_name_of(batch, i), spacing=tuple(spacing or ()), dice=dice, hd95=hd))
            if progress is not None:
                progress(i + 1, total)
    finally:
        model.train(was_training)
    return build_report(cases, model=model_name, split=split, class_names=M.foreground_names(cfg))


def evaluate(model_src: str | Path, datalist: str | Path, *, base_dir: str | Path | None = None,
             split: str = "validation", fold: int | None = None, sw_batch_size: int = 1, overlap: float = 0.5,
             output_json: str | Path | None = None, revision: str | None = None, num_workers: int = 0,
             device: str | None = None, progress: ProgressFn | None = None) -> EvalReport:
    """Load a segmentation model (folder or Hub repo, `from_pretrained`) and score it on `split` of `datalist`.

    The preprocessing comes from the model's own `config.data` (orientation, spacing, intensity), so the model is
    evaluated on the grid it was trained on. Writes the report to `output_json` when given."""
    from gmim_hub.data import finetune_transforms, load_datalist, make_loader
    from gmim_hub.models.hub_models import GMIMForSegmentation

    _check_window(sw_batch_size, overlap)
    dev = resolve_device(device)
    model = GMIMForSegmentation.from_pretrained(str(model_src), revision=revision).to(dev)
    cfg: GMIMConfig = model.config
    data = load_datalist(datalist, base_dir=base_dir, split=split, fold=fold,  # type: ignore[arg-type]
                         require_labels=True)
    loader = make_loader(data, finetune_transforms(cfg, train=False), batch_size=1, shuffle=False,
                         num_workers=num_workers, seed=0)
    report = evaluate_loader(model, loader, cfg, device=dev, sw_batch_size=sw_batch_size, overlap=overlap,
                             model_name=str(model_src), split=split, progress=progress)
    if output_json is not None:
        write_report(report, output_json)
    logger.info("evaluated %s on %d %s case(s): mean Dice %.4f", model_src, len(report.cases), split,
                report.mean_dice)
    return report


def write_report(report: EvalReport, path: str | Path) -> Path:
    """Write `report.to_dict()` as indented JSON (creating the parent folder); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text(p, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return p


def resolve_device(device: str | None) -> torch.device:
    """`None` or "auto" -> the first CUDA device when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}") from e


def _check_window(sw_batch_size: int, overlap: float) -> None:
    if not (isinstance(sw_batch_size, int) and sw_batch_size >= 1):
        raise ConfigError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")


def _spacing_of(image: Any) -> list[float] | None:
    """Voxel spacing (mm) of the first image of a collated batch, from its MetaTensor affine; None if unknown."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return None
    a = torch.as_tensor(affine)
    a = a[0] if a.ndim == 3 else a
    return [float(s) for s in affine_to_spacing(a, r=3)]


def _name_of(batch: dict[str, Any], index: int) -> str:
    meta = getattr(batch["image"], "meta", {}) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else f"case{index}"


def _len_or_zero(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
