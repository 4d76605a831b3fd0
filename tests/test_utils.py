"""utils.py: atomic checkpoints, random states, the run folder, PSNR, the learning-rate schedule."""
import os
import random

import numpy as np
import pytest
import torch

from utils import RunFolder, load_checkpoint, lr_at, rng_state, save_checkpoint, set_rng_state


def test_checkpoint_is_weights_only_and_random_states_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    obj = {"w": torch.arange(3), "step": 7, "cfg": {"a": [1, 2]}, "rng": rng_state()}
    save_checkpoint(obj, path)
    assert os.listdir(tmp_path) == ["c.pt"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["w"], obj["w"])
    torch.manual_seed(5)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(99)
    set_rng_state(load_checkpoint_roundtrip(tmp_path, state))
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]
    assert random.random() == expected[2]


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """The write dies after half the bytes (disk full) or the final rename fails: the previous
    last.pt still loads, and no temporary file is left behind."""
    import utils

    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    if failure == "write":
        def half_then_fail(obj, f):
            f.write(b"\x80\x02partial" * 100)  # something is on disk when the error comes
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(utils.torch, "save", half_then_fail)
    else:
        def no_rename(src, dst):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(utils.os, "replace", no_rename)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


def load_checkpoint_roundtrip(tmp_path, state):
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    return load_checkpoint(tmp_path / "rng.pt")["rng"]


def test_run_folder_keeps_the_newest_snapshots(tmp_path):
    run = RunFolder(str(tmp_path / "run"), {"a": 1}, keep=2)
    for step in (1, 2, 3):
        run.save({"step": step}, step)
    names = sorted(p.name for p in run.ckpt_dir.iterdir())
    assert names == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert load_checkpoint(run.last)["step"] == 3 and load_checkpoint(run.ckpt_dir / "step_0000002.pt")["step"] == 2
    run.log_metrics(3, {"loss": 0.5})
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip() == '{"step": 3, "loss": 0.5}'


def test_lr_schedule():
    assert lr_at(0, 1.0, warmup_steps=4) == 0.25 and lr_at(10, 1.0, warmup_steps=4) == 1.0
    assert lr_at(100, 1.0, 0, 100, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 1.0, 0, 100, "cosine") == pytest.approx(0.55)
