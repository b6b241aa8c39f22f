"""The weights file of a saved model (`model.safetensors`): writing it, reading it, and loading it strictly.

The model kind ("pretraining" / "segmentation") is written into the safetensors header metadata
(`gmim_hub.model_kind`): it travels inside the one file that is always downloaded, and `config.json` stays exactly
`GMIMConfig.to_dict()` (strict loading forbids extra keys there). Files without it (hand-made or converted by other
tools) still load; their kind is then inferred from the key names for error hints only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from gmim_hub._version import __version__
from gmim_hub.atomic import atomic_write
from gmim_hub.errors import WeightsError

KIND_KEY = "gmim_hub.model_kind"
VERSION_KEY = "gmim_hub.version"
MODEL_KINDS = ("pretraining", "segmentation")
_LIST_LIMIT = 4
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    for alias, kept in meta.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    return tensors, meta


@dataclass(frozen=True)
class WeightsHeader:
    """What the header of a weights file says, without reading a tensor: its metadata, every tensor's shape and
    dtype name ("F32", "BF16", ...), aliases dropped at save time included."""

    meta: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def kind(self) -> str | None:
        return file_kind(self.meta, set(self.shapes))

    def float_dtype(self) -> torch.dtype:
        """The file's floating dtype when it has exactly one, else float32."""
        found = {_FLOAT_DTYPES[d] for d in self.dtypes.values() if d in _FLOAT_DTYPES}
        return found.pop() if len(found) == 1 else torch.float32


def read_header(path: Path) -> WeightsHeader:
    """The header of a weights file; a truncated or corrupt file is a `WeightsError` naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    for alias, kept in meta.items():
        if alias not in shapes and kept in shapes:
            shapes[alias], dtypes[alias] = shapes[kept], dtypes[kept]
    return WeightsHeader(meta, shapes, dtypes)


def read_kind(path: Path) -> str | None:
    """The model kind of a weights file from its header (or key names) without reading the tensors."""
    return read_header(path).kind


_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def _unreadable(path: Path, e: BaseException) -> WeightsError:
    return WeightsError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                        "download it again (force_download=True) or re-save the model")


def file_kind(meta: dict[str, str], keys: list[str] | set[str]) -> str | None:
    """The model kind of a weights file: from its header, else guessed from characteristic keys."""
    if meta.get(KIND_KEY) in MODEL_KINDS:
        return meta[KIND_KEY]
    if any(k.startswith(("projector_x.", "decoder.blocks.")) for k in keys):
        return "pretraining"
    if any(k.startswith(("encoder1.", "decoder1.", "out.")) for k in keys):
        return "segmentation"
    return None


def compare_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> KeyMismatch:
    """Keys missing from `found`, keys `found` has in excess, and keys present in both with different shapes."""
    return KeyMismatch(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        mismatched=[(k, tuple(found[k]), tuple(v)) for k, v in expected.items()
                    if k in found and tuple(found[k]) != tuple(v)],
    )


def compare_state(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> KeyMismatch:
    """`compare_shapes` of two state dicts."""
    return compare_shapes({k: tuple(v.shape) for k, v in expected.items()},
                          {k: tuple(v.shape) for k, v in found.items()})


def load_weights_file(model: nn.Module, path: Path, header: WeightsHeader, *, strict: bool, where: str,
                      hint: str) -> KeyMismatch:
    """Load the weights file `path` (whose header is `header`) into `model`. The keys and shapes are compared first
    from the header: strict, any missing/unexpected/mis-shaped key raises a `WeightsError` listing them; otherwise
    matching tensors load and the mismatch is returned (mis-shaped and missing ones keep their init)."""
    diff = compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, header.shapes)
    if diff and strict:
        raise WeightsError(f"{where} does not match {type(model).__name__}: {diff.describe()}. {hint}")
    with torch.no_grad():
        if diff.mismatched:  # load_state_dict refuses mis-shaped tensors even when not strict: leave them out
            bad = {k for k, _, _ in diff.mismatched}
            tensors = read_weights(path)[0]
            model.load_state_dict({k: v for k, v in tensors.items() if k not in bad and k not in diff.unexpected},
                                  strict=False)
            return diff
        try:
            load_model(model, str(path), strict=strict)
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from e
    return diff


def mismatch_hint(target_kind: str, source_kind: str | None) -> str:
    """What to do when a file does not fit the class it is loaded into."""
    # "checkpoint" in this message means a saved pre-training model: the text is kept as users and tests know it
    if target_kind == "segmentation" and source_kind == "pretraining":
        return ("This folder holds a pre-training checkpoint; use "
                "GMIMForSegmentation.from_pretrained_encoder(...) to start a segmenter from its encoder.")
    if target_kind == "pretraining" and source_kind == "segmentation":
        return "This folder holds a segmentation model; load it with GMIMForSegmentation.from_pretrained(...)."
    return ("Its config.json does not describe these weights, or they were not written by save_pretrained; "
            "fix config.json, and convert foreign checkpoints with `gmim convert`.")
