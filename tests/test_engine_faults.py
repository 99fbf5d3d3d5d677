"""Faults the engine must survive with a clear message: NaN loss, malicious or foreign checkpoint files,
a full disk while writing a checkpoint, a data set smaller than a batch, bad image files during training."""

import errno
import os
import pickle

import pytest
import torch
from PIL import Image

from ssd.config import load_config
from ssd.engine import checkpoint as ckpt
from ssd.engine.trainer import NonFiniteLossError
from ssd.methods.dino import DINO
from ssd.train import run
from tests.tiny import tiny_overrides


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path, monkeypatch):
    # No memory probe: its two forward calls would count towards the patched forward's step count.
    cfg = load_config(None, tiny_overrides(tmp_path, "nan", "train.max_steps=8", "train.memory_check=false"))
    original = DINO.forward
    calls = {"n": 0}

    def forward_that_diverges(self, batch, schedule):
        loss, outputs = original(self, batch, schedule)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), outputs

    monkeypatch.setattr(DINO, "forward", forward_that_diverges)
    with pytest.raises(NonFiniteLossError) as error:
        run(cfg)
    message = str(error.value)
    assert "at step 4" in message and "checkpoint_00000003.pt" in message
    assert (tmp_path / "nan" / "checkpoint_00000003.pt").exists()
    ckpt.load_checkpoint(tmp_path / "nan" / "checkpoint_00000003.pt")  # the kept checkpoint is intact


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ssd-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "checkpoint_00000001.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "ssd.checkpoint", "payload": Exploit()}, handle)
    with pytest.raises(ckpt.CheckpointError, match="refused for safety|cannot read checkpoint"):
        ckpt.load_checkpoint(path)
    assert not os.path.exists("/tmp/ssd-pwned")
    assert ckpt.find_latest_checkpoint(tmp_path) is None


def test_foreign_file_and_missing_file(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an ssd checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not found: .*nothing.pt"):
        ckpt.load_checkpoint(tmp_path / "nothing.pt")


def test_full_disk_keeps_previous_checkpoints_and_says_so(tmp_path, monkeypatch):
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {"step": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(ckpt.CheckpointError, match="no space left to write checkpoint .*checkpoint_00000002.pt"):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 2), {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_00000001.pt"]  # no temporary file left
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_00000001.pt")["step"] == 1


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"step": step})
        ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_00000004.pt", "checkpoint_00000005.pt"]


def test_dataset_smaller_than_a_batch(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "small", "train.batch_size=64"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(cfg)


def test_training_on_a_folder_with_broken_images_skips_them(tmp_path):
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for index in range(10):
        Image.new("RGB", (40, 40), (index * 20, 100, 200 - index * 10)).save(folder / f"{index}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("ignored")
    overrides = tiny_overrides(tmp_path, "folder", "data.dataset=imagefolder", f"data.root={tmp_path / 'images'}",
                               "train.batch_size=4", "train.max_steps=3")
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = run(load_config(None, overrides))
    assert result["status"] == "finished" and result["step"] == 3
