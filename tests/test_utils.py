"""runfolder.py and utils.py: the run folder, the learning-rate schedule, the shared training loop."""
import sys

import pytest

from checkpoint import load_checkpoint
from conftest import TINY_FLAGS, assert_user_error
from runfolder import RunFolder
from utils import lr_at


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


def test_logs_are_plain_lines_when_not_a_terminal(vqgan_run):
    """A log file (here: captured output) gets one line per log step and no progress-bar redraws."""
    lines = [line for line in vqgan_run.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("rec_loss" in line and "images/s" in line and "ETA " in line for line in lines)
    assert "\r" not in vqgan_run.stdout + vqgan_run.stderr


def test_progress_line():
    from utils import progress_line

    line = progress_line(50, 950, {"rec_loss": 0.41234, "usage": 0.25, "images_per_s": 21.37, "other": 1.0},
                         ("rec_loss", "usage", "missing"), "images_per_s", 3725.4)
    assert line == "step 50/950 | rec_loss 0.4123 usage 0.25 | 21.4 images/s | ETA 1:02:05"
    assert progress_line(1, 2, {"r_per_s": 1.0}, (), "r_per_s", 59.6).endswith("ETA 1:00")


def stage1(images, out, *extra):
    return ["--dataset-path", images, "--output-dir", out, *TINY_FLAGS, "--log-every", "1", "--sample-every", "2",
            "--val-fraction", "0.2", *extra]


def test_tensorboard_gets_metrics_validation_and_sample_grids(images, tmp_path, cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1(images, out, "--max-steps", "2", "--tensorboard"))
    assert r.returncode == 0, r.stderr
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    (image,) = events.Images("samples")
    assert image.step == 2 and image.encoded_image_string.startswith(b"\x89PNG")
    assert [e.step for e in events.Scalars("rec_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("val_psnr")] == [2]


class WandbStandIn:
    """What the training scripts call of wandb, recorded (the real package talks to a server)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, data, step):
        self.logged.append((step, data))

    def Image(self, path):  # noqa: N802 (wandb's name)
        return ("image", path)

    def finish(self):
        self.finished += 1


def test_wandb_receives_metrics_and_images_and_a_resume_continues_its_run(images, tmp_path, cli, monkeypatch):
    wandb = WandbStandIn()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1(images, out, "--max-steps", "2", "--wandb", "my-project"))
    assert r.returncode == 0, r.stderr
    (first,) = wandb.inits
    assert first["project"] == "my-project" and first["resume"] == "allow" and first["config"]["wandb"] == "my-project"
    images_logged = [(step, d["samples"]) for step, d in wandb.logged if "samples" in d]
    assert images_logged == [(2, ("image", str(out / "samples" / "step_0000002.png")))]
    assert [step for step, d in wandb.logged if "rec_loss" in d] == [1, 2]
    assert any("val_psnr" in d for _, d in wandb.logged) and wandb.finished == 1
    r = cli("training_vqgan", *stage1(images, out, "--max-steps", "4", "--wandb", "my-project", "--resume", "latest"))
    assert r.returncode == 0, r.stderr
    assert wandb.inits[1]["id"] == first["id"]  # the same W&B run continues
    assert [step for step, d in wandb.logged if "rec_loss" in d] == [1, 2, 3, 4]


def test_wandb_missing_is_one_message_and_nothing_written(images, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "run"
    assert_user_error(cli("training_vqgan", *stage1(images, out, "--max-steps", "2", "--wandb", "p")), "pip install wandb")
    assert not out.exists()


def test_the_resume_command_repeats_the_launcher(monkeypatch):
    from utils import resume_command

    monkeypatch.setattr(sys, "argv", ["training_vqgan.py", "--dataset-path", "d", "--lr", "1"])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert resume_command("runs/a b") == "python training_vqgan.py --output-dir 'runs/a b' --resume latest"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_command("r") == "torchrun --nproc-per-node=4 training_vqgan.py --output-dir r --resume latest"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_command("r").startswith("torchrun --nnodes=2 --nproc-per-node=4 training_vqgan.py")


@pytest.mark.parametrize("stdout_tty, stderr_tty, expected", [(True, True, True), (False, True, False),
                                                              (True, False, False), (False, False, False)])
def test_progress_bars_only_when_both_streams_are_a_terminal(monkeypatch, stdout_tty, stderr_tty, expected):
    """`python training_vqgan.py > log.txt` sends the plain lines to the file, not a bar to the screen."""
    import io

    from utils import interactive

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stdout", Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", Stream(stderr_tty))
    assert interactive() is expected


def test_fp16_steps_unscale_skip_an_overflow_and_move_the_scale_on_the_device():
    """optimizer_step with an enabled GradScaler: the gradients are unscaled before the step, an
    overflowing step changes no weight or Adam state and halves the scale, a finite one steps
    and (growth_interval 1) doubles it. All decided on the device (the test reads afterwards)."""
    import torch

    from utils import optimizer_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, eps=1.0, fused=True)  # eps 1: the step depends on the gradient's size
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    x = torch.randn(4, 3)

    def step(poison: bool):
        opt.zero_grad(set_to_none=True)
        loss = layer(x).square().mean()
        scaler.scale(loss).backward()
        if poison:
            layer.weight.grad[0, 0] = float("inf")
        return optimizer_step(opt, scaler, [loss.detach()])[0]

    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(layer.state_dict())
    before = [p.detach().clone() for p in layer.parameters()]
    assert bool(step(poison=False)) and scaler.get_scale() == 16.0
    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.1, eps=1.0)
    plain(x).square().mean().backward()
    plain_opt.step()  # the same step without scaling: the gradients reached Adam unscaled
    for a, b in zip(layer.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    moved = [p.detach().clone() for p in layer.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(before, moved))
    state = {k: v.clone() for k, v in opt.state[layer.weight].items()}
    assert not bool(step(poison=True)) and scaler.get_scale() == 8.0  # skipped, backed off
    assert all(torch.equal(a, b) for a, b in zip(moved, layer.parameters()))
    assert all(torch.equal(v, opt.state[layer.weight][k]) for k, v in state.items())


def test_clipping_from_the_check_norms_is_clip_grad_norm():
    """optimizer_step computes the gradients' norms once, for the finiteness check and for the
    clipping: the clipped gradients and the reported norm are clip_grad_norm_'s, exactly."""
    import torch

    from utils import optimizer_step

    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 5)
    for layer in (a, b):
        (layer(x) * 10).square().mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    clipped = [p.grad.clone() for p in b.parameters()]
    seen = []
    opt = torch.optim.Adam(a.parameters(), lr=0.1, fused=True)
    opt.step = lambda: seen.extend(p.grad.clone() for p in a.parameters())  # the gradients the step gets
    stepped, norm = optimizer_step(opt, torch.amp.GradScaler("cpu", enabled=False), [torch.ones(())], clip=0.5)
    assert bool(stepped) and torch.equal(norm, expected) and expected > 0.5
    assert all(torch.equal(g, c) for g, c in zip(seen, clipped))
