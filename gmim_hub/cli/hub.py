"""`gmim convert` (foreign checkpoint -> model folder) and `gmim push` (model folder -> Hugging Face Hub)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gmim_hub.cli._common import console
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError

_CONVERT_HELP = (
    "Convert a foreign pre-training checkpoint (original GMIM, or MONAI's model_swinvit.pt) into a gmim-hub model "
    "folder.\n\n"
    "The folder (config.json, model.safetensors, README.md) loads with GMIMForPretraining.from_pretrained and "
    "GMIMForSegmentation.from_pretrained_encoder. Layouts (--layout):\n\n"
    "* gmim-original: the original GMIM checkpoint {'state_dict': ...} of the whole SSLHead: swinViT.* kept, "
    "swinViT_contrastive.* dropped (shared weights), contrastive_head_x/y.* -> projector_x/y, conv.* (vae decoder) "
    "-> decoder.\n\n"
    "* swinunetr-ssl: MONAI's Swin UNETR self-supervised model_swinvit.pt: module.-prefixed encoder keys -> "
    "swinViT.* (mlp.fc1/fc2 -> mlp.linear1/linear2); its rotation/contrastive/reconstruction heads and final norm "
    "are dropped; projectors and decoder stay freshly initialised.\n\n"
    "* auto (default): detected from the key names.\n\n"
    "The checkpoint is read with torch.load(weights_only=True) only: a file that needs anything but tensors is "
    "refused, never executed."
)


def register(app: typer.Typer) -> None:
    app.command("convert", help=_CONVERT_HELP)(convert)
    app.command("push")(push)


def convert(
    src: Annotated[Path, typer.Argument(help="Checkpoint file (.pt/.pth/.ckpt, or .safetensors).")],
    out: Annotated[Path, typer.Argument(help="Output folder (created).")],
    layout: Annotated[str, typer.Option(help="auto | gmim-original | swinunetr-ssl")] = "auto",
    preset: Annotated[str, typer.Option(help="Architecture preset of the checkpoint: base (the paper) | tiny.")] = "base",
    in_channels: Annotated[int | None, typer.Option(help="Input channels, if not the preset's (e.g. 4 for BraTS).")] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="A (possibly partial) config.json to use instead of --preset, e.g. to describe the data.",
    )] = None,
    patch_merging: Annotated[str | None, typer.Option(
        help="Patch merging the checkpoint was trained with: legacy (default: MONAI <= 1.4, as the original GMIM "
             "and model_swinvit.pt) | merging (MONAI >= 1.5) | mergingv2.",
    )] = None,
) -> None:
    from gmim_hub.config import get_preset
    from gmim_hub.hub.convert import convert_checkpoint

    config = get_preset(preset) if config_file is None else _read_partial_config(config_file)
    if in_channels is not None:
        config = dataclasses.replace(config, in_channels=in_channels,
                                     data=dataclasses.replace(config.data, channel_names=()))
    report = convert_checkpoint(src, out, layout=layout, config=config, patch_merging=patch_merging)
    table = Table(title=f"gmim convert: {src.name} -> {out}")
    table.add_column("item")
    table.add_column("value")
    table.add_row("layout", report.layout)
    table.add_row("patch merging", report.patch_merging)
    table.add_row("mapped tensors", str(len(report.mapped)))
    table.add_row("dropped tensors", f"{len(report.dropped)} ({_prefix_counts(report.dropped)})")
    table.add_row("left initialised", ", ".join(report.initialised) or "nothing")
    console.print(table)


def push(
    folder: Annotated[Path, typer.Argument(help="Folder written by save_pretrained / gmim convert.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, 'org/name' (created if needed).")],
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: HF_TOKEN or the saved login).")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (default: main).")] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing.")] = False,
    endpoint: Annotated[str | None, typer.Option(help="Hub URL (default: HF_ENDPOINT or huggingface.co).")] = None,
) -> None:
    """Upload a saved model folder to the Hugging Face Hub.

    Only config.json, model.safetensors and README.md are uploaded, in one commit, after checking that the folder
    loads strictly."""
    from gmim_hub.hub.mixin import upload_model_folder
    from gmim_hub.models.hub_models import load_saved_folder

    model = load_saved_folder(folder)
    console.print(f"checked: {folder} loads as {type(model).__name__}")
    url = upload_model_folder(folder, repo_id, token=token, private=private, revision=revision,
                              create_pr=create_pr, endpoint=endpoint)
    console.print(f"pushed to {repo_id}: {url}")


def _read_partial_config(path: Path) -> GMIMConfig:
    import json

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return GMIMConfig.from_dict(data, partial=True)


def _prefix_counts(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        head = k.removeprefix("module.").split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{h}.* {n}" for h, n in counts.items()) or "none"
