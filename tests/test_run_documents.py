"""A run is a document: resume from the run folder alone, reproduce a run from its config.json,
print the resolved configuration."""
import json
import shutil

import yaml

from checkpoint import load_checkpoint
from config import config_to_dict
from runconfig import parse_train_transformer, parse_train_vqgan
from conftest import GPT_FLAGS, TINY_FLAGS, assert_same_state, assert_user_error, copy_run

STAGE1 = [*TINY_FLAGS, "--disc-start", "1", "--log-every", "1", "--sample-every", "100", "--save-every", "2",
          "--val-fraction", "0.2"]


def test_resume_with_no_other_flag_continues_bit_exactly(images, tmp_path, cli):
    common = ["--dataset-path", images, *STAGE1, "--max-steps", "4"]
    assert cli("training_vqgan", *common, "--output-dir", tmp_path / "a").returncode == 0
    b = tmp_path / "b"
    assert cli("training_vqgan", *common, "--output-dir", b).returncode == 0
    # as if the run had died after step 2: its last checkpoint is the one of step 2
    shutil.copy(b / "checkpoints" / "step_0000002.pt", b / "checkpoints" / "last.pt")
    (b / "checkpoints" / "step_0000004.pt").unlink()
    r = cli("training_vqgan", "--output-dir", b, "--resume", "latest")  # nothing else: the run folder says it all
    assert r.returncode == 0, r.stderr
    assert "resumed at step 2" in r.stdout and "changed on resume" not in r.stdout
    a_ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b_ckpt = load_checkpoint(b / "checkpoints" / "last.pt")
    assert a_ckpt["step"] == b_ckpt["step"] == 4
    for key in ("model", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng"):
        assert_same_state(a_ckpt[key], b_ckpt[key], key)
    assert b_ckpt["train_config"] == {**a_ckpt["train_config"], "output_dir": str(b),
                                      "resume": str(b / "checkpoints" / "last.pt")}


def test_resume_auto_starts_or_continues_with_one_command(images, tmp_path, cli):
    out = tmp_path / "run"
    command = ["--dataset-path", images, *STAGE1, "--output-dir", out, "--max-steps", "2", "--resume", "auto"]
    first = cli("training_vqgan", *command)  # an empty folder: a new run
    assert first.returncode == 0, first.stderr
    assert "resumed" not in first.stdout and load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    again = cli("training_vqgan", *command[:-4], "--max-steps", "3", "--resume", "auto")  # requeued: continues
    assert again.returncode == 0, again.stderr
    assert "resumed at step 2" in again.stdout and "changed on resume: max_steps 2 -> 3" in again.stdout
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3


def test_overrides_on_resume_are_printed_and_recorded(vqgan_run, tmp_path, cli):
    out = copy_run(vqgan_run, tmp_path)
    before = json.loads((out / "config.json").read_text())
    r = cli("training_vqgan", "--resume", out, "--max-steps", "4", "--learning-rate", "0.0005",
            "--batch-size", str(before["batch_size"]))  # a folder as --resume; an unchanged value is no change
    assert r.returncode == 0, r.stderr
    assert f"changed on resume: learning_rate {before['learning_rate']} -> 0.0005" in r.stdout
    assert "changed on resume: max_steps 3 -> 4" in r.stdout and "batch_size" not in r.stdout
    after = json.loads((out / "config.json").read_text())
    assert after["history"] == [{"step": 3, "changed": {"max_steps": [3, 4], "learning_rate": [before["learning_rate"],
                                                                                              0.0005]}}]
    assert after["learning_rate"] == 0.0005 and after["model"] == before["model"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["train_config"]["history"] == after["history"]


def test_a_model_flag_that_differs_on_resume_is_refused(vqgan_run, tmp_path, cli):
    out = copy_run(vqgan_run, tmp_path)
    files = sorted(p.name for p in out.rglob("*"))
    r = cli("training_vqgan", "--output-dir", out, "--resume", "latest", "--ch", "64", "--max-steps", "4")
    assert_user_error(r, "--ch 32")
    assert "cannot change on resume" in r.stderr and "drop --ch" in r.stderr
    assert sorted(p.name for p in out.rglob("*")) == files
    # the run's own values are no change, even one that would not fit the default architecture
    same = cli("training_vqgan", "--output-dir", out, "--resume", "latest", "--attn-resolutions", "8",
               "--max-steps", "3")
    assert same.returncode == 0, same.stderr


def test_resume_points_at_a_run_that_is_there(tmp_path, cli):
    assert_user_error(cli("training_vqgan", "--output-dir", tmp_path / "none", "--resume", "latest"), "--resume auto")
    (tmp_path / "empty").mkdir()
    assert_user_error(cli("training_vqgan", "--resume", tmp_path / "empty"), "holds no checkpoints/last.pt")


def test_config_reproduces_a_runs_configuration(vqgan_run, tmp_path):
    saved = json.loads((vqgan_run.path / "config.json").read_text())
    new = parse_train_vqgan(["--config", str(vqgan_run.path / "config.json"), "--output-dir", str(tmp_path / "new")])
    assert config_to_dict(new) == {**saved, "output_dir": str(tmp_path / "new")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(saved))
    flag = parse_train_vqgan(["--config", str(tmp_path / "run.yaml"), "--seed", "7", "--ch", "64"])
    assert config_to_dict(flag) == {**saved, "seed": 7, "model": {**saved["model"], "ch": 64}}  # flags override


def test_config_file_errors_are_one_message(tmp_path, cli):
    (tmp_path / "bad.json").write_text("{not json")
    assert_user_error(cli("training_vqgan", "--config", tmp_path / "bad.json"), "is not valid JSON")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_user_error(cli("training_vqgan", "--config", tmp_path / "list.yaml"), "is not a run configuration")
    (tmp_path / "odd.json").write_text('{"no_such_field": 1}')
    assert_user_error(cli("training_vqgan", "--config", tmp_path / "odd.json"), "no_such_field")
    assert_user_error(cli("training_vqgan", "--config", tmp_path / "missing.json"), "cannot read --config")
    both = cli("training_vqgan", "--config", tmp_path / "odd.json", "--resume", "latest")
    assert_user_error(both, "give one of them")


def test_print_config_shows_the_resolved_configuration_and_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("training_vqgan", "--print-config", "--seed", "3")
    assert r.returncode == 0 and not list(tmp_path.iterdir())
    printed = json.loads(r.stdout)
    assert printed == {**config_to_dict(parse_train_vqgan([])), "seed": 3}  # the demo's settings, the flag on top
    r = cli("training_transformer", "--print-config", *GPT_FLAGS)
    assert r.returncode == 0 and json.loads(r.stdout) == config_to_dict(parse_train_transformer(GPT_FLAGS))


def test_stage2_resumes_from_its_run_folder_alone(transformer_run, tmp_path, cli):
    out = copy_run(transformer_run, tmp_path)
    r = cli("training_transformer", "--resume", out, "--max-steps", "4")  # a run folder; the VQGAN is inside
    assert r.returncode == 0, r.stderr
    assert "resumed at step 3" in r.stdout and "changed on resume: max_steps 3 -> 4" in r.stdout
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["train_config"]["conditional"] is True
    assert_user_error(cli("training_transformer", "--resume", out, "--n-layer", "2"), "drop --n-layer")
