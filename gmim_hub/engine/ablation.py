"""The paper's ablation as a run anyone can repeat (`gmim ablate`): does GMIM's adaptive masking beat plain random
masking and no pre-training, at several label fractions?

Arms: "gmim" (adaptive hierarchical masking), "uniform" (`MaskingConfig(strategy="uniform")` at the adaptive arm's
realised mean ratio, measured on the pre-training crops), "scratch" (no pre-training). The two pre-trained arms get
the same data, steps, seed and schedule; every arm is then fine-tuned with the same budget at each label fraction and
seed, and validated on the same held-out part. Results: `ablation.json`, `ablation.md` (Dice mean and 95% t-interval
over seeds per arm and fraction) and `ablation.png`.

On the embedded demo data the labelled part of the one template subject is cut into axial slabs, which the fractions
subsample: this exercises the protocol on real anatomy, it does not measure how GMIM generalises. Every pre-training
and fine-tuning run resumes from its checkpoints, so a re-run in the same folder only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gmim_hub.atomic import atomic_write
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError

logger = logging.getLogger(__name__)

ARMS = ("gmim", "uniform", "scratch")


@dataclass(frozen=True)
class AblationSettings:
    """One budget for every arm. Defaults: a few CPU minutes per fine-tuning run on the 2 mm demo data."""

    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # of the labelled training slabs
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds (weights of the new layers, data order, slab subset)
    slabs: int = 4  # axial slabs the labelled training part is cut into
    pretrain_steps: int = 40
    pretrain_warmup: int = 4
    pretrain_batch_size: int = 2
    finetune_steps: int = 60
    finetune_warmup: int = 6
    finetune_lr: float = 1e-3
    ratio_crops: int = 24  # pre-training crops on which the adaptive arm's mean mask ratio is measured
    seed: int = 0  # pre-training seed (both pre-trained arms)
    arms: tuple[str, ...] = ARMS

    def __post_init__(self) -> None:
        if not self.fractions or not all(0.0 < f <= 1.0 for f in self.fractions):
            raise ConfigError(f"fractions must be numbers in (0, 1], got {self.fractions!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct integers, got {self.seeds!r}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ConfigError(f"unknown arm(s) {unknown or self.arms!r}; choose from {', '.join(ARMS)}")
        for name in ("slabs", "pretrain_steps", "pretrain_batch_size", "finetune_steps", "ratio_crops"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for kind in ("pretrain", "finetune"):
            warmup, steps = getattr(self, f"{kind}_warmup"), getattr(self, f"{kind}_steps")
            if not 0 <= warmup < steps:
                raise ConfigError(f"{kind}_warmup must be in [0, {kind}_steps), got {warmup} with {steps} steps")


@dataclass
class AblationResult:
    output_dir: Path
    uniform_ratio: float  # the adaptive arm's measured mean ratio at the first insertion point
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per (arm, fraction, seed): mean Dice, per class
    table: list[dict[str, Any]] = field(default_factory=list)  # one per (arm, fraction): mean, 95% interval, n
    files: dict[str, Path] = field(default_factory=dict)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds; low = high = NaN for fewer than two values."""
    from scipy import stats

    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def adaptive_mean_ratio(config: GMIMConfig, images: Sequence[Path], crops: int, seed: int) -> float:
    """Mean fraction of tokens the adaptive masking masks at the first insertion point, over `crops` random
    pre-training crops of `images` (the same pipeline as pre-training: grid choice on the online view)."""
    import torch

    from gmim_hub.data.transforms import pretrain_transforms
    from gmim_hub.masking import GRID_KEY, RATIOS_KEY, GridChoiced, sample_stage_masks, token_grids

    pipeline = pretrain_transforms(config, train=True, extra=(GridChoiced(("image",), config.masking,
                                                                          value_range=config.histogram_range),))
    pipeline.set_random_state(seed)
    first = token_grids(config.roi_size, config.patch_size)[:1]
    gen = torch.Generator().manual_seed(seed)
    fractions = []
    for i in range(crops):
        sample = pipeline({"image": str(images[i % len(images)])})
        mask = sample_stage_masks([sample[GRID_KEY]], [sample[RATIOS_KEY]], first, config.masking, gen)[0]
        fractions.append(float(mask.float().mean()) if mask is not None else 0.0)
    return float(np.mean(fractions))


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        write(tmp)
    return path


def summarise(runs: Sequence[dict[str, Any]], arms: Sequence[str], fractions: Sequence[float]) -> list[dict]:
    """One row per (arm, fraction): mean Dice over seeds with its 95% t-interval."""
    rows = []
    for arm in arms:
        for f in fractions:
            dice = [r["mean_dice"] for r in runs if r["arm"] == arm and r["fraction"] == f]
            mean, low, high = t_interval(dice)
            rows.append({"arm": arm, "fraction": f, "n": len(dice), "dice_mean": mean, "ci95_low": low,
                         "ci95_high": high, "dice_per_seed": dice})
    return rows


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]], uniform_ratio: float) -> str:
    lines = ["| arm | label fraction | seeds | Dice mean | 95% interval |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['fraction']:g} | {r['n']} | {_fmt(r['dice_mean'])} | "
                     f"{_fmt(r['ci95_low'])} - {_fmt(r['ci95_high'])} |")
    lines.append("")
    lines.append(f"Validation Dice (mean over foreground classes) after the last step; interval: Student t over "
                 f"seeds. Uniform arm masked ratio: {uniform_ratio:.4f} (the GMIM arm's measured mean).")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Dice vs label fraction per arm, with the 95% intervals as error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        x = np.array([r["fraction"] for r in mine])
        y = np.array([r["dice_mean"] for r in mine])
        err = np.array([[y[i] - r["ci95_low"], r["ci95_high"] - y[i]] for i, r in enumerate(mine)]).T
        ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=arm)
    ax.set_xlabel("label fraction")
    ax.set_ylabel("validation Dice (mean, 95% interval)")
    ax.legend()
    fig.tight_layout()
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def write_outputs(result: AblationResult, settings: AblationSettings) -> None:
    out = result.output_dir
    doc = {"settings": dataclasses.asdict(settings), "uniform_ratio": result.uniform_ratio, "table": result.table,
           "runs": result.runs}
    result.files["json"] = _atomic_write(out / "ablation.json", lambda tmp: tmp.write_text(
        json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n"))
    result.files["markdown"] = _atomic_write(out / "ablation.md", lambda tmp: tmp.write_text(
        markdown_table(result.table, result.uniform_ratio)))
    result.files["plot"] = plot(result.table, out / "ablation.png")


def _json_safe(obj: Any) -> Any:
    """NaN (an undefined interval or Dice) becomes null; tuples become lists."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pretrain(arm: str, config: GMIMConfig, data: Path, out: Path, s: AblationSettings, callback: Any) -> Path:
    from gmim_hub.engine.pretrain import PretrainArgs, pretrain

    args = PretrainArgs(data=str(data), output_dir=out / "pretrain" / arm, steps=s.pretrain_steps,
                        batch_size=s.pretrain_batch_size, warmup=s.pretrain_warmup, num_workers=0, cache=True,
                        seed=s.seed, log_every=5, eval_every=0, ckpt_every=0, preview_every=0, resume="auto")
    return pretrain(args, config, callback=callback).model_dir


def _finetune(arm: str, init: str, config: GMIMConfig, data: Path, out: Path, fraction: float, seed: int,
              s: AblationSettings, callback: Any) -> dict[str, Any]:
    from gmim_hub.engine.finetune import FinetuneArgs, finetune

    run_dir = out / "finetune" / arm / f"fraction-{fraction:g}" / f"seed-{seed}"
    args = FinetuneArgs(data=str(data), output_dir=run_dir, init=init, fraction=fraction, steps=s.finetune_steps,
                        warmup=s.finetune_warmup, lr=s.finetune_lr, num_samples=1, val_every=0, cache=True,
                        num_workers=0, seed=seed, log_every=10, ckpt_every=0, resume="auto")
    report = finetune(args, config, callback=callback).report
    if report is None:
        raise ConfigError(f"{data} has no validation split; the ablation needs one to score the arms")
    return {"arm": arm, "fraction": fraction, "seed": seed, "mean_dice": report.mean_dice,
            "dice": dict(report.dice), "output_dir": str(run_dir)}


def run_ablation(output_dir: str | Path, settings: AblationSettings | None = None, *,
                 config: GMIMConfig | None = None, finetune_config: GMIMConfig | None = None, resolution: int = 2,
                 on_event: Callable[[str], None] | None = None, pretrain_callback: Any = None,
                 finetune_callback: Any = None) -> AblationResult:
    """Run every arm on the embedded demo data and write the table and plot (module docstring).

    config: the architecture and preprocessing of every arm (default: the demo's tiny config at `resolution` mm);
    the uniform arm differs only in `masking.strategy` / `uniform_ratio`. finetune_config: the fine-tuning config
    of every arm (default: `config`; e.g. a smaller window). on_event: one line of progress text."""
    from gmim_hub.data.demo import build_demo_dataset, cut_training_slabs, demo_config

    s = settings or AblationSettings()
    say = on_event or (lambda text: logger.info("%s", text))
    out = Path(output_dir).expanduser().resolve()
    cfg = config or demo_config(resolution)
    demo = build_demo_dataset(out / "data", resolution=resolution)
    data = cut_training_slabs(demo, out / "data" / f"ablation-{s.slabs}-slabs", s.slabs)
    ratio = adaptive_mean_ratio(cfg, demo.pretrain_images, s.ratio_crops, s.seed)
    say(f"adaptive masking: mean ratio {ratio:.4f} at the first insertion point over {s.ratio_crops} crops")
    uniform = dataclasses.replace(cfg, masking=dataclasses.replace(cfg.masking, strategy="uniform",
                                                                   uniform_ratio=round(ratio, 6)))
    inits = {"scratch": "scratch"}
    for arm, arm_cfg in (("gmim", cfg), ("uniform", uniform)):
        if arm in s.arms:
            say(f"pre-training arm {arm!r} ({s.pretrain_steps} steps)")
            inits[arm] = str(_pretrain(arm, arm_cfg, demo.pretrain_dir, out, s, pretrain_callback))
    result = AblationResult(out, ratio)
    for arm in s.arms:
        for fraction in s.fractions:
            for seed in s.seeds:
                say(f"fine-tuning arm {arm!r}, label fraction {fraction:g}, seed {seed}")
                run = _finetune(arm, inits[arm], finetune_config or cfg, data, out, fraction, seed, s,
                                finetune_callback)
                result.runs.append(run)
    result.table = summarise(result.runs, s.arms, s.fractions)
    write_outputs(result, s)
    return result
