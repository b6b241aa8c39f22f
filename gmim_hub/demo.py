"""`gmim demo`: the whole GMIM story on real data, on a laptop CPU, in minutes.

Steps (each a `DemoStep`, all listed in `DEMO_STEPS`; export and serving are defined in `gmim_hub.demo_serving`):

1. data      build the embedded MNI152 tissue dataset (nilearn's template; background / CSF / GM / WM, 2 mm);
2. pretrain  GMIM self-supervised pre-training of the tiny preset on the unlabelled T1 volumes;
3. finetune  fine-tune a Swin UNETR segmenter from the pre-trained encoder on the training part;
4. evaluate  Dice and HD95 (mm) per class on the held-out validation part (`gmim_hub.engine.evaluate`);
5. previews  a PNG of the middle slices of image / ground truth / prediction of the validation volume;
6. export    ONNX export of the fine-tuned model, parity-checked against PyTorch;
7. serve     a Triton model repository, a local Triton server and one `gmim infer` request.

What the numbers mean: this is ONE template subject (see `gmim_hub.data.demo`); a good Dice shows the pipeline
works end to end on real anatomy with a real affine, not how well GMIM generalises. Re-running with the same
`output_dir` resumes: the dataset, pre-training and fine-tuning continue from their files and checkpoints (finished
ones are not redone, `DemoContext.reused` names them), the export is kept when it was made from the same weights;
evaluation, previews and the serving check run again (they take seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmim_hub.data import build_demo_dataset, demo_config, finetune_transforms, load_datalist
from gmim_hub.demo_context import FULL, QUICK, DemoContext, DemoSettings, DemoStep
from gmim_hub.demo_serving import step_export, step_serve
from gmim_hub.engine.checkpoint import checkpoint_name
from gmim_hub.engine.evaluate import evaluate, sliding_window_logits
from gmim_hub.engine.finetune import FinetuneArgs, finetune
from gmim_hub.engine.pretrain import PretrainArgs, pretrain
from gmim_hub.models.hub_models import GMIMForSegmentation

logger = logging.getLogger(__name__)


def step_data(ctx: DemoContext) -> None:
    ctx.data = build_demo_dataset(ctx.output_dir / "data", resolution=ctx.settings.resolution)
    ctx.artifacts["dataset"] = ctx.data.dataset_json
    ctx.summary["data"] = (f"MNI152 2009a T1 at {ctx.settings.resolution} mm: {len(ctx.data.pretrain_images)} "
                           "unlabelled volumes, 1 training / 1 validation part (one template subject)")


def step_pretrain(ctx: DemoContext) -> None:
    s = ctx.settings
    out = ctx.output_dir / "pretrain"
    args = PretrainArgs(data=str(ctx.data.pretrain_dir), output_dir=out, steps=s.pretrain_steps,
                        batch_size=s.pretrain_batch_size, lr=s.pretrain_lr, warmup=s.pretrain_warmup,
                        precision=s.precision, num_workers=0, cache=True, seed=s.seed, log_every=5,
                        eval_every=0, ckpt_every=0, preview_every=s.pretrain_steps, resume="auto")
    result = pretrain(args, demo_config(s.resolution), callback=ctx.pretrain_callback)
    if _finished_earlier(result.resumed_from, result.final_step):
        ctx.reused.append("pretrain")
    ctx.pretrained_dir = result.model_dir
    ctx.artifacts["pre-trained model"] = result.model_dir
    ctx.artifacts["pre-training previews"] = out / "previews"
    loss = result.metrics.get("loss")
    ctx.summary["pre-training"] = f"{result.final_step} steps" + (f", final loss {loss:.4f}" if loss else "")


def step_finetune(ctx: DemoContext) -> None:
    s = ctx.settings
    args = FinetuneArgs(data=str(ctx.data.dataset_json), output_dir=ctx.output_dir / "finetune",
                        init=str(ctx.pretrained_dir), steps=s.finetune_steps, warmup=s.finetune_warmup,
                        lr=s.finetune_lr, num_samples=s.num_samples, val_every=s.val_every,
                        precision=s.precision, cache=True, num_workers=0, seed=s.seed, log_every=5,
                        ckpt_every=s.val_every, resume="auto")
    result = finetune(args, demo_config(s.resolution), callback=ctx.finetune_callback)
    if _finished_earlier(result.resumed_from, result.final_step):
        ctx.reused.append("finetune")
    ctx.model_dir = result.model_dir
    ctx.artifacts["fine-tuned model (Hub folder)"] = result.model_dir
    ctx.artifacts["training log (metrics.jsonl)"] = result.output_dir / "metrics.jsonl"
    ctx.summary["fine-tuning"] = (f"{result.final_step} steps from the pre-trained encoder, best validation at "
                                  f"step {result.best_step}")


def _finished_earlier(resumed_from: Path | None, final_step: int) -> bool:
    """True when a run resumed from a checkpoint of its last step, i.e. trained nothing in this process."""
    return resumed_from is not None and resumed_from.name == checkpoint_name(final_step)


def step_evaluate(ctx: DemoContext) -> None:
    path = ctx.output_dir / "evaluation.json"
    assert ctx.model_dir is not None, "step 'evaluate' needs step 'finetune' first"
    ctx.report = evaluate(ctx.model_dir, ctx.data.dataset_json, split="validation", output_json=path)
    ctx.artifacts["evaluation (JSON)"] = path
    r = ctx.report
    ctx.summary["validation Dice"] = f"mean {r.mean_dice:.3f} (" + ", ".join(
        f"{k} {v:.3f}" for k, v in r.dice.items()) + ")"
    ctx.summary["validation HD95"] = f"mean {r.mean_hd95:.1f} mm (" + ", ".join(
        f"{k} {v:.1f}" for k, v in r.hd95.items()) + ")"


def step_previews(ctx: DemoContext) -> None:
    model = GMIMForSegmentation.from_pretrained(str(ctx.model_dir))
    cfg = model.config
    entry = load_datalist(ctx.data.dataset_json, split="validation")[0]
    sample = finetune_transforms(cfg, False)(entry)
    image = torch.as_tensor(sample["image"])[None]
    pred = sliding_window_logits(model, image, cfg).argmax(1)[0]
    path = save_segmentation_preview(ctx.output_dir / "previews" / "validation.png", image[0, 0],
                                     torch.as_tensor(sample["label"])[0], pred, cfg.data.label_names)
    ctx.artifacts["preview (PNG)"] = path


DEMO_STEPS: list[DemoStep] = [
    DemoStep("data", "Build the embedded MNI152 demo dataset", step_data),
    DemoStep("pretrain", "GMIM pre-training (tiny preset)", step_pretrain),
    DemoStep("finetune", "Fine-tuning from the pre-trained encoder", step_finetune),
    DemoStep("evaluate", "Evaluation on the validation part", step_evaluate),
    DemoStep("previews", "Previews of the validation prediction", step_previews),
    DemoStep("export", "ONNX export of the fine-tuned model", step_export),
    DemoStep("serve", "Triton server and one gmim infer request", step_serve),
]


def run_demo(output_dir: str | Path = "demo_output", *, quick: bool = False, settings: DemoSettings | None = None,
             steps: Sequence[DemoStep] | None = None, pretrain_callback: Any = None, finetune_callback: Any = None,
             on_step: Callable[[DemoStep, str, float], None] | None = None) -> DemoContext:
    """Run the demo steps in order and return the shared context (artifacts, summary, timings, report).

    settings: None = `QUICK` when `quick` else `FULL`. steps: None = `DEMO_STEPS` (all seven).
    on_step(step, "start" | "end", seconds): progress hook for the CLI."""
    ctx = DemoContext(Path(output_dir).expanduser().resolve(), settings or (QUICK if quick else FULL),
                      pretrain_callback=pretrain_callback, finetune_callback=finetune_callback)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for step in steps if steps is not None else DEMO_STEPS:
        if on_step is not None:
            on_step(step, "start", 0.0)
        t0 = time.perf_counter()
        step.run(ctx)
        ctx.timings[step.name] = time.perf_counter() - t0
        logger.info("demo step %s took %.1f s", step.name, ctx.timings[step.name])
        if on_step is not None:
            on_step(step, "end", ctx.timings[step.name])
    ctx.timings["total"] = time.perf_counter() - t_all
    if ctx.reused:
        ctx.summary["resumed"] = f"finished by an earlier run in this folder, not redone: {', '.join(ctx.reused)}"
    return ctx


def save_segmentation_preview(path: Path, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor,
                              label_names: Sequence[str] = ()) -> Path:
    """image, label, pred: (D, H, W) on one grid (RAS: axes x, y, z). Writes a 3 x 3 PNG: rows = sagittal,
    coronal and axial middle slices; columns = image, ground truth, prediction (labels overlaid on the image)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    img, lab, prd = (np.asarray(t.detach().float().cpu()) for t in (image, label, pred))
    n = int(max(lab.max(), prd.max(), len(label_names) - 1)) + 1
    colors = np.array([[0, 0, 0, 0], [0.2, 0.6, 1, 0.6], [1, 0.5, 0, 0.6], [1, 1, 0.3, 0.6],
                       [0.4, 1, 0.4, 0.6], [1, 0.3, 0.8, 0.6]])
    cmap = ListedColormap(colors[np.arange(n) % len(colors)])
    fig = Figure(figsize=(9, 9), dpi=100)
    axes = fig.subplots(3, 3)
    for row, (axis, name) in enumerate(zip((0, 1, 2), ("sagittal", "coronal", "axial"), strict=True)):
        idx = img.shape[axis] // 2
        planes = [np.take(a, idx, axis=axis).T for a in (img, lab, prd)]
        for col, title in enumerate(("image", "ground truth", "prediction")):
            ax = axes[row, col]
            ax.imshow(planes[0], cmap="gray", origin="lower")
            if col:
                ax.imshow(planes[col], cmap=cmap, vmin=0, vmax=n - 1, origin="lower", interpolation="nearest")
            ax.set_title(f"{title} ({name})", fontsize=9)
            ax.axis("off")
    legend = ", ".join(f"{i} {nm}" for i, nm in enumerate(label_names)) if label_names else ""
    fig.suptitle(f"validation volume, middle slices. {legend}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
