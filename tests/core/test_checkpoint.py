from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from elastic_ft.core.checkpoint import (
    STATE_FILE,
    CheckpointError,
    check_resumable,
    checkpoint_dir_name,
    find_latest_valid,
    prune_checkpoints,
    run_storage,
    verify_checkpoint,
    write_manifest,
)

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 1000}


def test_same_model_and_method_resume() -> None:
    check_resumable({"method": "lora", "model": dict(TINY)}, "lora", dict(TINY), "ckpt")
    check_resumable({"method": "lora"}, "lora", dict(TINY), "ckpt")  # written before the field


def test_another_models_checkpoint_is_named_not_loaded() -> None:
    other = dict(TINY, hidden_size=512, vocab_size=32000)
    with pytest.raises(CheckpointError) as error:
        check_resumable({"method": "lora", "model": dict(TINY)}, "lora", other, "runs/x/ckpt")
    message = str(error.value)
    assert "runs/x/ckpt" in message and "another model" in message
    assert "'hidden_size': (64, 512)" in message and "'vocab_size': (1000, 32000)" in message
    assert "num_hidden_layers" not in message  # only what differs


def test_another_methods_checkpoint_is_named_not_loaded() -> None:
    with pytest.raises(CheckpointError, match="checkpoint is a full run, the config asks for lora"):
        check_resumable({"method": "full", "model": dict(TINY)}, "lora", dict(TINY), "c")


def test_another_optimizers_checkpoint_is_named_not_loaded() -> None:
    # LOMO's checkpoint holds weights and a loss scale, AdamW's DeepSpeed shards and moments
    with pytest.raises(CheckpointError, match="trained with optim lomo, the config asks for "
                                              "adamw"):
        check_resumable({"method": "full", "optim": "lomo"}, "full", dict(TINY), "c", "adamw")
    check_resumable({"method": "full"}, "full", dict(TINY), "c", "lomo")  # before the field


def _checkpoint(run: Path, step: int, world_size: int = 2) -> Path:
    """A checkpoint as the workers write it: per-rank shard files and manifests, state.json."""
    ckpt = run / checkpoint_dir_name(step, 1 + step / 1000)  # checkpoint_000000SS_1SSS
    for rank in range(world_size):
        (ckpt / f"rank{rank}" / "ds").mkdir(parents=True)
        (ckpt / f"rank{rank}" / "ds" / "shard.pt").write_bytes(os.urandom(256))
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world_size}))
    for rank in range(world_size):
        write_manifest(ckpt, rank)
    return ckpt


def _truncate(ckpt: Path) -> None:
    shard = ckpt / "rank1" / "ds" / "shard.pt"
    shard.write_bytes(shard.read_bytes()[:100])


def _steps(run: Path) -> list[int]:
    return sorted(json.loads((c / STATE_FILE).read_text())["step"]
                  for c in run.glob("checkpoint_*"))


def test_verify_names_what_is_wrong(tmp_path) -> None:
    ckpt = _checkpoint(tmp_path, 10)
    assert verify_checkpoint(ckpt).state["step"] == 10
    _truncate(ckpt)
    with pytest.raises(CheckpointError, match="has 100 bytes, manifest says 256"):
        verify_checkpoint(ckpt)
    other = _checkpoint(tmp_path, 20)
    (other / "manifest.rank1.json").unlink()
    with pytest.raises(CheckpointError, match="missing shard manifest of rank 1"):
        verify_checkpoint(other)


def test_keep_n_deletes_the_oldest(tmp_path) -> None:
    for step in (10, 20, 30, 40, 50):
        _checkpoint(tmp_path, step)
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert len(deleted) == 3 and _steps(tmp_path) == [40, 50]
    assert prune_checkpoints(tmp_path, keep=2) == []


def test_keep_best_keeps_the_best_eval_loss_besides_the_newest(tmp_path) -> None:
    for step in (10, 20, 30, 40, 50):
        _checkpoint(tmp_path, step)
    scores = {10: 2.0, 20: 1.5, 25: 0.1, 30: 1.7, 40: 1.9, 50: 2.1}  # 25: an eval, no ckpt
    prune_checkpoints(tmp_path, keep=2, scores=scores)
    assert _steps(tmp_path) == [20, 40, 50]
    _truncate(tmp_path / "checkpoint_00000020_1020")  # the best no longer loads: next best
    _checkpoint(tmp_path, 60)
    prune_checkpoints(tmp_path, keep=1, scores=scores)
    assert _steps(tmp_path) == [40, 60]
    prune_checkpoints(tmp_path, keep=1)  # without scores: keep-N alone
    assert _steps(tmp_path) == [60]


def test_keep_n_never_deletes_the_last_valid_checkpoint(tmp_path) -> None:
    """Ray's num_to_keep=1 would keep only step 50, which no longer loads: the run could then
    only start over. Ours keeps the newest checkpoint that verifies, and the newer bad ones
    (an upload in flight looks the same) for inspection."""
    for step in (10, 20, 30, 40, 50):
        _checkpoint(tmp_path, step)
    _truncate(tmp_path / "checkpoint_00000050_1050")
    (tmp_path / "checkpoint_00000040_1040" / "manifest.rank1.json").unlink()  # in flight
    prune_checkpoints(tmp_path, keep=1)
    assert _steps(tmp_path) == [30, 40, 50]
    assert find_latest_valid(tmp_path).state["step"] == 30
    for step in (60, 70):  # newer valid ones arrive: the bad ones age out like any other
        _checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=1)
    assert _steps(tmp_path) == [70]


def test_each_checkpoint_is_hashed_once_then_checked_by_size(tmp_path, monkeypatch) -> None:
    """A run's prunes and group starts share one record of the checkpoints hashed in full:
    each file's checksum is read once; afterwards manifests and sizes are checked, which
    still catch a partial or missing file (a new manifest is hashed again)."""
    from elastic_ft.core import checkpoint

    reads: list[str] = []
    original = checkpoint._fs_sha256
    monkeypatch.setattr(checkpoint, "_fs_sha256",
                        lambda fs, path: reads.append(path) or original(fs, path))
    hashed: dict[str, str] = {}
    entries = 2 * 3  # the helper's 2 manifests list the same 3 files
    verified: list[str] = []
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
        reads.clear()  # writing the manifests hashed the files: count the checks alone
        prune_checkpoints(tmp_path, keep=2, hashed=hashed)
        verified += reads
    assert _steps(tmp_path) == [20, 30] and len(hashed) == 2
    assert len(verified) == 3 * entries  # each new checkpoint once, none again
    reads.clear()
    assert find_latest_valid(tmp_path, hashed=hashed).state["step"] == 30
    assert reads == []  # the group start's check read no checksum
    _truncate(tmp_path / "checkpoint_00000030_1030")  # still caught: by its size
    assert find_latest_valid(tmp_path, hashed=hashed).state["step"] == 20
    rewritten = _checkpoint(tmp_path / "other", 40)
    hashed[str(rewritten)] = "a digest of other manifests"  # same path, new manifests
    reads.clear()
    verify_checkpoint(rewritten, hashed=hashed)
    assert len(reads) == entries  # hashed anew
    reads.clear()
    verify_checkpoint(tmp_path / "checkpoint_00000020_1020")  # no record: every byte
    assert len(reads) == entries


def test_prune_keeps_an_upload_in_flight(tmp_path) -> None:
    """An upload still in flight may not have its state.json yet: it is ordered by its name,
    so it is the newest, and kept."""
    for step in (10, 20):
        _checkpoint(tmp_path, step)
    in_flight = tmp_path / checkpoint_dir_name(30, 1.03) / "rank0" / "ds"
    in_flight.mkdir(parents=True)
    (in_flight / "shard.pt").write_bytes(os.urandom(64))
    deleted = prune_checkpoints(tmp_path, keep=1)
    assert [Path(d).name for d in deleted] == ["checkpoint_00000010_1010"]
    assert in_flight.exists()


def test_verify_find_and_prune_in_place_on_s3(s3_storage, tmp_path) -> None:
    """The same checks over a pyarrow S3 filesystem (moto's real S3 API on 127.0.0.1)."""
    import pyarrow.fs as pafs

    for step in (10, 20, 30):
        _checkpoint(tmp_path / "local", step)
    _truncate(tmp_path / "local" / "checkpoint_00000030_1030")
    fs, run_dir = run_storage(s3_storage)
    assert isinstance(fs, pafs.S3FileSystem) and run_dir.endswith("/runs/train")
    pafs.copy_files(str(tmp_path / "local"), run_dir, destination_filesystem=fs)
    skipped: list[str] = []
    latest = find_latest_valid(run_dir, log=skipped.append, fs=fs)
    assert latest is not None and latest.state["step"] == 20 and latest.fs is fs
    assert len(skipped) == 1 and "checkpoint_00000030_1030" in skipped[0]
    assert "manifest says 256" in skipped[0]
    deleted = prune_checkpoints(run_dir, keep=1, fs=fs)
    assert [d.rsplit("/", 1)[-1] for d in deleted] == ["checkpoint_00000010_1010"]
