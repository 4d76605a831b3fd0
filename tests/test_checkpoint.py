"""checkpoint.py: weights-only files, the atomic write, random states, where a run resumes from."""
import copy
import os
import random

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, resume_path, rng_state, save_checkpoint, set_rng_state
from errors import UserError


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
    import checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    if failure == "write":
        def half_then_fail(obj, f):
            f.write(b"\x80\x02partial" * 100)  # something is on disk when the error comes
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    else:
        def no_rename(src, dst):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(checkpoint.os, "replace", no_rename)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


def load_checkpoint_roundtrip(tmp_path, state):
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    return load_checkpoint(tmp_path / "rng.pt")["rng"]


def test_resume_path_refuses_to_overwrite_a_run(tmp_path):
    assert resume_path(tmp_path, None) is None  # a new run in an empty folder
    assert resume_path(tmp_path, "latest") == str(tmp_path / "checkpoints" / "last.pt")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match="--resume latest"):
        resume_path(tmp_path, None)
    assert resume_path(tmp_path, "other.pt") == "other.pt"


def test_optimizer_state_takes_the_layout_of_its_parameters():
    """A run saved with --memory-format channels-last and resumed contiguous (or the other way):
    the fused Adam pairs state and parameter element by element in memory order, so the loaded
    moments must take the parameters' layout, or the steps after the resume would be wrong."""
    from checkpoint import load_optimizer

    torch.manual_seed(0)
    weight = torch.randn(4, 3, 5, 5)
    grads = [torch.randn(4, 3, 5, 5) for _ in range(3)]

    def adam(layout):
        p = torch.nn.Parameter(weight.clone().contiguous(memory_format=layout))
        return p, torch.optim.Adam([p], lr=0.1, fused=True)

    def step(p, opt, g):
        p.grad = torch.empty_like(p).copy_(g)  # in the parameter's layout, as backward makes it
        opt.step()

    p_nhwc, opt_nhwc = adam(torch.channels_last)
    step(p_nhwc, opt_nhwc, grads[0])
    p_plain, opt_plain = adam(torch.contiguous_format)
    with torch.no_grad():
        p_plain.copy_(p_nhwc)
    load_optimizer(opt_plain, copy.deepcopy(opt_nhwc.state_dict()), "test")  # as from a file: tensors of its own
    assert all(v.stride() == p_plain.stride() for v in opt_plain.state[p_plain].values() if v.dim() > 0)
    for g in grads[1:]:
        step(p_nhwc, opt_nhwc, g)
        step(p_plain, opt_plain, g)
    torch.testing.assert_close(p_plain.detach(), p_nhwc.detach(), rtol=0, atol=1e-6)
