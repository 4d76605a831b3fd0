"""Reliability: bit-identical resume of both stages, crash-safe checkpoints, signals, non-finite
steps, bad data listed once, bad configurations, untrusted checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import training_transformer
import training_vqgan
from config import parse_train_transformer, parse_train_vqgan
from conftest import ROOT, write_images
from test_training_vqgan import TINY_FLAGS, cli
from utils import load_checkpoint

STAGE1 = [*TINY_FLAGS, "--disc-start", "1", "--codebook-ema", "0.9", "--codebook-restart-after", "1",
          "--codebook-kmeans-init", "--log-every", "1", "--sample-every", "100", "--save-every", "2", "--val-fraction", "0.2"]
STAGE2 = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
          "--num-samples", "2", "--lr-warmup-steps", "1", "--pkeep", "0.7", "--log-every", "1", "--sample-every", "100",
          "--save-every", "2", "--val-fraction", "0.2", "--augment"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rel") / "images"
    write_images(folder, n=12, size=(24, 24))
    return folder


def assert_same_state(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_resume_is_bit_identical(train, common, tmp_path, keys):
    """4 steps straight, and 2 steps + resume + 2 steps, end in the same checkpoint entries."""
    train([*common, "--output-dir", str(tmp_path / "a"), "--max-steps", "4"])
    train([*common, "--output-dir", str(tmp_path / "b"), "--max-steps", "2"])
    train([*common, "--output-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume", "latest"])
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in keys:
        assert_same_state(a[key], b[key], key)


def test_stage1_resume_is_bit_identical(images, tmp_path):
    """Weights, optimizer and scaler states (GAN on from step 1; EMA codebook with k-means init and
    restarts)."""
    assert_resume_is_bit_identical(lambda argv: training_vqgan.main(parse_train_vqgan(argv)),
                                   ["--dataset-path", str(images), *STAGE1], tmp_path,
                                   ("model", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng"))


def test_stage2_resume_is_bit_identical(images, tmp_path):
    vq = tmp_path / "vq"
    training_vqgan.main(parse_train_vqgan(["--dataset-path", str(images), *TINY_FLAGS, "--output-dir", str(vq),
                                           "--max-steps", "1"]))
    assert_resume_is_bit_identical(lambda argv: training_transformer.main(parse_train_transformer(argv)),
                                   ["--dataset-path", str(images), "--vqgan-checkpoint",
                                    str(vq / "checkpoints" / "last.pt"), *STAGE2], tmp_path,
                                   ("model", "optimizer", "scaler", "rng"))


# ------------------------------------------------------------------------------ crashes, signals
def test_kill_9_while_saving_leaves_a_loadable_last_pt(tmp_path):
    """A process that keeps overwriting last.pt with a large checkpoint is killed with SIGKILL
    at different moments; each time the file loads and is one complete checkpoint."""
    target = tmp_path / "last.pt"
    script = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); from utils import save_checkpoint\n"
              "i = 0\n"
              "while True:\n"
              f"    save_checkpoint({{'step': i, 'w': torch.full((4_000_000,), float(i))}}, {str(target)!r})\n"
              "    i += 1\n")
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(target)
        assert ckpt["w"].shape == (4_000_000,) and bool((ckpt["w"] == ckpt["step"]).all())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_0(images, tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "training_vqgan.py"), "--dataset-path", str(images),
                             "--output-dir", str(out), *TINY_FLAGS, "--max-steps", "100000", "--log-every", "1",
                             "--save-every", "100000", "--sample-every", "100000", "--max-bad-fraction", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # training has started
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Resume with: python" in stdout and "--resume latest" in stdout
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert ckpt["step"] == len(logged) > 0  # the checkpoint is of the last finished step


# --------------------------------------------------------------------------------- NaN steps
def test_non_finite_loss_skips_the_step(tiny_cfg):
    from test_training_vqgan import batch, stage1

    s = stage1(tiny_cfg, disc_start=0)
    x = batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model = [p.detach().clone() for p in s.model.parameters()]
    disc = [p.detach().clone() for p in s.disc.parameters()]
    adam_state = len(s.opt_g.state)
    logs = training_vqgan.train_step(s, bad, step=0)
    assert logs["skipped"].item() == 1 and not torch.isfinite(logs["loss"])
    assert all(torch.equal(a, b) for a, b in zip(model, s.model.parameters()))  # no update
    assert all(torch.equal(a, b) for a, b in zip(disc, s.disc.parameters()))
    assert len(s.opt_g.state) == adam_state == 0  # the optimizer did not even count the step
    logs = training_vqgan.train_step(s, x, step=1)  # a finite batch trains as usual
    assert logs["skipped"].item() == 0 and any(not torch.equal(a, b) for a, b in zip(model, s.model.parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_encoder_output_leaves_the_ema_codebook_alone(bad):
    from codebook import VectorQuantizer

    vq = VectorQuantizer(n_embed=8, embed_dim=4, ema_decay=0.9, restart_after=1).train()
    vq(torch.randn(2, 4, 3, 3))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    z[0, :, 0, :2] = bad  # two whole vectors
    vq(z)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_skipped_step_leaves_the_codebook_as_it_was(tiny_cfg, monkeypatch):
    """The encoder output is finite but the loss is not (here: a NaN perceptual term): the EMA
    update and restarts made during the forward pass are undone with the skipped step."""
    import dataclasses

    from test_training_vqgan import batch, stage1

    cfg = dataclasses.replace(tiny_cfg, codebook_ema=0.9, codebook_restart_after=1)
    s = stage1(cfg, disc_start=10**9)
    training_vqgan.train_step(s, batch(0), step=0)
    before = {k: v.clone() for k, v in s.model.quantize.state_dict().items()}
    s.perceptual = lambda x, y: torch.full((x.shape[0],), float("nan"))
    monkeypatch.setattr(s.cfg, "perceptual_loss_factor", 1.0)
    logs = training_vqgan.train_step(s, batch(1), step=1)
    assert logs["skipped"].item() == 1
    for k, v in s.model.quantize.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "codes_restarted" not in logs  # the undone restarts are not reported


def test_too_many_bad_steps_in_a_row_save_and_stop(images, tmp_path, monkeypatch):
    real = training_vqgan.train_step

    def poisoned(s, x, step):  # every batch from step 2 on carries a NaN
        if step >= 2:
            x = [xi.clone().fill_(float("nan")) for xi in x]
        return real(s, x, step)

    monkeypatch.setattr(training_vqgan, "train_step", poisoned)
    out = tmp_path / "run"
    cfg = parse_train_vqgan(["--dataset-path", str(images), "--output-dir", str(out), *TINY_FLAGS,
                             "--max-steps", "50", "--max-bad-steps", "3", "--log-every", "1"])
    with pytest.raises(training_vqgan.UserError, match="3 steps in a row had non-finite"):
        training_vqgan.main(cfg)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5  # 2 good steps, 3 skipped ones, then saved
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in lines if "skipped" in m] == [0, 0, 1, 1]  # the fourth line is not logged yet


# ------------------------------------------------------------------------------------ bad data
def bad_files(folder):
    """One file of each kind that must be skipped, by name."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])  # the header is intact
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.new("1", (10000, 9000)).save(folder / "bomb.png")  # 90M pixels, over Pillow's limit
    Image.fromarray(noise).save(folder / "icon.bmp", format="ICO")  # a format we do not open
    (folder / "notes.txt").write_text("not an image file name: never considered")
    return {str(folder / n) for n in ("truncated.png", "empty.jpg", "text.png", "bomb.png", "icon.bmp")}


def test_bad_files_are_skipped_and_listed_once(tmp_path):
    data = tmp_path / "data"
    write_images(data, n=12, size=(24, 24))
    bad = bad_files(data / "bad")
    out = tmp_path / "run"
    r = cli("--dataset-path", str(data), "--output-dir", str(out), *TINY_FLAGS, "--epochs", "2",
            "--max-bad-fraction", "0.5", "--val-fraction", "0.2", "--log-every", "1", "--sample-every", "1000")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in lines} == bad and len(lines) == len(bad)  # each exactly once
    assert all(line.split("\t")[1] for line in lines)  # with its reason
    # more bad files than allowed: one clear message before training
    r = cli("--dataset-path", str(data), "--output-dir", str(tmp_path / "run2"), *TINY_FLAGS, "--max-steps", "1",
            "--max-bad-fraction", "0.1")
    assert r.returncode == 2 and "--max-bad-fraction" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize("case", ["batch_too_big", "unwritable_output", "stage2_as_vqgan", "malicious_resume"])
def test_bad_configuration_exits_2_before_training(images, tmp_path, case):
    args = ["--dataset-path", str(images), "--output-dir", str(tmp_path / "run"), *TINY_FLAGS, "--max-steps", "1"]
    marker = tmp_path / "payload_ran"
    if case == "batch_too_big":
        args += ["--batch-size", "64"]
        expect = "larger than the"
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("x")
        args[3] = str(tmp_path / "file" / "run")  # a folder inside a file
        expect = "cannot write to the output folder"
    elif case == "malicious_resume":
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        torch.save({"kind": "vqgan", "payload": Payload()}, tmp_path / "evil.pt")
        args += ["--resume", str(tmp_path / "evil.pt")]
        expect = "not a stage-1 training checkpoint"
    else:  # a stage-2 checkpoint where stage 2 needs its VQGAN
        torch.save({"kind": "transformer", "model": {}}, tmp_path / "gpt.pt")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "training_transformer.py"), "--dataset-path",
                            str(images), "--vqgan-checkpoint", str(tmp_path / "gpt.pt"), "--output-dir",
                            str(tmp_path / "t"), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=240)
        assert r.returncode == 2 and "not a VQGAN checkpoint" in r.stderr and "Traceback" not in r.stderr
        return
    r = cli(*args)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not marker.exists()  # the pickled payload never ran
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
