"""Tell a local path from a hub id before anything waits on the hub.

transformers takes any string that is not an existing local directory for a hub id: a mistyped local path then
costs about a minute of download retries (without HF_HUB_OFFLINE) before its error. A missing path is refused at
once when it cannot be a repo id (`./x`, `/x`, `a/b/c`), when its first part is a local directory (`runs/nothere`
where `runs/` exists: a run directory, not the user `runs` on the hub), or when the hub is off (HF_HUB_OFFLINE)
and the local hub cache holds no copy of that repository.
"""

from __future__ import annotations

from pathlib import Path

from dpo_scale.config import ConfigError


def not_on_hub(path: str) -> str | None:
    """Why `path`, missing here, cannot name a hub repository this process can load; None when it may."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return "not a hub id either"
    namespace, slash, _ = path.partition("/")
    if slash and Path(namespace).is_dir():
        return f"{namespace}/ is a local directory, so this is a local path"
    cached = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=path, repo_type="model")
    if constants.HF_HUB_OFFLINE and not cached.is_dir():
        return "HF_HUB_OFFLINE is set and the hub cache has no such repository"
    return None


def check_model_source(path: str, key: str, fix: str) -> None:
    """Refuse at once a `key` that is neither a local path nor a loadable hub id; `fix` says what to give instead."""
    if Path(path).exists():
        return
    why = not_on_hub(path)
    if why is not None:
        raise ConfigError(f"{key}={path}: no such file or directory ({why}). Fix: {fix}")
