"""Hostile inputs and faults, as a careless or hostile user or a failing disk would bring them: each
ends in one `error:` line naming the problem and the fix (exit 2; 1 for a fault of the machine),
before any work for what can be checked, without losing trained steps or reporting false success."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import training_transformer
import training_vqgan
from checkpoint import load_checkpoint, save_checkpoint
from conftest import GPT_FLAGS, NO_NETWORK, ROOT, TINY_FLAGS, assert_user_error, copy_run, reference_vqgan


def stage1_args(images, out, *extra):
    return ["--dataset-path", images, "--output-dir", out, *TINY_FLAGS, "--val-fraction", "0.2", *extra]


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------ 1. numbers and combinations
@pytest.mark.parametrize("script, args, expected", [
    ("training_vqgan", ["--learning-rate", "nan"], "--learning-rate nan is not a number"),
    ("training_vqgan", ["--disc-factor", "inf"], "--disc-factor inf is not a number"),
    ("training_vqgan", ["--learning-rate", "0"], "--learning-rate 0.0 must be above 0"),
    ("training_vqgan", ["--beta1", "1.5"], "must be in [0, 1)"),
    ("training_vqgan", ["--disc-layers", "3"], "--disc-layers 3 leaves no patch of a 16-pixel image"),
    ("training_vqgan", ["--attn-resolutions", "12"], "--attn-resolutions 12 matches no level"),
    ("training_vqgan", ["--compile-mode", "reduce-overhead"], "give --compile too"),
    ("training_vqgan", ["--compile", "--compile-mode", "reduce-overhead", "--grad-accum", "2"],
     "so --grad-accum 2 cannot add them up"),
    ("training_transformer", ["--compile", "--compile-mode", "max-autotune", "--grad-accum", "3"],
     "use --grad-accum 1 with a larger --batch-size"),
    ("training_transformer", ["--temperature", "nan"], "--temperature nan is not a number"),
    ("training_transformer", ["--class-dropout", "nan"], "--class-dropout nan is not a number"),
    ("sample_transformer", ["--cfg-scale", "nan"], "--cfg-scale nan is not a number"),
    ("sample_transformer", ["--top-p", "nan"], "--top-p nan is not a number"),
    ("sample_transformer", ["--grid", "0", "4"], "must be two positive sizes"),
    ("sample_transformer", ["--compile", "--no-cache"], "which --no-cache and --grid do not use"),
    ("evaluate_vqgan", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    ("evaluate_vqgan", ["--image-size", "8"], "--image-size 8 is out of range"),
    ("benchmark", ["stage1", "--steps", "0"], "--steps 0 is out of range"),
    ("benchmark", ["sample", "--top-k", "0"], "--top-k 0 is out of range"),
])
def test_numbers_are_checked_before_any_work(images, tmp_path, cli, script, args, expected):
    common = {"training_vqgan": stage1_args(images, tmp_path / "run"),
              "training_transformer": ["--dataset-path", images, "--output-dir", tmp_path / "run", *GPT_FLAGS],
              "sample_transformer": ["--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "run"],
              "evaluate_vqgan": ["--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "run"],
              "benchmark": []}[script]
    r = cli(script, *(args + ["--device", "cpu"] if script == "benchmark" else [*common, *args]))
    assert_user_error(r, expected)
    assert not (tmp_path / "run").exists()


def test_guidance_without_a_class_is_refused(transformer_run, tmp_path, cli):
    r = cli("sample_transformer", "--checkpoint", transformer_run.last, "--cfg-scale", "3", "--out", tmp_path / "s",
            "--device", "cpu")
    assert_user_error(r, "give --class-label (or --per-class) too")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------- 2. the lock
def test_a_second_run_into_a_locked_folder_is_refused(images, tmp_path, cli):
    """A lock held by a live process refuses the run (nothing read or written); the lock of a
    process that is gone is taken over with a message."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {__import__('socket').gethostname()}\n")
        r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "1"))
        assert_user_error(r, f"another run (process {holder.pid}")
        assert files_of(out) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "1"))  # the holder is gone now
    assert r.returncode == 0, r.stderr
    assert "taking over" in r.stderr and not (out / ".lock").exists()  # released at the end
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(images, tmp_path):
    """Two processes at once: one trains, the other is refused with exit 2; the folder holds one
    run's metrics and checkpoints."""
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "training_vqgan.py"),
               *map(str, stage1_args(images, out, "--max-steps", "4", "--log-every", "1"))]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, **NO_NETWORK}) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    refused = results[[p.returncode for p in procs].index(2)][1]
    assert "another run" in refused or "already exists" in refused
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # one run's lines, not two interleaved


# ---------------------------------------------------------------------- 3. resume validation
@pytest.fixture
def run_copy(vqgan_run, tmp_path):
    return copy_run(vqgan_run, tmp_path)


def test_a_setting_that_cannot_change_on_resume_is_named(images, run_copy, cli):
    config = (run_copy / "config.json").read_text()
    r = cli("training_vqgan", *stage1_args(images, run_copy, "--max-steps", "5", "--resume", "latest",
                                           "--disc-ndf", "16"))
    assert_user_error(r, "--disc-ndf cannot change on resume: the run was trained with 8")
    assert (run_copy / "config.json").read_text() == config


def test_precision_may_change_on_resume(images, run_copy, cli):
    r = cli("training_vqgan", *stage1_args(images, run_copy, "--max-steps", "4", "--resume", "latest",
                                           "--precision", "fp16"))
    assert r.returncode == 0, r.stderr
    assert "fp16 loss scaling starts afresh" in r.stdout
    assert load_checkpoint(run_copy / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.parametrize("damage, expected", [
    (lambda c: c["model"].update({"decoder.conv_out.weight": torch.zeros(3, 3, 3, 3)}), "size mismatch"),
    (lambda c: c["discriminator"].update({"main.0.weight": torch.full_like(c["discriminator"]["main.0.weight"],
                                                                           float("nan"))}), "non-finite weights"),
    (lambda c: c.pop("rng"), "lacks rng"),
    (lambda c: c.update(rng={"python": 3}), "random states"),
    (lambda c: c["opt_g"]["state"][0].update(exp_avg=torch.zeros(7)), "exp_avg of shape (7,)"),
    (lambda c: c.update(step="three"), "records step 'three'"),
])
def test_a_damaged_resume_checkpoint_is_refused_before_anything_is_written(images, run_copy, cli, damage, expected):
    last = run_copy / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    damage(ckpt)
    save_checkpoint(ckpt, last)
    before = {p: (run_copy / p).stat().st_mtime_ns for p in files_of(run_copy)}
    r = cli("training_vqgan", *stage1_args(images, run_copy, "--max-steps", "5", "--resume", "latest"))
    assert_user_error(r, expected)
    assert {p: (run_copy / p).stat().st_mtime_ns for p in files_of(run_copy)} == before  # nothing written


# ----------------------------------------------- 4. saved before evaluation; the disk failing
def test_a_failing_evaluation_costs_no_trained_step(images, tmp_path, cli, monkeypatch):
    def broken_grid(*args, **kwargs):
        raise RuntimeError("the grid cannot be drawn")

    monkeypatch.setattr("runfolder.save_sample_grid", broken_grid)
    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "4", "--sample-every", "2", "--save-every", "2"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("evaluation at step") == 2 and "the grid cannot be drawn" in r.stderr
    assert "2 evaluation(s) failed" in r.stderr
    assert "validation PSNR after" not in r.stdout  # no claim of a final measurement that failed
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


def test_a_failing_stage2_sample_grid_costs_no_trained_step(images, vqgan_run, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(training_transformer, "sample_grid", lambda *a, **k: 1 / 0)
    out = tmp_path / "gpt"
    r = cli("training_transformer", "--dataset-path", images, "--vqgan-checkpoint", vqgan_run.last, "--output-dir", out,
            "--max-steps", "2", "--sample-every", "1", *GPT_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "ZeroDivisionError" in r.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line] == [1, 2]  # the validation loss is logged before the grid fails


def test_a_full_disk_ends_the_run_with_what_was_saved_and_how_to_resume(images, tmp_path, cli, monkeypatch):
    import checkpoint

    real, calls = checkpoint.save_checkpoint, []

    def fills_up(obj, path):
        calls.append(path)
        if obj["step"] >= 4:
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr("runfolder.save_checkpoint", fills_up)
    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "6", "--save-every", "2"))
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "No space left on device" in errors[0] and "last checkpoint saved is step 2" in errors[0]
    assert "--resume latest" in errors[0]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2 and not (out / ".lock").exists()


# ------------------------------------------------------------------- 5. stage-2 checkpoints
@pytest.mark.parametrize("damage, expected", [
    (lambda c: c["model"].update({"head.weight": torch.zeros(5, 5)}), "size mismatch"),
    (lambda c: c.pop("vqgan_config"), "lacks vqgan_config"),
    (lambda c: c["vqgan"].update({"decoder.conv_out.bias": torch.full((3,), float("nan"))}), "non-finite weights"),
    (lambda c: c["model"].pop("ln_f.bias"), "missing ln_f.bias"),
    (lambda c: c.update(classes=["a"]), "is inconsistent"),
])
def test_a_damaged_stage2_checkpoint_is_refused(transformer_run, tmp_path, cli, damage, expected):
    ckpt = torch.load(transformer_run.last, weights_only=True)
    damage(ckpt)
    save_checkpoint(ckpt, tmp_path / "gpt.pt")
    r = cli("sample_transformer", "--checkpoint", tmp_path / "gpt.pt", "--out", tmp_path / "s", "--device", "cpu")
    assert_user_error(r, expected)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind, expected", [("folder", "is a folder, not a checkpoint file"),
                                            ("text", "is not a PyTorch checkpoint file"),
                                            ("empty_yaml", "holds nothing, not a mapping"),
                                            ("list_yaml", "holds a list, not a mapping")])
def test_wrong_files_get_a_message_that_names_them(vqgan_run, tmp_path, cli, kind, expected):
    args = ["--checkpoint", vqgan_run.path if kind == "folder" else tmp_path / "notes.txt", "--no-lpips",
            "--out", tmp_path / "eval"]
    (tmp_path / "notes.txt").write_text("not a checkpoint\n" * 50)
    if kind.endswith("yaml"):
        (tmp_path / "model.yaml").write_text("" if kind == "empty_yaml" else "- 1\n- 2\n")
        _, ckpt = reference_vqgan(tmp_path)
        args = ["--checkpoint", ckpt, "--config", tmp_path / "model.yaml", "--no-lpips", "--out", tmp_path / "eval"]
    assert_user_error(cli("evaluate_vqgan", *args), expected)
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------- 6. outputs checked before work
def test_outputs_that_cannot_be_written_are_refused_before_the_work(vqgan_run, transformer_run, tmp_path, cli,
                                                                    monkeypatch):
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "out"  # a folder inside a file: nothing can be written there
    monkeypatch.setattr("evaluate_vqgan.evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    assert_user_error(cli("evaluate_vqgan", "--checkpoint", vqgan_run.last, "--no-lpips", "--out", blocked),
                      "choose a writable --out")
    monkeypatch.setattr("transformer.VQGANTransformer.sample", lambda *a, **k: pytest.fail("sampled before checking"))
    assert_user_error(cli("sample_transformer", "--checkpoint", transformer_run.last, "--out", blocked,
                          "--device", "cpu"), "choose a writable --out")
    monkeypatch.setattr("benchmark.bench_stage1", lambda *a, **k: pytest.fail("timed before checking --json"))
    assert_user_error(cli("benchmark", "stage1", "--device", "cpu", "--json", blocked / "r.json"),
                      "choose a writable --json")
    assert_user_error(cli("benchmark", "stage1", "--device", "cpu", "--json", tmp_path), "is a folder")


# ------------------------------------------------------------------ 7. devices and signals
@pytest.mark.parametrize("device, expected", [("mps", "no Apple GPU"), ("meta", "not a device this project"),
                                              ("cuda:7", "CUDA"), ("gpu", "is not a torch device")])
def test_device_names_are_checked(images, tmp_path, cli, device, expected):
    r = cli("training_vqgan", *stage1_args(images, tmp_path / "run", "--device", device))
    assert_user_error(r, expected)
    assert not (tmp_path / "run").exists()


def test_a_signal_during_the_first_validation_ends_the_run_cleanly(images, tmp_path, cli, monkeypatch):
    real = training_vqgan.evaluate_psnr

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled from start-up: a flag, not a kill
        return real(*args, **kwargs)

    monkeypatch.setattr(training_vqgan, "evaluate_psnr", interrupted)
    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "5"))
    assert r.returncode == 0, r.stderr
    assert "stopped by SIGTERM before training began" in r.stdout
    assert not (out / "checkpoints" / "last.pt").exists() and not (out / ".lock").exists()


def test_ctrl_c_at_start_up_is_one_line(images, tmp_path, cli, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_vqgan, "run_datasets", ctrl_c)
    r = cli("training_vqgan", *stage1_args(images, tmp_path / "run"))
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["interrupted (Ctrl-C) before the work was done."]


# -------------------------------------------------------------------- 8. results that are not numbers
def test_metrics_that_are_not_numbers_are_a_failure_not_a_result(vqgan_run, tmp_path, cli, monkeypatch):
    monkeypatch.setattr("evaluate_vqgan.psnr", lambda x, y: torch.full((x.shape[0],), float("nan")))
    r = cli("evaluate_vqgan", "--checkpoint", vqgan_run.last, "--no-lpips", "--num-workers", "0", "--num-images", "4",
            "--out", tmp_path / "eval")
    assert_user_error(r, "psnr came out as nan")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_validation_that_is_not_a_number_is_not_logged(images, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(training_vqgan, "evaluate_psnr", lambda *a, **k: float("nan"))
    out = tmp_path / "run"
    r = cli("training_vqgan", *stage1_args(images, out, "--max-steps", "2", "--sample-every", "2"))
    assert r.returncode == 0 and "val_psnr=nan: not a number" in r.stderr
    assert "val_psnr" not in (out / "metrics.jsonl").read_text()
    assert "validation PSNR after" not in r.stdout
