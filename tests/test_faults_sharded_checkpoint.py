"""Sharded checkpoint folders (checkpoint.format=sharded, what FSDP runs write) under the faults a single file
meets: a resume that must be bitwise, a slice cut short, a hostile index, a write killed midway."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

from ssd.engine import checkpoint as ckpt
from tests.tiny import assert_bitwise_equal, final_weights, run_training, tiny_overrides

SHARDED = ("checkpoint.format=sharded", "checkpoint.keep=0", "train.max_steps=6")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A finished one-process run with sharded checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("sharded")
    run_training(tiny_overrides(root, "run", *SHARDED))
    return root / "run"


def copy_run(run_dir, tmp_path, name="copy"):
    return shutil.copytree(run_dir, tmp_path / name)


def test_a_sharded_run_trains_as_a_file_run_and_resumes_bitwise(sharded_run, tmp_path):
    run_training(tiny_overrides(tmp_path, "file", *SHARDED, "checkpoint.format=file"))
    assert [p.name for p in ckpt.list_checkpoints(sharded_run)] == ["checkpoint_00000003.dcp",
                                                                    "checkpoint_00000006.dcp"]
    assert_bitwise_equal(final_weights(sharded_run), final_weights(tmp_path / "file"))
    resumed = copy_run(sharded_run, tmp_path)
    shutil.rmtree(resumed / "checkpoint_00000006.dcp")
    result = run_training(tiny_overrides(tmp_path, "copy", *SHARDED))
    assert "resumed from" in result.stderr and "at step 3" in result.stderr
    assert_bitwise_equal(final_weights(resumed), final_weights(tmp_path / "file"))
    assert ckpt.load_checkpoint(resumed, whole=True)["optimizer"]["state"].keys() == \
        ckpt.load_checkpoint(tmp_path / "file", whole=True)["optimizer"]["state"].keys()


def test_a_truncated_slice_is_reported_set_aside_and_the_run_resumes_from_the_previous(sharded_run, tmp_path):
    run_dir = copy_run(sharded_run, tmp_path)
    shard = run_dir / "checkpoint_00000006.dcp" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)  # a copy cut short
    with pytest.raises(ckpt.CheckpointError, match="shorter than the index says"):
        ckpt.load_checkpoint(run_dir / "checkpoint_00000006.dcp")
    result = run_training(tiny_overrides(tmp_path, "copy", *SHARDED))
    assert "skipping unreadable checkpoint" in result.stderr and "at step 3" in result.stderr
    assert (run_dir / "superseded" / "checkpoint_00000006.dcp").is_dir()  # kept, not deleted
    assert_bitwise_equal(final_weights(run_dir), final_weights(sharded_run))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_index_that_would_run_code_is_refused(sharded_run, tmp_path):
    from ssd.checkpoint_import import WeightsError, read_weights_file

    folder = copy_run(sharded_run / "checkpoint_00000006.dcp", tmp_path, "checkpoint_00000006.dcp")
    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ckpt.CheckpointError, match="posix.system has no place in a checkpoint index"):
        ckpt.load_checkpoint(folder)
    with pytest.raises(WeightsError, match="cannot read sharded checkpoint"):
        read_weights_file(folder)  # what export and evaluation call
    assert not marker.exists()


def test_an_index_naming_files_outside_the_folder_is_refused(sharded_run, tmp_path):
    from ssd.engine.sharded_checkpoint import _SafeReader

    folder = copy_run(sharded_run / "checkpoint_00000006.dcp", tmp_path, "checkpoint_00000006.dcp")
    metadata = _SafeReader(folder).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ckpt.CheckpointError, match="not a file of this folder"):
        ckpt.load_checkpoint(folder)


def test_a_folder_left_by_a_killed_write_is_removed_and_never_resumed(sharded_run, tmp_path):
    run_dir = copy_run(sharded_run, tmp_path)
    partial = run_dir / ".checkpoint_00000009.dcp.tmp-partial"  # as a SIGKILL during the write leaves it
    shutil.copytree(run_dir / "checkpoint_00000006.dcp", partial)
    (partial / "state.pt").unlink()
    result = run_training(tiny_overrides(tmp_path, "copy", *SHARDED[:-1], "train.max_steps=9"))
    assert "was being written when its process died" in result.stderr
    assert "resumed from" in result.stderr and "at step 6" in result.stderr
    assert not partial.exists() and ckpt.step_of(ckpt.list_checkpoints(run_dir)[-1]) == 9


def test_export_and_resume_from_name_a_sharded_folder(sharded_run, tmp_path):
    from ssd.export import load_export
    from ssd.export import main as export

    out = export([str(sharded_run / "checkpoint_00000003.dcp"), "--output", str(tmp_path / "export")])
    weights = ckpt.load_checkpoint(sharded_run / "checkpoint_00000003.dcp", whole=True)["method"]
    for key, value in load_export(out).state_dict().items():
        assert (value == weights[f"teacher.backbone.{key}"]).all(), key
    run_dir = copy_run(sharded_run, tmp_path)
    result = run_training(tiny_overrides(tmp_path, "copy", *SHARDED, "train.resume_from=3"))
    assert "at step 3" in result.stderr
    assert (run_dir / "superseded" / "checkpoint_00000006.dcp").is_dir()
