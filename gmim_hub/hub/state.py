"""Reading, writing and strictly matching `model.safetensors` state dicts.

The model kind ("pretraining" / "segmentation") is written into the safetensors header metadata
(`gmim_hub.model_kind`): it travels inside the one file that is always downloaded, and `config.json` stays exactly
`GMIMConfig.to_dict()` (strict loading forbids extra keys there). Files without it (hand-made or converted by other
tools) still load; their kind is then inferred from the key names for error hints only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import Tensor, nn

from gmim_hub import __version__
from gmim_hub.atomic import atomic_write
from gmim_hub.errors import WeightsError

KIND_KEY = "gmim_hub.model_kind"
VERSION_KEY = "gmim_hub.version"
MODEL_KINDS = ("pretraining", "segmentation")
_LIST_LIMIT = 4


@dataclass
class KeyMismatch:
    """Differences between the tensors a model expects and those a file holds."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line: counts, then the first few keys of each kind."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_head(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_head(self.unexpected)})")
        if self.mismatched:
            shown = [f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in self.mismatched[:_LIST_LIMIT]]
            more = f", ... {len(self.mismatched) - _LIST_LIMIT} more" if len(self.mismatched) > _LIST_LIMIT else ""
            parts.append(f"{len(self.mismatched)} mis-shaped ({'; '.join(shown)}{more})")
        return "; ".join(parts)

    def as_info(self) -> dict[str, list]:
        return {"missing_keys": list(self.missing), "unexpected_keys": list(self.unexpected),
                "mismatched_keys": [k for k, _, _ in self.mismatched]}


def _head(keys: list[str]) -> str:
    more = f", ... {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def save_weights(model: nn.Module, path: Path, kind: str) -> None:
    """Write the state dict (parameters and persistent buffers) as safetensors, atomically, with the kind in the
    header. Tensors that share storage are written once; `save_model` records the dropped aliases in the header."""
    with atomic_write(path) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt", KIND_KEY: kind, VERSION_KEY: __version__})


def read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the header metadata of a safetensors file; aliases dropped at save time are
    restored. A truncated or corrupt file is a `WeightsError` naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                           "download it again (force_download=True) or re-save the model") from e
    for alias, kept in meta.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    return tensors, meta


def read_kind(path: Path) -> str | None:
    """The model kind of a weights file from its header (or key names) without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return file_kind(dict(f.metadata() or {}), set(f.keys()))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                           "download it again (force_download=True) or re-save the model") from e


def file_kind(meta: dict[str, str], keys: list[str] | set[str]) -> str | None:
    """The model kind of a weights file: from its header, else guessed from characteristic keys."""
    if meta.get(KIND_KEY) in MODEL_KINDS:
        return meta[KIND_KEY]
    if any(k.startswith(("projector_x.", "decoder.blocks.")) for k in keys):
        return "pretraining"
    if any(k.startswith(("encoder1.", "decoder1.", "out.")) for k in keys):
        return "segmentation"
    return None


def compare_state(expected: dict[str, Tensor], found: dict[str, Tensor]) -> KeyMismatch:
    """Keys missing from `found`, keys `found` has in excess, and keys present in both with different shapes."""
    return KeyMismatch(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        mismatched=[(k, tuple(found[k].shape), tuple(v.shape)) for k, v in expected.items()
                    if k in found and found[k].shape != v.shape],
    )


def load_into(model: nn.Module, tensors: dict[str, Tensor], *, strict: bool, where: str, hint: str) -> KeyMismatch:
    """Copy `tensors` into `model`. strict: any missing/unexpected/mis-shaped key raises a `WeightsError` listing
    them; otherwise matching tensors load and the mismatch is returned (mis-shaped ones keep their init)."""
    diff = compare_state(model.state_dict(), tensors)
    if diff and strict:
        raise WeightsError(f"{where} does not match {type(model).__name__}: {diff.describe()}. {hint}")
    bad = {k for k, _, _ in diff.mismatched}
    usable = {k: v for k, v in tensors.items() if k not in bad and k not in diff.unexpected}
    with torch.no_grad():
        model.load_state_dict(usable, strict=False)
    return diff


def mismatch_hint(target_kind: str, source_kind: str | None) -> str:
    """What to do when a file does not fit the class it is loaded into."""
    if target_kind == "segmentation" and source_kind == "pretraining":
        return ("This folder holds a pre-training checkpoint; use "
                "GMIMForSegmentation.from_pretrained_encoder(...) to start a segmenter from its encoder.")
    if target_kind == "pretraining" and source_kind == "segmentation":
        return "This folder holds a segmentation model; load it with GMIMForSegmentation.from_pretrained(...)."
    return ("Its config.json does not describe these weights, or they were not written by save_pretrained; "
            "fix config.json, and convert foreign checkpoints with `gmim convert`.")
