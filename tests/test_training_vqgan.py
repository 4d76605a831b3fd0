"""Stage-1 training: gradient isolation of the two steps, learning, determinism, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from config import TrainVQGANConfig
from conftest import ROOT, write_images
from training_vqgan import build_stage1, discriminator_step, generator_step, train_step
from utils import load_checkpoint, seed_everything
from vqgan import VQGAN


def stage1(tiny_cfg, **kw):
    seed_everything(0)
    cfg = TrainVQGANConfig(model=tiny_cfg, perceptual_loss_factor=0, batch_size=4, learning_rate=1e-3,
                           disc_ndf=16, disc_layers=2, **kw)
    return build_stage1(cfg, torch.device("cpu"), None)


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def test_generator_step_gives_no_gradient_to_the_discriminator(tiny_cfg):
    s = stage1(tiny_cfg, disc_start=0)
    before = [p.detach().clone() for p in s.disc.parameters()]
    logs, x_rec, _ = generator_step(s, batch(), step=0)
    assert logs["g_loss"].item() != 0 and logs["d_weight"].item() > 0  # the GAN term was active
    assert all(p.grad is None for p in s.disc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, s.disc.parameters()))
    assert all(p.requires_grad for p in s.disc.parameters())  # unfrozen again afterwards
    assert s.model.decoder.conv_out.weight.grad is not None
    assert not x_rec.requires_grad


def test_discriminator_step_gives_no_gradient_to_the_vqgan(tiny_cfg):
    s = stage1(tiny_cfg, disc_start=0)
    x = batch()
    x_rec, _, _ = s.model(x)  # not detached on purpose: the step must detach it
    s.model.zero_grad(set_to_none=True)
    params = [p.detach().clone() for p in s.model.parameters()]
    logs = discriminator_step(s, x, x_rec, step=0)
    assert logs["d_loss"].item() > 0
    assert all(p.grad is None for p in s.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, s.model.parameters()))
    assert all(p.grad is not None for p in s.disc.parameters())


def test_no_discriminator_work_before_disc_start(tiny_cfg):
    s = stage1(tiny_cfg, disc_start=10)
    logs = train_step(s, batch(), step=9)
    assert "d_loss" not in logs and logs["g_loss"].item() == 0
    assert all(p.grad is None for p in s.disc.parameters())
    assert "d_loss" in train_step(s, batch(), step=10)


def test_adaptive_weight_in_the_step_matches_a_hand_computation(tiny_cfg):
    s = stage1(tiny_cfg, disc_start=0, disc_weight=0.5)
    x = batch()
    logs, _, _ = generator_step(s, x, step=0)
    # recompute by hand on an identical, untouched copy (same seed)
    s2 = stage1(tiny_cfg, disc_start=0, disc_weight=0.5)
    x_rec, _, _ = s2.model(x)
    nll = (x - x_rec).abs().mean()
    g = -s2.disc(torch.cat([x, x_rec]))[4:].mean()  # fakes scored inside a real+fake batch
    last = s2.model.decoder.conv_out.weight
    g_nll, = torch.autograd.grad(nll, last, retain_graph=True)
    g_g, = torch.autograd.grad(g, last)
    expected = 0.5 * (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4)
    assert logs["d_weight"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_overfitting_one_batch_halves_l1(tiny_cfg):
    s = stage1(tiny_cfg, disc_start=10**9)
    x = batch(n=4)
    first = None
    for step in range(100):
        logs = train_step(s, x, step)
        first = first if first is not None else logs["rec_loss"].item()
    assert logs["rec_loss"].item() < 0.5 * first


def test_same_seed_same_losses(tiny_cfg):
    runs = []
    for _ in range(2):
        s = stage1(tiny_cfg, disc_start=1)
        runs.append([train_step(s, batch(i), i)["loss"].item() for i in range(3)])
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------- CLI
TINY_FLAGS = ["--ch", "32", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
              "--image-size", "16", "--latent-dim", "16", "--num-codebook-vectors", "32", "--batch-size", "2",
              "--disc-ndf", "8", "--disc-layers", "1", "--num-workers", "0", "--perceptual-loss-factor", "0",
              "--device", "cpu"]


def cli(*args, timeout=240):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
           # nothing may be downloaded: a closed local port as proxy makes any attempt fail at once
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "training_vqgan.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cli_trains_on_a_folder_with_bad_files_and_resumes(tmp_path):
    data = tmp_path / "data"
    write_images(data, n=6, size=(20, 24))
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (data / "readme.png").write_text("not an image")
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--max-bad-fraction", "0.5"]  # 2 of the 8 files are bad
    r = cli("--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "3", "--disc-start", "2",
            "--log-every", "1", "--sample-every", "3", "--save-every", "2", *flags)
    assert r.returncode == 0, r.stderr
    assert str(data / "corrupt.jpg") in r.stderr and str(data / "readme.png") in r.stderr
    assert "validation PSNR before training" in r.stdout and "validation PSNR after 3 steps" in r.stdout
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "metrics.jsonl", "samples", "skipped_files.txt"]
    assert (out / "skipped_files.txt").read_text().count("\n") == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert os.listdir(out / "samples") == ["step_0000003.png"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert "d_loss" in train_lines[-1] and "d_loss" not in train_lines[0]
    for key in ("rec_loss", "q_loss", "g_loss", "d_weight", "usage", "perplexity", "lr", "step_time"):
        assert key in train_lines[-1]
    assert any("val_psnr" in m for m in lines)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_embed"] == 32 and config["dataset_path"] == str(data)

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "model_config", "discriminator", "opt_g", "opt_d", "step", "train_config", "rng"):
        assert key in ckpt
    assert ckpt["step"] == 3
    model = VQGAN.from_checkpoint(out / "checkpoints" / "last.pt")
    assert model(torch.zeros(1, 3, 16, 16))[1].shape == (1, 8, 8)

    # a second run into the same folder must not overwrite it ...
    r = cli("--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "5", *flags)
    assert r.returncode == 2 and "--resume latest" in r.stderr and "Traceback" not in r.stderr
    # ... and --resume latest continues the step count
    r = cli("--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "5", "--resume", "latest",
            "--log-every", "1", *flags)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 5
    # resuming with another architecture is refused with the difference named
    r = cli("--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "6", "--resume", "latest",
            *flags, "--num-codebook-vectors", "64")
    assert r.returncode == 2 and "n_embed=32 (flags say 64)" in r.stderr
    assert json.loads((out / "config.json").read_text())["model"]["n_embed"] == 32  # the run folder is untouched


@pytest.mark.parametrize("case", ["empty", "missing", "no_vgg", "bad_size", "batch_zero", "resume_missing"])
def test_cli_user_errors_exit_2_with_one_message(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    args = ["--dataset-path", str(data), "--output-dir", str(tmp_path / "run"), *TINY_FLAGS]
    if case == "missing":
        args[1] = str(tmp_path / "nowhere")
    if case == "no_vgg":
        write_images(data, n=4, size=(20, 20))
        args += ["--perceptual-loss-factor", "1", "--vgg-weights", str(tmp_path / "vgg.pth")]
    if case == "bad_size":
        args += ["--image-size", "15"]
    if case == "batch_zero":
        args += ["--batch-size", "0"]
    if case == "resume_missing":
        write_images(data, n=4, size=(20, 20))
        args += ["--resume", str(tmp_path / "nope.pt")]
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    expected = {"empty": "holds no image files", "missing": "is not a folder",
                "no_vgg": "--perceptual-loss-factor 0", "bad_size": "not divisible",
                "batch_zero": "--batch-size 0 is out of range", "resume_missing": "does not exist"}[case]
    assert expected in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_cli_help_lists_flags_with_defaults():
    r = cli("--help")
    assert r.returncode == 0
    for text in ("--dataset-path", "--preset", "--max-steps", "--vgg-weights", "--precision", "(default: hinge)"):
        assert text in r.stdout


@pytest.mark.parametrize("perceptual", [False, True])
def test_single_pass_generator_gradients_equal_the_two_backward_computation(tiny_cfg, tmp_path, perceptual):
    """The step backpropagates each loss once to x_rec; the reference's way takes the adaptive
    weight's gradients through the whole graph and backpropagates the weighted sum again."""
    from test_lpips import random_vgg_file
    from lpips import load_lpips

    lp = load_lpips(str(random_vgg_file(tmp_path)[0])) if perceptual else None
    kw = dict(disc_start=0, disc_weight=0.7, disc_factor=0.9, codebook_weight=1.3, perceptual_loss_factor=float(perceptual))

    def fresh():
        seed_everything(0)
        cfg = TrainVQGANConfig(model=tiny_cfg, batch_size=4, learning_rate=1e-3, disc_ndf=16, disc_layers=2, **kw)
        return build_stage1(cfg, torch.device("cpu"), lp)

    x = batch()
    fast = fresh()
    logs, _, _ = generator_step(fast, x, step=0)

    plain = fresh()
    x_rec, _, q_loss = plain.model(x)
    nll = (x - x_rec).abs().mean() + (lp(x, x_rec).mean() if perceptual else 0)
    g = -plain.disc(torch.cat([x, x_rec]))[4:].mean()
    last = plain.model.decoder.conv_out.weight
    g_nll, = torch.autograd.grad(nll, last, retain_graph=True)
    g_g, = torch.autograd.grad(g, last, retain_graph=True)
    lam = 0.7 * (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4).detach()
    plain.disc.requires_grad_(False)
    (nll + lam * 0.9 * g + 1.3 * q_loss).backward()

    assert logs["d_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    for (name, a), b in zip(fast.model.named_parameters(), plain.model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_step_runs_on_cpu(tiny_cfg, precision):
    """bf16 autocast, and fp16 with its GradScalers (each optimizer its own), on the CPU."""
    s = stage1(tiny_cfg, disc_start=0, precision=precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert s.amp_dtype == dtype and s.scaler_g.is_enabled() == (precision == "fp16")
    x = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        x_rec, _, _ = s.model(x)
        z_q, _, _ = s.model.encode(x)
    assert x_rec.dtype == dtype and z_q.dtype == torch.float32  # codebook math in float32
    before = [p.detach().clone() for p in s.model.parameters()]
    logs = train_step(s, x, step=0)
    assert all(torch.isfinite(logs[k]) for k in ("loss", "rec_loss", "q_loss", "g_loss", "d_weight", "d_loss"))
    assert logs["d_weight"].item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, s.model.parameters()))


@pytest.mark.parametrize("schedule, expected", [("constant", [1e-3, 1e-3, 1e-3]), ("cosine", [1e-3, 5.5e-4, 1e-4])])
def test_learning_rate_schedule_of_both_optimizers(tiny_cfg, schedule, expected):
    s = stage1(tiny_cfg, disc_start=0, lr_schedule=schedule)
    s.total_steps = 10
    for step, lr in zip((0, 5, 10), expected):
        train_step(s, batch(step), step)
        assert [g["lr"] for opt in (s.opt_g, s.opt_d) for g in opt.param_groups] == pytest.approx([lr, lr])
