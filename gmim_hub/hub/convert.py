"""Convert foreign checkpoints into this package's format (config.json + model.safetensors + README.md).

Two layouts are understood, each as one explicit prefix table applied by one pure function (`remap_state_dict`):

* ``gmim-original``: the original GMIM pre-training checkpoint, ``{"state_dict": {...}, "optimizer": ...}`` of the
  whole `SSLHead`. ``swinViT.*`` is kept (same names as MONAI), ``swinViT_contrastive.*`` is dropped
  (the target encoder shares the online weights), ``contrastive_head_x/y.*`` become ``projector_x/y.linear.*`` and
  the "vae" decoder ``conv.*`` becomes ``decoder.blocks.*`` (the same Sequential indices: conv.0 Conv3d, conv.1
  InstanceNorm, conv.2 LeakyReLU, conv.3 Upsample, ... conv.20 the final 1x1 Conv3d).
* ``swinunetr-ssl``: MONAI's Swin UNETR self-supervised ``model_swinvit.pt``, ``{"state_dict": {"module.patch_embed
  ...", "module.layers1.0.blocks.0.mlp.fc1.weight", ...}}``: ``module.``-prefixed encoder keys become ``swinViT.*``,
  and the old MLP names ``mlp.fc1/fc2`` become MONAI's ``mlp.linear1/linear2``. Its own heads (``rotation_head``,
  ``contrastive_head``, ``convTrans3d``/``conv``) and the final ``norm`` (MONAI's encoder normalises without
  parameters) are dropped. Later research-contributions checkpoints (``swinViT.``/``swin_vit.`` prefixes) also map.

A leading ``module.`` (DataParallel / DDP) is stripped in both. Checkpoints are read with
``torch.load(weights_only=True)`` only: a pickle that needs anything but tensors and plain containers is refused,
never executed.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, WeightsError, one_line
from gmim_hub.hub.pretrained import GMIMForPretraining
from gmim_hub.hub.state import compare_state, read_weights

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "gmim-original", "swinunetr-ssl")
_STAGES = tuple(f"layers{i}{c}." for i in range(1, 5) for c in ("", "c"))  # "c": the v2 residual conv blocks

# (source prefix, target prefix or None = drop); the first matching rule wins.
PREFIX_TABLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "gmim-original": (
        ("swinViT.mask_layer.", None),  # the original's stateful mask layer: no weights of ours
        ("swinViT.", "swinViT."),
        ("swinViT_contrastive.", None),  # target encoder: shares the weights of swinViT
        ("contrastive_head_x.", "projector_x.linear."),
        ("contrastive_head_y.", "projector_y.linear."),
        ("conv.", "decoder.blocks."),
    ),
    "swinunetr-ssl": (
        ("patch_embed.", "swinViT.patch_embed."),
        *((s, "swinViT." + s) for s in _STAGES),
        ("swinViT.", "swinViT."),
        ("swin_vit.", "swinViT."),
        ("norm.", None),
        ("rotation_pre.", None),
        ("rotation_head.", None),
        ("contrastive_pre.", None),
        ("contrastive_head.", None),
        ("convTrans3d.", None),
        ("conv.", None),
    ),
}
# Renames inside a key, after its prefix: model_swinvit.pt predates MONAI's MLPBlock names.
INFIX_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "gmim-original": (),
    "swinunetr-ssl": ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2.")),
}
_HEADS = ("projector_x.", "projector_y.", "decoder.")
# The patch merging each layout's checkpoints were trained with: both predate MONAI 1.5 (docs/method.md).
LAYOUT_PATCH_MERGING = {"gmim-original": "legacy", "swinunetr-ssl": "legacy"}


@dataclass
class ConversionReport:
    """state_dict: the remapped tensors; mapped: (source key, our key); dropped: source keys left out on purpose;
    initialised: parts of the converted model that the checkpoint did not provide (fresh initialisation)."""

    state_dict: dict[str, Tensor]
    mapped: list[tuple[str, str]]
    dropped: list[str]
    layout: str
    initialised: list[str] = field(default_factory=list)
    patch_merging: str = ""  # recorded in the converted config (set by convert_checkpoint)

    def summary(self) -> str:
        extra = f"; initialised (not in the checkpoint): {', '.join(self.initialised)}" if self.initialised else ""
        extra += f"; patch_merging {self.patch_merging}" if self.patch_merging else ""
        return f"layout {self.layout}: mapped {len(self.mapped)}, dropped {len(self.dropped)}{extra}"


def detect_layout(keys: list[str]) -> str:
    """Tell the layout from characteristic keys (after stripping `module.`)."""
    stripped = [k.removeprefix("module.") for k in keys]
    if any(k.startswith(("patch_embed.", "layers1.", "swin_vit.", "rotation_head.", "convTrans3d.")) for k in stripped):
        return "swinunetr-ssl"
    if any(k.startswith(("swinViT.", "contrastive_head_x.")) for k in stripped):
        return "gmim-original"
    raise WeightsError(f"cannot tell the checkpoint layout from its keys ({', '.join(keys[:4])}, ...); pass "
                       "layout='gmim-original' or 'swinunetr-ssl' (--layout)")


def remap_state_dict(sd: dict[str, Tensor], layout: str = "auto") -> ConversionReport:
    """Rename the keys of a foreign state dict to ours with the prefix table of `layout` (pure: no I/O, tensors are
    not copied). Keys that match no rule are an error listing them, never silently dropped."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    chosen = detect_layout(list(sd)) if layout == "auto" else layout
    out: dict[str, Tensor] = {}
    mapped: list[tuple[str, str]] = []
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in sd.items():
        new = _map_key(key, chosen)
        if new is None:
            dropped.append(key)
        elif new == "":
            unknown.append(key)
        elif new in out:
            raise WeightsError(f"two checkpoint keys map to {new} (the second is {key}); the checkpoint is ambiguous")
        else:
            out[new] = tensor
            mapped.append((key, new))
    if unknown:
        raise WeightsError(f"{len(unknown)} key(s) match no rule of layout {chosen!r} ({', '.join(unknown[:4])}); "
                           "pass the right --layout, or this checkpoint is not one of the supported layouts")
    if not out:
        raise WeightsError(f"no tensor of the checkpoint maps to the model under layout {chosen!r}")
    return ConversionReport(out, mapped, dropped, chosen)


def _map_key(key: str, layout: str) -> str | None:
    """Our name for `key`; None = dropped on purpose; "" = no rule matches."""
    k = key.removeprefix("module.")
    for src, dst in PREFIX_TABLES[layout]:
        if k.startswith(src):
            if dst is None:
                return None
            new = dst + k[len(src):]
            for old, repl in INFIX_RENAMES[layout]:
                new = new.replace(old, repl)
            return new
    return ""


def load_checkpoint_tensors(src: Path) -> dict[str, Tensor]:
    """The state dict of a `.pt`/`.pth`/`.ckpt` (read with weights_only=True) or `.safetensors` file; a
    `{"state_dict": ...}` wrapper (with optimizer state etc.) is unwrapped."""
    if not src.is_file():
        raise WeightsError(f"no checkpoint file at {src}")
    if src.suffix == ".safetensors":
        return read_weights(src)[0]
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise WeightsError(f"{src} is not a readable PyTorch checkpoint ({_unpickler_detail(e)})") from e
        raise WeightsError(
            f"refused to load {src}: it holds Python objects other than tensors ({_unpickler_detail(e)}), and "
            "gmim-hub only reads checkpoints with torch.load(weights_only=True). If you trust its origin, re-save "
            "just its tensors (torch.save(ckpt['state_dict'], 'clean.pt')) in a throw-away environment and convert "
            "that"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{src} is not a readable PyTorch checkpoint ({one_line(e)})") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{src} holds no state dict of tensors (expected {{'state_dict': {{name: tensor}}}} "
                           "or {name: tensor})")
    return sd


def _unpickler_detail(e: Exception) -> str:
    """The one informative line of torch's multi-line weights_only error (e.g. "Unsupported global: GLOBAL ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(" Please use")[0].rstrip(".")
    return one_line(e)


def convert_checkpoint(src: str | Path, out_dir: str | Path, *, layout: str = "auto",
                       config: GMIMConfig, patch_merging: str | None = None) -> ConversionReport:
    """Convert a foreign checkpoint into a `GMIMForPretraining` folder at `out_dir` (save_pretrained format).

    The encoder must be complete (strict, right shapes for `config`); an encoder-only checkpoint (model_swinvit.pt)
    leaves the projectors and the decoder at their fresh initialisation, as `report.initialised` says.

    patch_merging: what the checkpoint was trained with, recorded in the saved config. None = "legacy" (MONAI
    <= 1.4's duplicated-slice merging), which the original GMIM code and `model_swinvit.pt` used; pass "merging"
    only for a checkpoint of these layouts trained under MONAI >= 1.5."""
    if patch_merging is not None:  # checked before the checkpoint is read
        config = dataclasses.replace(config, patch_merging=patch_merging)
    report = remap_state_dict(load_checkpoint_tensors(Path(src)), layout)
    config = dataclasses.replace(config, patch_merging=patch_merging or LAYOUT_PATCH_MERGING[report.layout])
    report.patch_merging = config.patch_merging
    _check_architecture(report.state_dict, config)
    model = GMIMForPretraining(config)
    report.initialised = _load_converted(model, dict(report.state_dict), str(src))
    model.save_pretrained(out_dir, card_data={"tags": [f"converted-from-{report.layout}"]})
    logger.info("converted %s to %s: %s", src, out_dir, report.summary())
    return report


def _check_architecture(sd: dict[str, Tensor], config: GMIMConfig) -> None:
    w = sd.get("swinViT.patch_embed.proj.weight")
    if w is not None and (w.shape[0] != config.feature_size or w.shape[1] != config.in_channels):
        raise ConfigError(
            f"the checkpoint has feature_size {w.shape[0]} and in_channels {w.shape[1]}, the config "
            f"{config.feature_size} and {config.in_channels}; choose the matching preset / --in-channels"
        )


def _load_converted(model: torch.nn.Module, sd: dict[str, Tensor], where: str) -> list[str]:
    """Load strictly on the encoder; a head may be absent as a whole. Returns what stayed initialised."""
    if getattr(model, "target_swinViT", None) is not None:  # an EMA target starts as the online encoder
        for k in [k for k in sd if k.startswith("swinViT.")]:
            sd.setdefault("target_" + k, sd[k])
    diff = compare_state(model.state_dict(), sd)
    buffers = [k for k in diff.missing if k.endswith("relative_position_index")]  # deterministic: recomputed
    absent_heads = [h for h in _HEADS if not any(k.startswith(h) for k in sd)]
    diff.missing = [k for k in diff.missing if k not in buffers and not k.startswith(tuple(absent_heads))]
    if diff:
        raise WeightsError(f"{where} does not fit a GMIM model with this config: {diff.describe()}; check "
                           "--preset (depths, heads, window) and --in-channels")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return [h.rstrip(".") for h in absent_heads] + (["relative_position_index buffers"] if buffers else [])
