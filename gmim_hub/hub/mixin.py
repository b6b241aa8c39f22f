"""`save_pretrained` / `from_pretrained` / `push_to_hub` for GMIM models, on huggingface_hub's primitives
(`snapshot_download`, `HfApi.create_commit`) and safetensors' `save_model` / `load_model`.

`huggingface_hub.PyTorchModelHubMixin` is not used: its `from_pretrained` fetches config.json and the weights in two
downloads (two commits if a push lands in between), goes on without config.json, drops unknown config keys, falls
back to unpickling `pytorch_model.bin` and prints to stdout. Here instead:
  * weights only as `model.safetensors` (never unpickled: `.bin`/`.pt` repos are refused with a pointer to
    `gmim convert`), written atomically;
  * loading is strict by default, and a mismatch lists the first missing / unexpected / mis-shaped keys with counts
    and a hint, read from the file's header before any tensor is;
  * `config.json` is read with `GMIMConfig.from_dict(partial=False)`: unknown or missing keys are errors;
  * the model comes back in eval mode on the requested device/dtype; everything is logged, nothing printed;
  * the resolved commit is kept on the model (`hub_revision`) for model cards and export manifests.

Saved folder: `config.json` (exactly `GMIMConfig.to_dict()`), `model.safetensors` (with the model kind in its header
metadata, key `gmim_hub.model_kind`) and `README.md` (model card; its tags also name the kind).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, overload

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from gmim_hub._version import __version__
from gmim_hub.atomic import write_text
from gmim_hub.config import GMIMConfig
from gmim_hub.errors import ConfigError, GMIMError, WeightsError, one_line
from gmim_hub.hub.card import render_model_card
from gmim_hub.hub.resolve import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_repo_id,
    resolve_model_files,
)
from gmim_hub.hub.state import load_weights_file, mismatch_hint, read_header, save_weights

logger = logging.getLogger(__name__)

M = TypeVar("M", bound="HubMixin")
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


class HubMixin:
    """Mix into an `nn.Module` whose constructor takes a `GMIMConfig` and that stores it as `self.config`."""

    model_kind: ClassVar[str]  # "pretraining" or "segmentation"
    config: GMIMConfig
    hub_source: str | None = None  # folder or repo id it was loaded from
    hub_revision: str | None = None  # commit hash when loaded from the Hub (or a Hub cache snapshot)
    base_model: str | None = None  # what it was initialised from (from_pretrained_encoder), for the model card
    base_model_revision: str | None = None  # the commit base_model resolved to, when it came from the Hub

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        card_data: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        metrics: Mapping[str, float] | None = None,
        eval_dataset: str | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        token: str | None = None,
        private: bool = False,
        endpoint: str | None = None,
    ) -> Path:
        """Write config.json, model.safetensors and README.md into `save_directory` (created if needed).

        card_data: extra model-card metadata (license, datasets, tags, ...); metrics: {"dice/liver": 0.95, ...}
        reported on `eval_dataset`; base_model defaults to `self.base_model`. With push_to_hub, the folder is then
        uploaded to `repo_id`. Returns the folder."""
        if push_to_hub and not repo_id:
            raise ConfigError("push_to_hub=True needs repo_id='org/name'")
        folder = Path(save_directory).expanduser()
        base = base_model or self.base_model
        card = render_model_card(  # first: a bad card argument must fail before anything is written
            self.config, model_kind=self.model_kind, model_name=repo_id or folder.name,
            base_model=base, metrics=metrics, eval_dataset=eval_dataset, card_data=card_data,
            base_model_revision=self._revision_of(base),
        )
        folder.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(folder / CONFIG_NAME)
        save_weights(self, folder / WEIGHTS_NAME, self.model_kind)  # type: ignore[arg-type]
        write_text(folder / CARD_NAME, card)
        logger.info("saved %s to %s", type(self).__name__, folder)
        if push_to_hub:
            upload_model_folder(folder, str(repo_id), token=token, private=private, endpoint=endpoint)
        return folder

    def _revision_of(self, base: str | None) -> str | None:
        """The resolved commit of `base` when this model was loaded from it (from_pretrained_encoder records
        `base_model_revision`, from_pretrained `hub_revision`), else None."""
        if base is None:
            return None
        if base == self.base_model and self.base_model_revision:
            return self.base_model_revision
        return self.hub_revision if base == self.hub_source else None

    @overload
    @classmethod
    def from_pretrained(
        cls: type[M],
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        output_loading_info: Literal[False] = False,
        config: GMIMConfig | None = None,
    ) -> M: ...

    @overload
    @classmethod
    def from_pretrained(
        cls: type[M],
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        output_loading_info: Literal[True],
        config: GMIMConfig | None = None,
    ) -> tuple[M, dict[str, Any]]: ...

    @classmethod
    def from_pretrained(
        cls: type[M],
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        output_loading_info: bool = False,
        config: GMIMConfig | None = None,
    ) -> M | tuple[M, dict[str, Any]]:
        """Load a model saved by `save_pretrained` from a folder or a Hub repo id ("org/name").

        Only config.json and model.safetensors are read. `config` replaces config.json (which is then not needed).
        strict=False loads what matches and logs the rest (see output_loading_info). dtype None keeps the file's
        floating dtype. Returns the model in eval mode on `device`, with `hub_revision` set (commit hash or None)."""
        files = resolve_model_files(
            repo_id_or_dir, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, force_download=force_download, need_config=config is None,
        )
        cfg = config if config is not None else _read_config(files.config_path)
        header = read_header(files.weights_path)
        target = (_device(device), _dtype(dtype, header.float_dtype()))
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG alone
            model = cls(cfg)  # type: ignore[call-arg]
        diff = load_weights_file(model, files.weights_path, header, strict=strict,  # type: ignore[arg-type]
                                 where=f"{files.source} ({WEIGHTS_NAME})",
                                 hint=mismatch_hint(cls.model_kind, header.kind))
        if diff:
            logger.warning("loaded %s non-strictly: %s", files.source, diff.describe())
        model.hub_source, model.hub_revision = files.source, files.revision
        model.to(device=target[0], dtype=target[1])  # type: ignore[attr-defined]
        model.eval()  # type: ignore[attr-defined]
        logger.info("loaded %s from %s (revision %s)", cls.__name__, files.source, files.revision or "local")
        if output_loading_info:
            return model, {**diff.as_info(), "revision": files.revision}
        return model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        endpoint: str | None = None,
        card_data: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        eval_dataset: str | None = None,
    ) -> str:
        """Save into a temporary folder and upload it as one commit (the repo is created if needed). `endpoint`
        overrides HF_ENDPOINT (a private Hub). Returns the commit URL (or the pull-request URL)."""
        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="gmim-push-") as tmp:
            self.save_pretrained(tmp, card_data=card_data, metrics=metrics, eval_dataset=eval_dataset,
                                 repo_id=repo_id)
            return upload_model_folder(
                Path(tmp), repo_id, token=token, private=private, revision=revision,
                commit_message=commit_message, create_pr=create_pr, endpoint=endpoint,
            )


def upload_model_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload config.json, model.safetensors and README.md of a saved folder in one commit; other files in the folder
    are never uploaded. Returns the commit URL (or the pull-request URL with create_pr)."""
    check_repo_id(repo_id)
    folder = Path(folder)
    names = [n for n in UPLOAD_FILES if (folder / n).is_file()]
    if CONFIG_NAME not in names or WEIGHTS_NAME not in names:
        raise WeightsError(f"{folder} lacks {CONFIG_NAME} or {WEIGHTS_NAME}; write it with save_pretrained first")
    skipped = sorted(p.name for p in folder.iterdir() if p.name not in names)
    if skipped:
        logger.warning("not uploading %s (only %s are pushed)", ", ".join(skipped), ", ".join(UPLOAD_FILES))
    api = HfApi(endpoint=endpoint, token=token, library_name="gmim-hub", library_version=__version__)
    ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in names]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=commit_message or "Upload GMIM model with gmim-hub",
                                 revision=revision, create_pr=create_pr)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise GMIMError(f"upload of {folder} to {repo_id} failed: {one_line(e)}; check the repo id, the token "
                        "(token=... or HF_TOKEN) and the connection") from e
    url = info.pr_url or info.commit_url
    logger.info("pushed %s to %s: %s", ", ".join(names), repo_id, url)
    return str(url)


def _read_config(path: Path | None) -> GMIMConfig:
    if path is None:
        raise WeightsError(f"no {CONFIG_NAME} was resolved; pass config=...")
    try:
        return GMIMConfig.from_json_file(path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e


def _dtype(dtype: torch.dtype | str | None, file_dtype: torch.dtype) -> torch.dtype:
    """The requested dtype; None = the file's floating dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return file_dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved
