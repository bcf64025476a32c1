"""Checkpoints: DeepSpeed state + run state, a manifest per rank, verified before any load.

Layout of one checkpoint directory (the per-rank parts are merged by Ray Train's upload):
    state.json                 step, data position, world size, ZeRO stage, batch plan
    manifest.rank{R}.json      every file rank R wrote, with size and sha256
    ds/                        DeepSpeed's own files for tag "ds"
A checkpoint at another world size is converted once to DeepSpeed's universal format
(`ds_to_universal`) and loaded with `load_universal`, which keeps the optimizer state.
Nothing here unpickles arbitrary objects: our state is JSON, and DeepSpeed's loader and
converter, which call `torch.load(weights_only=False)`, run under
`safe_load.weights_only_loads()` (weights only, a short allowlist of DeepSpeed data types).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG = "ds"
RUN_NAME = "train"  # Ray Train's run name: checkpoints live in STORAGE/train/checkpoint_*
STATE_FILE = "state.json"
MANIFEST_RE = re.compile(r"manifest\.rank(\d+)\.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is partial, corrupted or missing a shard."""


def write_manifest(ckpt_dir: Path, rank: int) -> None:
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and not MANIFEST_RE.match(p.name))
    fs = _local_fs()
    entries = {str(p.relative_to(ckpt_dir)): {"bytes": p.stat().st_size,
                                               "sha256": _fs_sha256(fs, str(p))}
               for p in files}
    tmp = ckpt_dir / f".manifest.rank{rank}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": entries}, indent=1))
    tmp.replace(ckpt_dir / f"manifest.rank{rank}.json")


def save_rank_checkpoint(engine: Any, ckpt_dir: Path, rank: int, state: dict[str, Any] | None
                         ) -> None:
    """Every rank saves its DeepSpeed shard into its own local dir; rank 0 adds state.json."""
    engine.save_checkpoint(str(ckpt_dir), tag=TAG,
                           client_state={"universal_checkpoint_info": {}})
    if rank == 0 and state is not None:
        (ckpt_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    write_manifest(ckpt_dir, rank)


def storage_fs(storage: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path Ray Train resolves for a storage path or URI (local
    dir, NFS, `s3://`, `gs://`, `hdfs://`, with query options such as `endpoint_override`)."""
    import pyarrow.fs as pafs

    if "://" not in storage:
        return _local_fs(), str(Path(storage).resolve())
    return pafs.FileSystem.from_uri(storage)


def run_storage(storage: str) -> tuple[Any, str]:
    """The filesystem and the run directory holding the `checkpoint_*` dirs."""
    fs, root = storage_fs(storage)
    return fs, f"{root.rstrip('/')}/{RUN_NAME}"


def _local_fs() -> Any:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _fs_sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class VerifiedCheckpoint:
    path: str  # on `fs`: a local path, or the bucket path of a URI storage
    state: dict[str, Any]
    fs: Any = None


def verify_checkpoint(ckpt_dir: str | Path, fs: Any = None,
                      hashed: dict[str, str] | None = None) -> VerifiedCheckpoint:
    """Check state.json and every rank's manifest (sizes and checksums); raise on any gap.

    `fs` is a pyarrow filesystem (local when None), so storage on S3/GCS/HDFS is verified
    in place, before any rank downloads it. `hashed` (checkpoint path -> digest of its
    manifests) records checkpoints whose every byte was hashed already: for those only the
    manifests, the files' presence and sizes are checked, so a checkpoint is read for its
    checksums once, not at every prune and group start (a 1 GB checkpoint: seconds each)."""
    import pyarrow.fs as pafs

    fs = fs or _local_fs()
    path = str(ckpt_dir).rstrip("/")
    try:
        state_bytes = _read(fs, f"{path}/{STATE_FILE}")
        state = json.loads(state_bytes)
    except OSError:
        raise CheckpointError(f"{path}: missing {STATE_FILE}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: {STATE_FILE} is corrupted ({error})") from None
    world_size = int(state["world_size"])
    manifests, digest = [], hashlib.sha256(state_bytes)
    for rank in range(world_size):
        try:
            raw = _read(fs, f"{path}/manifest.rank{rank}.json")
            manifests.append(json.loads(raw))
            digest.update(raw)
        except OSError:
            raise CheckpointError(f"{path}: missing shard manifest of rank {rank}") from None
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: shard manifest of rank {rank} is corrupted") from None
    already = hashed is not None and hashed.get(path) == digest.hexdigest()
    for rank, manifest in enumerate(manifests):
        rels = sorted(manifest["files"])
        infos = fs.get_file_info([f"{path}/{rel}" for rel in rels])
        for rel, info in zip(rels, infos, strict=True):
            meta = manifest["files"][rel]
            if info.type != pafs.FileType.File:
                raise CheckpointError(f"{path}: rank {rank} file {rel} is missing")
            if info.size != meta["bytes"]:
                raise CheckpointError(
                    f"{path}: {rel} has {info.size} bytes, manifest says {meta['bytes']}")
            if not already and _fs_sha256(fs, info.path) != meta["sha256"]:
                raise CheckpointError(f"{path}: {rel} checksum mismatch")
    if hashed is not None:
        hashed[path] = digest.hexdigest()
    return VerifiedCheckpoint(path, state, fs)


CHECKPOINT_NAME_RE = re.compile(r"checkpoint_(\d+)_(\d+)$")


def checkpoint_dir_name(step: int, saved_at_s: float) -> str:
    """Unique per save (a step redone after a rollback must not reuse a registered name),
    and orderable from the name alone, before its state.json has arrived."""
    return f"checkpoint_{step:08d}_{int(saved_at_s * 1000):d}"


def _checkpoints_newest_first(fs: Any, run_dir: str) -> list[str]:
    """`checkpoint_*` dirs of a Ray Train run, newest first: by the step and save time in the
    name, so an upload still in flight sorts where it belongs. Other names sort oldest."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    candidates = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        named = CHECKPOINT_NAME_RE.match(info.base_name)
        key = (int(named[1]), int(named[2])) if named else (-1, 0)
        candidates.append((key, info.base_name, info.path))
    return [path for _, _, path in sorted(candidates, reverse=True)]


def find_latest_valid(run_dir: str | Path, log: Any = None, fs: Any = None,
                      hashed: dict[str, str] | None = None) -> VerifiedCheckpoint | None:
    """Newest checkpoint (by step) under a Ray Train run dir that verifies; skips bad ones."""
    fs = fs or _local_fs()
    for ckpt in _checkpoints_newest_first(fs, str(run_dir)):
        try:
            return verify_checkpoint(ckpt, fs, hashed)
        except CheckpointError as error:
            if log is not None:
                log(f"skipping invalid checkpoint: {error}")
    return None


def prune_checkpoints(run_dir: str | Path, keep: int, fs: Any = None,
                      scores: dict[int, float] | None = None,
                      hashed: dict[str, str] | None = None) -> list[str]:
    """Keep-N that never deletes the last valid checkpoint: walking newest first, every
    checkpoint older than the `keep`-th one that verifies is deleted. Newer ones that do not
    verify stay: an upload still in flight looks exactly like that. With `scores` (eval loss
    by step), the newest valid checkpoint of the best-scored step among those present is kept
    too (`checkpoint.keep_best`). With `hashed` (see verify_checkpoint), a checkpoint is
    hashed by the first prune that counts it and never again. Returns deleted paths."""
    fs = fs or _local_fs()
    newest_first = _checkpoints_newest_first(fs, str(run_dir))
    best = _best_scored(fs, newest_first, scores, hashed) if scores else None
    valid, deleted = 0, []
    for ckpt in newest_first:
        if valid >= keep and ckpt != best:
            fs.delete_dir(ckpt)
            deleted.append(ckpt)
            continue
        try:
            verify_checkpoint(ckpt, fs, hashed)
            valid += 1
        except CheckpointError:
            pass
    if hashed is not None:  # deleted ones need no record
        for ckpt in deleted:
            hashed.pop(ckpt.rstrip("/"), None)
    return deleted


def checkpoint_step(path: str) -> int | None:
    named = CHECKPOINT_NAME_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(named[1]) if named else None


def _best_scored(fs: Any, newest_first: list[str], scores: dict[int, float],
                 hashed: dict[str, str] | None = None) -> str | None:
    """The newest valid checkpoint at the step with the lowest score, among those present."""
    scored = sorted((scores[s], i, c) for i, c in enumerate(newest_first)
                    if (s := checkpoint_step(c)) is not None and s in scores)
    for _, _, ckpt in scored:
        try:
            verify_checkpoint(ckpt, fs, hashed)
            return ckpt
        except CheckpointError:
            continue
    return None


MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
              "vocab_size")


def model_fingerprint(module: Any) -> dict[str, Any]:
    """The shape a checkpoint was trained with, from the (peft-wrapped) model's HF config."""
    config = module.config
    return {key: getattr(config, key, None) for key in MODEL_KEYS}


def check_resumable(state: dict[str, Any], method: str, fingerprint: dict[str, Any],
                    ckpt_dir: str | Path, optim: str | None = None) -> None:
    """A checkpoint of another model, method or optimizer in the run's storage is the wrong
    run's, not a resume point: say so, before a loader fails on mismatched state."""
    if state.get("method", method) != method:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint is a {state['method']} run, the config asks for {method}; "
            "point output_dir (or storage_path) at a new directory")
    if optim is not None and state.get("optim", optim) != optim:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint was trained with optim {state['optim']}, the config asks "
            f"for {optim}; point output_dir (or storage_path) at a new directory")
    saved = state.get("model")
    if saved and saved != fingerprint:
        diff = {k: (saved.get(k), fingerprint.get(k)) for k in MODEL_KEYS
                if saved.get(k) != fingerprint.get(k)}
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint is of another model (checkpoint vs config: {diff}); "
            "point output_dir (or storage_path) at a new directory")


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    return int(state["zero_stage"]) > 0 and int(state["world_size"]) != world_size


def to_universal(ckpt_dir: Path, work_dir: Path | None = None) -> Path:
    """Convert the DeepSpeed tag to universal format in a local dir; returns the load dir."""
    out = Path(work_dir or tempfile.mkdtemp(prefix="eft_universal_"))
    universal_tag = f"{TAG}_universal"
    if (out / universal_tag).exists():
        shutil.rmtree(out / universal_tag)
    from elastic_ft.core.safe_load import convert_to_universal

    try:
        convert_to_universal(str(ckpt_dir / TAG), str(out / universal_tag))
    except Exception as error:
        raise CheckpointError(f"ds_to_universal failed on {ckpt_dir}: {error!r}") from error
    (out / "latest_universal").write_text(universal_tag)
    return out
