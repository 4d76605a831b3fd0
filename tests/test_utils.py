"""runfolder.py and utils.py: the run folder, the learning-rate schedule, the shared training loop."""
import pytest

from checkpoint import load_checkpoint
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
