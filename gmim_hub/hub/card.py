"""The model card (`README.md`) written next to every saved model: Hub metadata in YAML front matter, then a body
that says what the model is, what input it expects, how to load it, and that it is for research only."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError
from gmim_hub.hub.resolve import check_repo_id

TAGS = ("medical", "3d", "swin-unetr", "self-supervised", "gmim", "monai")
# Keys a caller may not set through card_data: they identify the library, or are derived from `metrics`.
_RESERVED = ("library_name", "model-index", "eval_results", "model_name")

CITATION = """\
@article{qi2024gmim,
  title   = {GMIM: Self-supervised pre-training for 3D medical image segmentation with adaptive and hierarchical
             masked image modeling},
  author  = {Qi, Liangce and Jiang, Zhengang and Shi, Weili and Qu, Feng and Feng, Guanyuan},
  journal = {Computers in Biology and Medicine},
  year    = {2024},
  doi     = {10.1016/j.compbiomed.2024.108547}
}"""


def render_model_card(
    config: GMIMConfig,
    *,
    model_kind: str,
    model_name: str | None = None,
    base_model: str | None = None,
    metrics: Mapping[str, float] | None = None,
    eval_dataset: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    base_model_revision: str | None = None,
) -> str:
    """README.md text. metrics: {"dice": 0.91, "dice/liver": 0.95, ...}; a key "<metric>/<label>" is a per-class
    value. They become the `model-index` evaluation results on `eval_dataset` (required with metrics).
    `base_model` goes into the metadata only when it is a Hub repo id (a local path stays in the body);
    `base_model_revision` (the commit it resolved to) goes into the body, so the card says exactly what it started
    from."""
    data = _card_data(config, model_kind, model_name, base_model, metrics, eval_dataset, card_data)
    body = _body(config, model_kind, model_name or "gmim-model", base_model, base_model_revision)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _card_data(config: GMIMConfig, kind: str, name: str | None, base_model: str | None,
               metrics: Mapping[str, float] | None, eval_dataset: str | None,
               extra: Mapping[str, Any] | None) -> ModelCardData:
    extra = dict(extra or {})
    reserved = sorted(set(extra) & set(_RESERVED))
    if reserved:
        raise ConfigError(f"card_data may not set {', '.join(reserved)}; pass metrics=/eval_dataset= for results "
                          "(library_name is always gmim-hub)")
    tags = [*TAGS, f"gmim-{kind}", config.data.modality.lower(), *extra.pop("tags", [])]
    results = _eval_results(metrics, eval_dataset)
    return ModelCardData(
        library_name="gmim-hub",
        pipeline_tag=extra.pop("pipeline_tag", "image-segmentation"),
        license=extra.pop("license", "apache-2.0"),
        tags=tags,
        base_model=extra.pop("base_model", None) or _hub_id_or_none(base_model),
        model_name=(name or "gmim-model") if results else None,
        eval_results=results or None,
        **extra,
    )


def _hub_id_or_none(source: str | None) -> str | None:
    if not source:
        return None
    try:
        return check_repo_id(source)
    except ValueError:  # a local path (absolute, as from_pretrained_encoder records it) is not a Hub id
        return None


def _eval_results(metrics: Mapping[str, float] | None, dataset: str | None) -> list[EvalResult]:
    if not metrics:
        return []
    if not dataset:
        raise ConfigError("metrics need eval_dataset='<name of the evaluation data>' for the model card")
    results = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"metrics[{key!r}] must be a finite number, got {value!r}")
        metric, _, label = key.partition("/")
        if not metric:
            raise ConfigError(f"metric name {key!r} must look like 'dice' or 'dice/<label>'")
        results.append(EvalResult(
            task_type="image-segmentation", task_name="3D medical image segmentation",
            dataset_type=_slug(dataset), dataset_name=dataset, metric_type=metric,
            metric_name=f"{metric} ({label})" if label else metric, metric_value=float(value),
        ))
    return results


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


def _body(config: GMIMConfig, kind: str, name: str, base_model: str | None, base_revision: str | None) -> str:
    what = ("a GMIM **pre-training** model: the Swin UNETR encoder (`swinViT.*`, MONAI's names) with the "
            "cross-correlation projectors and the reconstruction decoder. Start a segmenter from its encoder."
            if kind == "pretraining" else
            "a **3-D segmentation** model: MONAI's Swin UNETR (its state dict loads into "
            "`monai.networks.nets.SwinUNETR` with `strict=True`).")
    at = f" at revision `{base_revision}`" if base_revision else ""
    origin = f"\n\nFine-tuned from `{base_model}`{at}." if base_model else ""
    return "\n\n".join([
        f"# {name}\n\nThis is {what}{origin} It was written by "
        "gmim-hub: a `GMIMConfig` (`config.json`) and the weights (`model.safetensors`).",
        "## Configuration\n\n" + _config_table(config),
        "## How to use\n\n" + _usage(kind, name),
        "## Intended use\n\n**Research use only, not for diagnosis.** This model is not a medical device and has not "
        "been validated for clinical use; do not use its outputs to make decisions about patients.",
        "## Citation\n\nGMIM: L. Qi, Z. Jiang, W. Shi, F. Qu, G. Feng, \"GMIM: Self-supervised pre-training for 3D "
        "medical image segmentation with adaptive and hierarchical masked image modeling\", *Computers in Biology "
        "and Medicine*, 2024, doi:10.1016/j.compbiomed.2024.108547.\n\n```bibtex\n" + CITATION + "\n```\n\n"
        "The network is Swin UNETR (Hatamizadeh et al., \"Swin UNETR: Swin Transformers for Semantic Segmentation "
        "of Brain Tumors in MRI Images\", BrainLes 2021) as implemented in [MONAI](https://monai.io) "
        "(Apache-2.0).",
    ]) + "\n"


def _config_table(c: GMIMConfig) -> str:
    d = c.data
    rows = [
        ("architecture", f"Swin UNETR{' v2' if c.use_v2 else ''}, feature_size {c.feature_size}, depths "
                         f"{list(c.depths)}, heads {list(c.num_heads)}, window {c.window_size}"),
        ("channels", f"{c.in_channels} in ({', '.join(d.channel_names) or 'unnamed'}), {c.out_channels} out"),
        ("ROI (sliding window)", " x ".join(map(str, c.roi_size))),
        ("modality", d.modality),
        ("intensity", d.intensity + (f" {list(d.ct_window)} HU" if d.intensity == "ct_window" else "")),
        ("spacing (mm)", "native" if d.spacing is None else " x ".join(map(str, d.spacing))),
        ("orientation", d.orientation),
        ("labels", ", ".join(d.label_names) or "unnamed"),
        ("output", "sigmoid per channel (overlapping labels)" if d.multi_label else "softmax, argmax"),
    ]
    if d.reference is not None:
        r = d.reference
        rows.append(("training intensities", f"{r.volumes} volume(s): {r.negative_fraction:.1%} of voxels negative, "
                     f"{r.foreground_fraction:.1%} non-zero, 1st/50th/99th percentiles {list(r.raw_percentiles)} as "
                     f"stored, {list(r.percentiles)} normalised (foreground mean {r.mean}, std {r.std})"))
    return "| item | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _usage(kind: str, name: str) -> str:
    if kind == "pretraining":
        code = (f'from gmim_hub import GMIMForPretraining, GMIMForSegmentation\n\n'
                f'model = GMIMForPretraining.from_pretrained("{name}")\n'
                f'# a segmenter whose encoder comes from this model, ready for fine-tuning:\n'
                f'seg = GMIMForSegmentation.from_pretrained_encoder("{name}")')
        cli = ""
    else:
        code = (f'from gmim_hub import GMIMForSegmentation\n\n'
                f'model = GMIMForSegmentation.from_pretrained("{name}")  # eval mode\n'
                f'logits = model(image)  # image: (B, C, D, H, W), D/H/W multiples of 32')
        cli = (f"\n\nFrom the command line, `gmim predict` segments NIfTI files with `{name}` "
               "(see `gmim predict --help`).")
    return f"```python\n{code}\n```{cli}"
