"""Find the two files a saved model consists of (`config.json`, `model.safetensors`) in a local folder or a Hub repo.

Only those two files are ever fetched: never `pytorch_model.bin`, `*.pt` or any other pickle, because unpickling a
downloaded file can run arbitrary code. A repo or folder that only has pickled weights gets an error that points to
`gmim convert`, which reads them with `torch.load(weights_only=True)`.

Hub downloads go through `huggingface_hub.hf_hub_download`, so its cache, `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and tokens
behave as everywhere else. The weights are fetched at the commit the config resolved to, so a push between the two
downloads cannot pair one commit's config with another's weights.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from gmim_hub import __version__
from gmim_hub.errors import WeightsError

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


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception message: library errors span lines, ours must not."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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
                           f"{first_line(e)}") from e
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
    fetch = functools.partial(_download, repo_id, cache_dir=cache_dir, local_files_only=local_files_only,
                              token=token, force_download=force_download)
    config_path = None
    if need_config:
        config_path = fetch(CONFIG_NAME, revision)
        commit = _commit_of(config_path)
        weights_path = fetch(WEIGHTS_NAME, commit or revision)
    else:
        weights_path = fetch(WEIGHTS_NAME, revision)
        commit = _commit_of(weights_path)
    logger.info("resolved %s@%s to %s", repo_id, revision or "main", weights_path.parent)
    return ResolvedFiles(repo_id, weights_path, config_path, commit, from_hub=True)


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


def _commit_of(path: Path) -> str | None:
    """hf_hub_download returns <cache>/snapshots/<commit>/<file>: the folder name is the resolved commit."""
    name = path.parent.name
    return name if _COMMIT_RE.match(name) else None


def _storage_folder(repo_id: str, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _download(repo_id: str, filename: str, revision: str | None, *, cache_dir: str | Path | None,
              local_files_only: bool, token: str | bool | None, force_download: bool) -> Path:
    where = f"{repo_id}@{revision or 'main'}"
    try:
        return Path(hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            token=token, force_download=force_download, library_name="gmim-hub", library_version=__version__,
        ))
    except RevisionNotFoundError as e:
        raise WeightsError(f"revision {revision!r} not found in Hub repo {repo_id!r}; check the branch, tag or "
                           "commit") from e
    except RepositoryNotFoundError as e:
        raise WeightsError(f"Hub repo {repo_id!r} not found or not accessible; check the name, or pass token=... "
                           "(or set HF_TOKEN) for a private or gated repo") from e
    except RemoteEntryNotFoundError as e:
        if filename == WEIGHTS_NAME:
            raise _no_safetensors(f"Hub repo {where}", _remote_files(repo_id, revision, token)) from e
        raise WeightsError(f"Hub repo {where} has no {filename}: it is not a gmim-hub model repo "
                           "(pass config=... if you know its architecture)") from e
    except LocalEntryNotFoundError as e:
        raise _not_cached(repo_id, filename, revision, cache_dir, local_files_only) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(f"downloading {filename} from Hub repo {where} failed: {first_line(e)}") from e


def _remote_files(repo_id: str, revision: str | None, token: str | bool | None) -> list[str]:
    try:
        return sorted(HfApi(token=token).list_repo_files(repo_id, revision=revision))
    except (HfHubHTTPError, OSError):
        return []


def _not_cached(repo_id: str, filename: str, revision: str | None, cache_dir: str | Path | None,
                local_files_only: bool) -> WeightsError:
    storage = _storage_folder(repo_id, cache_dir)
    if filename == WEIGHTS_NAME:
        snapshot = _cached_snapshot(storage, revision)
        if snapshot is not None and any(p.name.lower().endswith(PICKLE_SUFFIXES) for p in snapshot.iterdir()):
            return _no_safetensors(f"Hub repo {repo_id} (cached)", sorted(p.name for p in snapshot.iterdir()))
    why = ("local_files_only=True" if local_files_only else
           "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub could not be reached")
    return WeightsError(
        f"{filename} of {repo_id}@{revision or 'main'} is not in the local cache at {storage} and {why}; run once "
        "online to fill the cache, copy a filled cache folder there (HF_HUB_CACHE), or pass a local directory "
        "written by save_pretrained"
    )


def _cached_snapshot(storage: Path, revision: str | None) -> Path | None:
    rev = revision or "main"
    if not _COMMIT_RE.match(rev):
        ref = storage / "refs" / rev
        if not ref.is_file():
            return None
        rev = ref.read_text().strip()
    snapshot = storage / "snapshots" / rev
    return snapshot if snapshot.is_dir() else None
