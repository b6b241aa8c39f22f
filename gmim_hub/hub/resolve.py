"""Find the two files a saved model consists of (`config.json`, `model.safetensors`) in a local folder or a Hub repo.

Only those two files are ever fetched: never `pytorch_model.bin`, `*.pt` or any other pickle, because unpickling a
downloaded file can run arbitrary code. A repo or folder that only has pickled weights gets an error that points to
`gmim convert`, which reads them with `torch.load(weights_only=True)`.

Hub repos go through one `huggingface_hub.snapshot_download(allow_patterns=[config.json, model.safetensors])`: both
files come from the one commit the revision resolved to (a push in between cannot pair one commit's config with
another's weights), and the library's cache, `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and tokens behave as everywhere else.
Which files a repo holds comes from the library's cached tree listing (`get_cached_repo_tree`), written by every
online snapshot download; a cache filled without it (copied by hand) is judged by the files it holds.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, get_cached_repo_tree, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from gmim_hub._version import __version__
from gmim_hub.errors import WeightsError, one_line

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# Weight formats that need unpickling: never loaded from a repo or folder, only converted explicitly.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedFiles:
    """Local paths of a model's files. `revision` is the commit hash when the files came from the Hub (or from a
    Hub cache snapshot folder), else None; `config_path` is None when the caller supplied the config."""

    source: str
    weights_path: Path
    config_path: Path | None
    revision: str | None
    from_hub: bool


def check_repo_id(repo_id: str) -> str:
    """Validate a Hub repo id ('org/name' or 'name'); path-like ids ('../x', 'a/../../b', '/abs') are refused."""
    parts = repo_id.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") for p in parts) or repo_id.startswith("~") or "\\" in repo_id:
        raise WeightsError(
            f"{repo_id!r} is not an existing local directory and not a valid Hub repo id: repo ids look like "
            "'org/name' (no '..', '.', empty or extra path segments); for a local folder check the path exists"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise WeightsError(f"{repo_id!r} is not an existing local directory and not a valid Hub repo id: "
                           f"{one_line(e)}") from e
    return repo_id


def resolve_model_files(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    need_config: bool = True,
) -> ResolvedFiles:
    """Return the local paths of `config.json` and `model.safetensors` for a folder or a Hub repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_local(path, need_config)
    if path.is_file():  # never opened: a weights file on its own may be a pickle
        convert = (f"; pickle-based weights ({path.suffix}) are never loaded: convert them with `gmim convert "
                   f"{path.name} <out_dir>`" if path.name.lower().endswith(PICKLE_SUFFIXES) else "")
        raise WeightsError(f"{source} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                           f"(written by save_pretrained) or a Hub repo id{convert}")
    if isinstance(source, Path):
        raise WeightsError(f"no directory at {source}; pass a folder written by save_pretrained or a Hub repo id")
    repo_id = check_repo_id(str(source))
    wanted = [CONFIG_NAME, WEIGHTS_NAME] if need_config else [WEIGHTS_NAME]
    where = f"{repo_id}@{revision or 'main'}"
    try:
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            force_download=force_download, allow_patterns=wanted, library_name="gmim-hub",
            library_version=__version__,
        ))
    except RevisionNotFoundError as e:
        raise WeightsError(f"revision {revision!r} not found in Hub repo {repo_id!r}; check the branch, tag or "
                           "commit") from e
    except RepositoryNotFoundError as e:
        raise WeightsError(f"Hub repo {repo_id!r} not found or not accessible; check the name, or pass token=... "
                           "(or set HF_TOKEN) for a private or gated repo") from e
    except LocalEntryNotFoundError as e:  # includes a cached snapshot known to be incomplete
        missing = next((n for n in wanted if not isinstance(
            try_to_load_from_cache(repo_id, n, cache_dir=cache_dir, revision=revision), str)), wanted[0])
        raise _not_cached(repo_id, missing, revision, cache_dir, local_files_only) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(f"downloading {', '.join(wanted)} from Hub repo {where} failed: {one_line(e)}") from e
    commit = snapshot.name if _COMMIT_RE.match(snapshot.name) else None  # the cache's snapshots/<commit> folder
    listed = _repo_files(repo_id, commit, cache_dir)
    for name in wanted:
        if (snapshot / name).is_file():
            continue
        if listed is not None:  # the repo's own file list: the file does not exist at that commit
            if name == WEIGHTS_NAME:
                raise _no_safetensors(f"Hub repo {where}", listed)
            raise WeightsError(f"Hub repo {where} has no {name}: it is not a gmim-hub model repo "
                               "(pass config=... if you know its architecture)")
        cached = sorted(p.name for p in snapshot.iterdir())
        if name == WEIGHTS_NAME and any(n.lower().endswith(PICKLE_SUFFIXES) for n in cached):
            raise _no_safetensors(f"Hub repo {repo_id} (cached)", cached)
        raise _not_cached(repo_id, name, revision, cache_dir, local_files_only)
    logger.info("resolved %s to %s", where, snapshot)
    config_path = snapshot / CONFIG_NAME if need_config else None
    return ResolvedFiles(repo_id, snapshot / WEIGHTS_NAME, config_path, commit, from_hub=True)


def _resolve_local(folder: Path, need_config: bool) -> ResolvedFiles:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise _no_safetensors(str(folder), sorted(p.name for p in folder.iterdir()))
    config = folder / CONFIG_NAME
    if need_config and not config.is_file():
        raise WeightsError(f"{folder} has no {CONFIG_NAME}; save the model with save_pretrained, or pass config=...")
    # A snapshot folder of the Hub cache still knows its commit.
    revision = folder.name if folder.parent.name == "snapshots" and _COMMIT_RE.match(folder.name) else None
    return ResolvedFiles(str(folder), weights, config if need_config else None, revision, from_hub=False)


def _no_safetensors(where: str, names: list[str]) -> WeightsError:
    pickled = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        return WeightsError(
            f"{where} has no {WEIGHTS_NAME}, only pickle-based weights ({', '.join(pickled[:5])}), which gmim-hub "
            "never loads from a repo or folder; convert them with `gmim convert <file> <out_dir>` "
            "(tensors only, torch.load(weights_only=True)) and load <out_dir>"
        )
    found = ", ".join(names[:8]) or "nothing"
    return WeightsError(f"{where} has no {WEIGHTS_NAME} (found: {found}); write it with save_pretrained")


def _repo_files(repo_id: str, commit: str | None, cache_dir: str | Path | None) -> list[str] | None:
    """Every file of the repo at `commit`, from the tree listing the library cached when it downloaded the
    snapshot; None when no listing is cached (a cache filled by hand, or by an older huggingface_hub)."""
    if commit is None:
        return None
    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir))
    except CachedRepoTreeNotFoundError:
        return None


def _not_cached(repo_id: str, filename: str, revision: str | None, cache_dir: str | Path | None,
                local_files_only: bool) -> WeightsError:
    storage = Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id,
                                                                                        repo_type="model")
    why = ("local_files_only=True" if local_files_only else
           "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub could not be reached")
    return WeightsError(
        f"{filename} of {repo_id}@{revision or 'main'} is not in the local cache at {storage} and {why}; run once "
        "online to fill the cache, copy a filled cache folder there (HF_HUB_CACHE), or pass a local directory "
        "written by save_pretrained"
    )
