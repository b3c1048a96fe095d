"""Build the token store once per dataset and settings, however many processes ask for it at the same moment.

Who builds what:
- Every process that finds no complete store builds shards. Rank r of a launch of W ranks (read from the launcher's
  RANK / WORLD_SIZE, or 0 of 1) first takes the shards k with k % W == r; a lone process (`prepare-data`) spreads
  its shards over a pool of worker processes using the machine's cores.
- A shard is built under an exclusive `flock` on its lock file, so no two processes tokenize the same rows: a process
  that finds a shard locked moves on and comes back to it later. The kernel releases the lock of a process that
  dies, and the shard is then built by whoever finds it unlocked and missing. Separate jobs (the points of a SLURM
  sweep array) split the work the same way. Where the file system refuses locks, processes may build the same
  shard; its files are identical, each is written aside and renamed, so the first complete rename wins.
- Ranks wait for each other's shards by watching the directory, never inside a collective: a build of any length
  cannot hit the process group's timeout. The first rank of each launch writes the manifest; every other process
  waits for it.
- Killed at any point, the same command finds the finished shards and builds only the rest.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpo_scale import __version__
from dpo_scale.config import ConfigError, DataConfig
from dpo_scale.data.examples import no_signal_error, prepare_examples
from dpo_scale.data.fingerprint import (
    chat_template_digest, data_files, describe_files, fingerprint_differences, tokenizer_digest,
)
from dpo_scale.data.filters import filter_store
from dpo_scale.data.formats import Format, input_format, normalise
from dpo_scale.data.pairs import SIGNAL_REASONS, PreparedData
from dpo_scale.data.prepare import check_input_paths, check_not_empty, input_paths, prepare
from dpo_scale.data.prompt_heads import write_heads
from dpo_scale.data.sources import Row, read_rows
from dpo_scale.data.store import (
    BUILD_CLAIM, STORE_FORMAT, TokenStore, filtered_name, is_shared, mark_used, read_manifest, rows_name, shard_done,
    source_prefix, token_dtype, write_manifest, write_shard,
)  # fmt: skip
from dpo_scale.io import atomic_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POLL_S = 0.5
"""How often a waiting process looks at the directory again."""
REPORT_S = 60.0
"""How often a waiting process says what it waits for."""


def load_prepared(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, directory: str | Path | None
) -> TokenStore | PreparedData:
    """The prepared pairs: the token store in `directory` (built if it is missing), or in memory when None."""
    if directory is None:
        return prepare(config, tokenizer)
    check_input_paths(input_paths(config))  # before the store's directory is made
    store = open_or_build(config, tokenizer, Path(directory))
    check_not_empty(config, store.summary(), len(store.pairs), store.drop_counts())
    if config.strict and any(store.drop_counts().get(reason) for reason in SIGNAL_REASONS):
        first = next(d for d in store.dropped if d.reason in SIGNAL_REASONS)
        raise no_signal_error(first.source, first.reason, config.max_length)
    return store


def store_fingerprint(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, known_files: list[dict] | None = None
) -> dict[str, Any]:
    """Everything that decides the stored tokens, one key per setting so a refusal can name the one that differs.
    Refuses a missing input file first, naming its setting: the fingerprint describes every file preparation reads."""
    check_input_paths(input_paths(config))
    files = data_files(config.path)
    root = Path(config.path)
    return {
        "data_files": describe_files(files, root, known_files) if files else f"hub:{config.path}",
        **tokenizing_settings(config, tokenizer),
    }


def data_location(path: str) -> str:
    """The data as the store's listing shows it: a local path made absolute, a hub id as given."""
    local = Path(path)
    return str(local.resolve()) if local.exists() else path


def tokenizing_settings(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The store fingerprint's fields apart from the data: the tokenizer, the code's version, the data settings
    (with the evaluation file that data.filters.drop_contaminated compares against)."""
    eval_path = config.filters.eval_path if config.filters.drop_contaminated else None
    eval_files = data_files(eval_path) if eval_path else []
    return {
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": chat_template_digest(tokenizer),
        "dpo_scale_version": __version__,
        "store_format": STORE_FORMAT,
        **{f"data.{name}": value for name, value in config.shaping_settings().items()},
        **({"data.filters.eval_files": describe_files(eval_files, Path(eval_path))} if eval_files else {}),
    }


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes started together (the launcher's variables; 0 of 1 without)."""

    rank: int
    size: int
    local_size: int

    @classmethod
    def from_environment(cls) -> Launch:
        """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE, srun SLURM_NTASKS_PER_NODE; without
        any of them every rank is taken to share this machine."""
        size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        names = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
        local = next((os.environ[name] for name in names if name in os.environ), str(size))
        return cls(rank, size, int(re.match(r"\d+", local).group()))  # SLURM may write "8(x2)"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def token(self) -> str:
        """The same on every rank of one launch, different for the next launch."""
        names = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID")
        parts = [os.environ.get(name, "") for name in names]
        return "-".join(p for p in parts if p).replace("/", "_") or str(os.getpid())


def open_or_build(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, directory: Path, launch: Launch | None = None
) -> TokenStore:
    launch = launch or Launch.from_environment()
    directory.mkdir(parents=True, exist_ok=True)
    if config.rebuild:
        _replace_if_stale(config, tokenizer, directory, launch)
    manifest = read_manifest(directory)
    built_now = manifest is None
    if built_now:
        _build(config, tokenizer, directory, launch)
        manifest = _wait_for_manifest(directory, launch)
    differences = _differences_from(manifest["fingerprint"], config, tokenizer)
    if differences and is_shared(directory):
        raise ConfigError(
            f"token store {directory}: made for other data or settings than this run's ({'; '.join(differences)}). "
            f"It is shared by every run of its own data and settings, so it is never rebuilt for one run (not even "
            "with data.rebuild=true). Fix: leave data.cache_dir unset (this run's data and settings get a store of "
            "their own, under their own name), or set it to a directory of your own"
        )
    if differences:
        raise ConfigError(
            f"data.cache_dir={directory}: the token store there was made for other data or settings than this "
            f"run's ({'; '.join(differences)}). Fix: point data.cache_dir at another directory (or leave it unset: "
            f"each data and settings get a store of their own), or set data.rebuild=true to replace the store in "
            f"{directory}"
        )
    if launch.is_main and not built_now:
        print(f"token store {directory}: reusing it (built earlier for this data and these settings)", flush=True)
    if launch.is_main:
        mark_used(directory)
    return TokenStore(directory, manifest)


def store_differences(directory: Path, config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[str] | None:
    """What differs between the complete store in `directory` and the one `config` makes; None when there is no
    complete store there. Builds nothing."""
    manifest = read_manifest(directory)
    return None if manifest is None else _differences_from(manifest["fingerprint"], config, tokenizer)


def _differences_from(stored: dict[str, Any], config: DataConfig, tokenizer) -> list[str]:
    """What differs between a stored fingerprint and this run's. The data files recorded in it are not hashed
    again when their size and modification time are unchanged."""
    files = stored.get("data_files")
    expected = store_fingerprint(config, tokenizer, files if isinstance(files, list) else None)
    return fingerprint_differences(stored, expected, "store")


def _replace_if_stale(config: DataConfig, tokenizer, directory: Path, launch: Launch) -> None:
    """data.rebuild: the first rank empties a directory whose store or build is for other settings, when a user
    named it (a shared store is left for the refusal that follows), or whose store is damaged (its data is this
    run's); the other ranks wait for its decision (a marker named for this launch) before they look."""
    decided = directory / f".rebuild-checked-{launch.token}"
    if not launch.is_main:
        _wait(lambda: decided.exists(), f"rank {launch.rank}: waiting for rank 0 to check {directory}")
        return
    manifest = read_manifest(directory)
    recorded = manifest or _read_claim(directory)
    other = recorded is not None and bool(
        _differences_from(recorded["fingerprint"], config, tokenizer)
        or (manifest is None and recorded["shard_rows"] != config.shard_rows)  # only an unfinished build's matters
    )
    stale = other and not is_shared(directory)
    if manifest is not None and not other:
        try:
            TokenStore(directory, manifest).verify()
        except ConfigError as damage:
            print(f"data.rebuild: {damage}", flush=True)
            stale = True
    if stale:
        print(f"data.rebuild: replacing the token store in {directory}", flush=True)
        for path in directory.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    decided.touch()


def _read_claim(directory: Path) -> dict | None:
    path = directory / BUILD_CLAIM
    return json.loads(path.read_text()) if path.exists() else None


def _claim(directory: Path, claim: dict[str, Any]) -> None:
    """Record what this directory's shards are built for; refuse to add shards of another origin."""
    found = _read_claim(directory)
    if found is None:
        with atomic_open(directory / BUILD_CLAIM) as handle:  # identical content from every process that races here
            json.dump(claim, handle, indent=1)
        return
    differences = fingerprint_differences(found["fingerprint"], claim["fingerprint"], "store")
    if found["shard_rows"] != claim["shard_rows"]:
        differences.append(f"data.shard_rows: store {found['shard_rows']}, this run {claim['shard_rows']}")
    if differences and is_shared(directory):
        raise ConfigError(
            f"token store {directory}: an unfinished build there (by another process now, or interrupted) is for "
            f"other settings than this run's ({'; '.join(differences)}). It is shared by every run of its data and "
            "settings, so it is never replaced for one run. Fix: run with the settings it records (the process "
            "that gets there first finishes it), or set data.cache_dir to a directory of your own"
        )
    if differences:
        raise ConfigError(
            f"data.cache_dir={directory} holds an unfinished token store for other data or settings "
            f"({'; '.join(differences)}). Fix: point data.cache_dir at another directory, or set data.rebuild=true "
            f"to replace the unfinished store in {directory}"
        )


def _build(config: DataConfig, tokenizer, directory: Path, launch: Launch) -> None:
    first = next(read_rows(config.path, config.split), None)
    fmt = input_format(first, config)
    claim = {
        "fingerprint": store_fingerprint(config, tokenizer), "shard_rows": config.shard_rows,
        "token_dtype": token_dtype(len(tokenizer)).name, "source_prefix": source_prefix(first.source),
        "data_path": data_location(config.path),
    }  # fmt: skip
    _claim(directory, claim)
    writer = ShardWriter(config, fmt, tokenizer, directory, np.dtype(claim["token_dtype"]))
    total_rows = _row_estimate(config)
    workers = config.num_workers or _default_workers(total_rows, config.shard_rows, launch)
    if workers == 1 and launch.local_size > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the node's other ranks are tokenizing too
    if launch.is_main:
        print(f"token store {directory}: tokenizing {config.path} with {workers} worker(s) per rank on "
              f"{launch.size} rank(s)", flush=True)  # fmt: skip
    progress = _Progress(total_rows // launch.size if total_rows else None, launch.is_main)
    locks = _ShardLocks(directory)
    try:
        with _Workers(writer, workers) as pool:
            builder = _ShardBuilder(config, directory, writer, pool, locks, progress)
            num_shards = builder.first_pass(lambda shard: shard % launch.size == launch.rank)
            builder.finish(num_shards, launch)
    finally:
        locks.release_all()
        progress.close()
    print(f"token store {directory}: rank {launch.rank} built {builder.built} of {num_shards} shards", flush=True)
    if launch.is_main and read_manifest(directory) is None:
        build = {key: claim[key] for key in ("shard_rows", "token_dtype", "source_prefix", "data_path")}
        rows_file = rows_name
        if config.filters.any:
            filter_store(config, tokenizer, directory, num_shards)
            rows_file = filtered_name
        write_manifest(directory, claim["fingerprint"], build, num_shards, rows_file)


def _default_workers(total_rows: int | None, shard_rows: int, launch: Launch) -> int:
    """This rank's share of the machine's cores; one (the tokenizer's own threads) when the rank has fewer than two
    shards per worker to build: starting a worker costs about 5 CPU-seconds of imports, a third of a 10k-pair build
    on 2 cores (BENCHMARKS.md)."""
    workers = max(1, len(os.sched_getaffinity(0)) // launch.local_size)
    if total_rows is not None and total_rows // launch.size < 2 * workers * shard_rows:
        return 1
    return workers


def _wait_for_manifest(directory: Path, launch: Launch) -> dict:
    waiting = f"rank {launch.rank}: waiting for rank 0's manifest in {directory}"
    _wait(lambda: read_manifest(directory) is not None, waiting)
    return read_manifest(directory)


def _wait(done: Callable[[], bool], message: str) -> None:
    """Watch the file system until `done()`: no collective, so no timeout however long the wait."""
    last_report = time.monotonic()
    while not done():
        time.sleep(POLL_S)
        if time.monotonic() - last_report > REPORT_S:
            print(message, flush=True)
            last_report = time.monotonic()


@dataclass(frozen=True)
class ShardWriter:
    """Normalise, tokenize, truncate and drop-and-count one shard's rows, then write its files. Runs in the building
    process or in a worker; a DataError names the row whichever process raised it."""

    config: DataConfig
    fmt: Format
    tokenizer: Any
    directory: Path
    dtype: np.dtype

    def __call__(self, shard: int, rows: list[Row]) -> int:
        examples = [normalise(row, self.fmt, self.config.columns) for row in rows]
        prepared = prepare_examples(examples, self.config, self.tokenizer)
        write_heads(self.directory, shard, prepared.prompt_heads, self.dtype)  # before the rows file that completes it
        write_shard(self.directory, shard, prepared.pairs, prepared.dropped, prepared.cut, self.dtype)
        return len(rows)


_worker_writer: ShardWriter | None = None


def _start_worker(writer: ShardWriter) -> None:
    global _worker_writer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the builder answers Ctrl-C (_Workers.submit)
    _worker_writer = writer


def _write_in_worker(shard: int, rows: list[Row]) -> int:
    return _worker_writer(shard, rows)


class _Workers:
    """A pool of `count` worker processes, started only when there is more than one shard to build (starting one
    costs a second or two of imports); otherwise this process builds alone.

    Spawned, not forked: a forked child would inherit the builder's shard locks (and outlive a killed builder
    holding them), and fork after the tokenizer's threads have run is unsafe. A spawned worker imports the parent's
    main script: one without an `if __name__ == "__main__":` guard (or a script read from stdin) kills its
    workers, and then this process builds alone, after saying so."""

    def __init__(self, writer: ShardWriter, count: int):
        self.writer = writer
        self.count = count
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, shard: int, rows: list[Row], more_follow: bool) -> Future:
        if self._pool is None and self.count > 1 and more_follow:
            self._pool = ProcessPoolExecutor(self.count, get_context("spawn"), _start_worker, (self.writer,))
        if self._pool is not None:
            # Ctrl-C reaches the whole process group, and the builder decides (its pool ends the workers; a shard
            # being written is never renamed into place), so no worker may print a traceback of its own. The pool
            # starts its workers inside submit: SIGINT blocked in this thread meanwhile, a worker starts with it
            # blocked (the mask survives fork and exec) until its initializer ignores it; here it stays pending and
            # arrives as soon as the mask is restored, so no Ctrl-C is lost.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                return self._pool.submit(_write_in_worker, shard, rows)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        future: Future = Future()
        future.set_result(self.writer(shard, rows))
        return future

    def result(self, shard: int, rows: list[Row], future: Future) -> int:
        """The rows the shard's build consumed; built here instead if the pool broke."""
        try:
            return future.result()
        except BrokenProcessPool as error:
            if self._pool is not None:
                print(f"token store: the worker processes died ({error}); building in this process from now on "
                      "(set data.num_workers=1 to skip them)", flush=True)  # fmt: skip
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool, self.count = None, 1
            return self.writer(shard, rows)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *error: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _ShardLocks:
    """One lock file per shard under .locks/, held with flock while the shard is built. Where the file system does
    not support flock (some NFS or Lustre mounts) every acquire succeeds: processes may then build the same shard,
    which costs time but not correctness (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = directory / ".locks"
        self.directory.mkdir(exist_ok=True)
        self._held: dict[int, int] = {}
        self._supported = True

    def acquire(self, shard: int, wait: bool = False) -> bool:
        descriptor = os.open(self.directory / f"shard-{shard:05d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self._supported:
                fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return False
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"{self.directory}: the file system refuses locks ({error.strerror}); builders may duplicate work")
            self._supported = False
        self._held[shard] = descriptor
        return True

    def release(self, shard: int) -> None:
        os.close(self._held.pop(shard))  # closing the last descriptor releases the flock

    def release_all(self) -> None:
        for shard in list(self._held):
            self.release(shard)


class _Progress:
    """Rows prepared, with rate and ETA, on the first rank (tqdm)."""

    def __init__(self, total_rows: int | None, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, desc="tokenizing", unit="row", dynamic_ncols=True, mininterval=1.0)

    def update(self, rows: int) -> None:
        if self._bar is not None:
            self._bar.update(rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _row_estimate(config: DataConfig) -> int | None:
    """Rows in a plain .jsonl file (its newlines, counted at disk speed) or a Parquet file (its metadata), for the
    progress bar's ETA; None for other inputs, which show the rate alone."""
    path = Path(config.path)
    if path.is_file() and path.name.lower().endswith(".jsonl"):
        with open(path, "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))
    if path.is_file() and path.name.lower().endswith(".parquet"):
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    return None


class _ShardBuilder:
    """Passes over the input, building the wanted shards that nobody else holds, at most two per worker in flight
    (so this process never locks shards far ahead of what it is building)."""

    def __init__(self, config, directory, writer, pool: _Workers, locks: _ShardLocks, progress: _Progress):
        self.config, self.directory, self.writer, self.pool = config, directory, writer, pool
        self.locks, self.progress = locks, progress
        self._in_flight: deque[tuple[int, list[Row], Future]] = deque()
        self.built = 0

    def first_pass(self, wanted: Callable[[int], bool]) -> int:
        """Build the wanted shards that are missing and unlocked; returns how many shards the input has."""
        count = 0
        for shard, rows, more_follow in self._chunks():
            count = shard + 1
            if wanted(shard) and not shard_done(self.directory, shard) and self.locks.acquire(shard):
                self._submit(shard, rows, more_follow)
            elif wanted(shard):
                self.progress.update(len(rows))  # built already, or being built by another process
        self._drain(0)
        return count

    def finish(self, num_shards: int, launch: Launch) -> None:
        """Until every shard exists: build those whose builder died or has not reached them (their lock is free),
        else wait for the ones being built."""
        last_report = time.monotonic()
        while missing := [k for k in range(num_shards) if not shard_done(self.directory, k)]:
            orphans = {k for k in missing if self._unlocked(k)}
            if orphans:
                self.first_pass(orphans.__contains__)
                continue
            time.sleep(POLL_S)
            if time.monotonic() - last_report > REPORT_S:
                print(f"rank {launch.rank}: waiting for {len(missing)} shards other processes are building", flush=True)
                last_report = time.monotonic()

    def _unlocked(self, shard: int) -> bool:
        if not self.locks.acquire(shard):
            return False
        self.locks.release(shard)
        return not shard_done(self.directory, shard)

    def _chunks(self) -> Iterator[tuple[int, list[Row], bool]]:
        """(shard, its rows, whether more rows follow), reading one row ahead."""
        rows = read_rows(self.config.path, self.config.split)
        chunk = list(itertools.islice(rows, self.config.shard_rows))
        while chunk:
            following = next(rows, None)
            yield chunk[0].index // self.config.shard_rows, chunk, following is not None
            chunk = [following, *itertools.islice(rows, self.config.shard_rows - 1)] if following else []

    def _submit(self, shard: int, rows: list[Row], more_follow: bool) -> None:
        self._drain(2 * self.pool.count - 1)
        self._in_flight.append((shard, rows, self.pool.submit(shard, rows, more_follow)))

    def _drain(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            shard, rows, future = self._in_flight.popleft()
            try:
                self.progress.update(self.pool.result(shard, rows, future))
                self.built += 1
            finally:
                self.locks.release(shard)
