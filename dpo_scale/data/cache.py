"""Where token stores live: one directory per dataset and settings, under a cache root every run shares.

Without data.cache_dir, a store is `ROOT/<data name>-<digest>`, so every run, sweep point, precompute and eval with
the same data and settings opens the one store, whatever its run directory; stores for other data or settings sit
beside it under their own names. So a store named this way is never rebuilt for one run's other data or settings,
wherever a run found it (store.is_shared). ROOT is the first writable of:

- `DPO_SCALE_CACHE`, when set (then the only candidate: a root chosen on purpose is never replaced, and one that
  cannot hold stores is an error naming it);
- huggingface_hub's `HF_HOME/dpo_scale` (`~/.cache/huggingface/dpo_scale` unless HF_HOME or XDG_CACHE_HOME move it),
  as `datasets` keeps its caches under the same home;
- `~/.cache/dpo_scale`, for an HF home that is not writable (a read-only model cache shared on a cluster).

None writable: the run directory's `token-stores` as the root, saying so; its stores are named the same way, so a
later run in that directory with other data or settings builds its own beside them, never mixing with the earlier
run's (whose saved config still names its store there). Every path is made absolute here (a relative
DPO_SCALE_CACHE, data.cache_dir or run_dir included), so what a run records names the same store from any directory.

The digest covers every field of the store's fingerprint (fingerprint.py), with the data files identified by path,
size and modification time instead of their content, as `datasets` names the caches of local files: finding the
store reads no data, so a launch costs the same at any size. The store's manifest holds the content hashes and is
checked when the store is opened, as for any store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dpo_scale.config import ConfigError, DataConfig
from dpo_scale.data.build import Launch, tokenizing_settings
from dpo_scale.data.fingerprint import data_files
from dpo_scale.data.store import BUILD_CLAIM, LAST_USED, MANIFEST

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_ENV = "DPO_SCALE_CACHE"
RUN_DIR_ROOT = "token-stores"
"""The cache root inside the run directory, when no other is writable."""


def cache_roots() -> list[Path]:
    """The candidate roots, in order of preference, absolute."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return [Path(chosen).expanduser().resolve()]
    from huggingface_hub import constants

    return [(Path(constants.HF_HOME) / "dpo_scale").resolve(), (Path.home() / ".cache" / "dpo_scale").resolve()]


def store_directory(config: DataConfig, tokenizer: PreTrainedTokenizerBase, run_dir: str | Path | None) -> Path:
    """data.cache_dir; else the store's directory under the first writable cache root; else under
    `run_dir/token-stores` (a command without a run directory is refused). Always absolute."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser().resolve()
    refusals = []
    for root in cache_roots():
        problem = _unwritable(root)
        if problem is None:
            return root / store_name(config, tokenizer)
        if os.environ.get(CACHE_ENV):
            raise ConfigError(
                f"{CACHE_ENV}={os.environ[CACHE_ENV]}: {problem}, so no token store can be kept there. Fix: set "
                f"{CACHE_ENV} to a writable directory, or unset it to use the default cache root"
            )
        refusals.append(f"{root}: {problem}")
    if run_dir is None:
        raise ConfigError(
            f"no writable cache root for the token store ({'; '.join(refusals)}). Fix: set {CACHE_ENV} to a writable "
            "directory, or data.cache_dir"
        )
    fallback = Path(run_dir).expanduser().resolve() / RUN_DIR_ROOT
    if Launch.from_environment().is_main:
        print(f"token store: no writable cache root ({'; '.join(refusals)}); using {fallback}, which other runs do not "
              f"find. Fix: set {CACHE_ENV} to a writable directory to share it", flush=True)  # fmt: skip
    return fallback / store_name(config, tokenizer)


def _unwritable(root: Path) -> str | None:
    """Why `root` cannot hold stores (created if missing), or None."""
    if root.exists() and not root.is_dir():
        return "is a file, not a directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot be created ({error.strerror or error})"
    return None if os.access(root, os.W_OK | os.X_OK) else "is not writable"


def store_name(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """`<data name>-<16 hex digits>`: the name for people, the digest for the data and every setting."""
    identity = {"data": _data_identity(config.path), **tokenizing_settings(config, tokenizer)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.path.rstrip("/")).name)[:48].strip("._") or "data"
    return f"{readable}-{digest}"


def _data_identity(path: str) -> list | str:
    """The data files by absolute path, size and modification time (nothing read); a hub id as it is."""
    files = data_files(path)
    if not files:
        return f"hub:{path}"
    return [[str(file.resolve()), (stat := file.stat()).st_size, stat.st_mtime_ns] for file in files]


def list_stores() -> str:
    """Every store under the candidate roots that exist: data, settings, pairs, size on disk and last use."""
    lines = []
    for root in cache_roots():
        if not root.is_dir():
            what = "is a file, not a directory" if root.exists() else "does not exist"
            lines.append(f"{root}: {what}" + (f" ({CACHE_ENV} names it)" if os.environ.get(CACHE_ENV) else ""))
            continue
        stores = sorted(path for path in root.iterdir() if path.is_dir())
        lines.append(f"{root}: {len(stores)} token store(s)")
        lines += [line for store in stores for line in _describe(store)]
    return "\n".join(lines)


def _describe(store: Path) -> list[str]:
    size = sum(path.stat().st_size for path in store.rglob("*") if path.is_file())
    manifest = _read_json(store / MANIFEST)
    recorded = manifest or _read_json(store / BUILD_CLAIM) or {}
    fingerprint = recorded.get("fingerprint", {})
    used = store / LAST_USED if (store / LAST_USED).exists() else store
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(used.stat().st_mtime))
    files = fingerprint.get("data_files")
    data = recorded.get("data_path") or (files if isinstance(files, str) else "?")
    if isinstance(files, list):
        data += f" ({len(files)} file(s), {sum(f['bytes'] for f in files):,} bytes)"
    settings = " ".join(f"{key.removeprefix('data.')}={json.dumps(value)}" for key, value in fingerprint.items()
                        if key.startswith("data.")) + f" tokenizer={str(fingerprint.get('tokenizer'))[:12]}"  # fmt: skip
    if manifest is None:
        state = "unfinished (building, or interrupted: the next run that needs it finishes it)"
    else:
        shards = manifest["shards"]
        kept = sum(shard["pairs"] for shard in shards)
        state = f"{kept:,} pairs, {sum(shard['rows'] for shard in shards) - kept:,} dropped"
    return [
        f"  {store}",
        f"    data: {data}",
        f"    settings: {settings}",
        f"    {state}; {size / 2**20:,.1f} MiB; last used {when}",
    ]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
