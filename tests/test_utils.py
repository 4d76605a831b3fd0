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
