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
from torch.utils._python_dispatch import TorchDispatchMode

import training_transformer
import training_vqgan
from checkpoint import load_checkpoint
from runconfig import parse_train_transformer, parse_train_vqgan
from conftest import (NO_NETWORK, ROOT, TINY_FLAGS, assert_same_state, assert_user_error, make_stage1, random_batch,
                      write_images)

STAGE1 = [*TINY_FLAGS, "--disc-start", "1", "--codebook-ema", "0.9", "--codebook-restart-after", "1",
          "--codebook-kmeans-init", "--log-every", "1", "--sample-every", "100", "--save-every", "2", "--val-fraction", "0.2",
          "--ema-decay", "0.9"]
STAGE2 = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
          "--num-samples", "2", "--lr-warmup-steps", "1", "--pkeep", "0.7", "--log-every", "1", "--sample-every", "100",
          "--save-every", "2", "--val-fraction", "0.2", "--augment", "--ema-decay", "0.9"]


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


@pytest.mark.parametrize("extra", [[], ["--codebook-warmup", "3"]], ids=["kmeans-at-step-1", "warmup-across-resume"])
def test_stage1_resume_is_bit_identical(images, tmp_path, extra):
    """Weights, their EMA, optimizer and scaler states (GAN on from step 1; EMA codebook with
    k-means init and restarts). With a codebook warm-up of 3 steps, the resume at step 2 falls
    inside it: the k-means initialization must still come at step 3, from the same pool."""
    assert_resume_is_bit_identical(lambda argv: training_vqgan.main(parse_train_vqgan(argv)),
                                   ["--dataset-path", str(images), *STAGE1, *extra], tmp_path,
                                   ("model", "ema", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d", "rng"))


def test_stage2_resume_is_bit_identical(images, vqgan_run, tmp_path):
    assert_resume_is_bit_identical(lambda argv: training_transformer.main(parse_train_transformer(argv)),
                                   ["--dataset-path", str(images), "--vqgan-checkpoint", str(vqgan_run.last), *STAGE2],
                                   tmp_path, ("model", "ema", "optimizer", "scaler", "rng"))


# ------------------------------------------------------------------------------ crashes, signals
@pytest.mark.slow
def test_kill_9_while_saving_leaves_a_loadable_last_pt(tmp_path):
    """A process that keeps overwriting last.pt with a large checkpoint is killed with SIGKILL
    at different moments; each time the file loads and is one complete checkpoint."""
    target = tmp_path / "last.pt"
    script = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); from checkpoint import save_checkpoint\n"
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


@pytest.mark.slow
def test_signal_finishes_the_step_saves_and_exits_0(images, tmp_path):
    """Real processes and real signals (the point of this test): one run gets SIGTERM, another
    SIGINT (Ctrl-C); both run at once, which halves the wait for their start-up."""
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name
        runs[sig] = out, subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "training_vqgan.py"), "--dataset-path", str(images), "--output-dir",
             str(out), *TINY_FLAGS, "--max-steps", "100000", "--log-every", "1", "--save-every", "100000",
             "--sample-every", "100000", "--max-bad-fraction", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **NO_NETWORK, "OMP_NUM_THREADS": "1"})  # two processes on two cores
    deadline = time.time() + 120
    while not all((out / "metrics.jsonl").exists() for out, _ in runs.values()) and time.time() < deadline:
        time.sleep(0.1)  # training has started in both
    time.sleep(1.0)
    for sig, (_, proc) in runs.items():
        proc.send_signal(sig)
    script = os.path.join(ROOT, "training_vqgan.py")
    for sig, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (sig, stderr[-2000:])
        assert f"Resume with: python {script} --output-dir {out} --resume latest\n" in stdout  # the run folder says the rest
        ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
        logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert ckpt["step"] == len(logged) > 0, sig  # the checkpoint is of the last finished step


# --------------------------------------------------------------------------------- NaN steps
def test_non_finite_loss_skips_the_step(tiny_cfg):
    s = make_stage1(tiny_cfg, disc_start=0)
    x = random_batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    model = [p.detach().clone() for p in s.model.parameters()]
    disc = [p.detach().clone() for p in s.disc.parameters()]
    statistics = [b.clone() for b in s.disc.buffers()]  # BatchNorm's
    logs = training_vqgan.train_step(s, bad, step=0)
    assert logs["skipped"].item() == 1 and not torch.isfinite(logs["loss"])
    assert all(torch.equal(a, b) for a, b in zip(model, s.model.parameters()))  # no update
    assert all(torch.equal(a, b) for a, b in zip(disc, s.disc.parameters()))
    assert statistics and all(torch.equal(a, b) for a, b in zip(statistics, s.disc.buffers()))
    for opt in (s.opt_g, s.opt_d):  # the optimizers did not even count the step: Adam as never stepped
        assert all(st["step"] == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
                   for st in opt.state.values())
    logs = training_vqgan.train_step(s, x, step=1)  # a finite batch trains as usual
    assert logs["skipped"].item() == 0 and any(not torch.equal(a, b) for a, b in zip(model, s.model.parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_batch_leaves_the_ema_codebook_alone(tiny_cfg, bad):
    """Its forward pass changes nothing (it is pure) and its skipped step never calls update()."""
    import dataclasses

    s = make_stage1(dataclasses.replace(tiny_cfg, codebook_ema=0.9, codebook_restart_after=1), disc_start=10**9)
    training_vqgan.train_step(s, random_batch(0), step=0)
    before = {k: v.clone() for k, v in s.model.quantize.state_dict().items()}
    x = random_batch(1)
    x[0, :, :4, :4] = bad
    logs = training_vqgan.train_step(s, x, step=1)
    assert logs["skipped"].item() == 1
    for k, v in s.model.quantize.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_skipped_step_leaves_the_codebook_as_it_was(tiny_cfg, monkeypatch):
    """The encoder output is finite but the loss is not (here: a NaN perceptual term): the step
    is skipped, so the codebook's update (EMA, restarts) never runs."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, codebook_ema=0.9, codebook_restart_after=1)
    s = make_stage1(cfg, disc_start=10**9)
    training_vqgan.train_step(s, random_batch(0), step=0)
    before = {k: v.clone() for k, v in s.model.quantize.state_dict().items()}
    s.perceptual = lambda x, y: torch.full((x.shape[0],), float("nan"))
    monkeypatch.setattr(s.cfg, "perceptual_loss_factor", 1.0)
    logs = training_vqgan.train_step(s, random_batch(1), step=1)
    assert logs["skipped"].item() == 1
    for k, v in s.model.quantize.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert logs.get("codes_restarted", 0) == 0  # no restarts for a skipped step


@pytest.mark.parametrize("log_every", [1, 4])
def test_too_many_bad_steps_in_a_row_save_and_stop(images, tmp_path, monkeypatch, capsys, log_every):
    """The steps keep their skip flags on the device; every --log-every steps the loop reads them:
    one warning names the skipped steps, and a run of --max-bad-steps stops there, saved."""
    real = training_vqgan.train_step
    first_bad = {1: 2, 4: 1}[log_every]  # counted from 0: steps 3-5 or 2-4 (from 1) carry a NaN

    def poisoned(s, x, step):
        if step >= first_bad:
            x = [xi.clone().fill_(float("nan")) for xi in x]
        return real(s, x, step)

    monkeypatch.setattr(training_vqgan, "train_step", poisoned)
    out = tmp_path / "run"
    cfg = parse_train_vqgan(["--dataset-path", str(images), "--output-dir", str(out), *TINY_FLAGS,
                             "--max-steps", "50", "--max-bad-steps", "3", "--log-every", str(log_every)])
    stop = first_bad + 3
    with pytest.raises(training_vqgan.UserError, match=f"training stopped at step {stop}: 3 steps in a row had non-finite"):
        training_vqgan.main(cfg)
    named = {1: f"step(s) {stop} skipped", 4: f"step(s) {first_bad + 1}-{stop} skipped"}[log_every]  # one per check
    assert f"{named} (no update)" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stop  # the good steps and 3 skipped, saved
    if log_every == 1:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["skipped"] for m in lines if "skipped" in m] == [0, 0, 1, 1]  # the fifth line is not logged yet


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


def test_bad_files_are_skipped_and_listed_once(tmp_path, cli):
    data = tmp_path / "data"
    write_images(data, n=12, size=(24, 24))
    bad = bad_files(data / "bad")
    out = tmp_path / "run"
    r = cli("training_vqgan", "--dataset-path", data, "--output-dir", out, *TINY_FLAGS, "--epochs", "2",
            "--max-bad-fraction", "0.5", "--val-fraction", "0.2", "--log-every", "1", "--sample-every", "1000")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert {line.split("\t")[0] for line in lines} == bad and len(lines) == len(bad)  # each exactly once
    assert all(line.split("\t")[1] for line in lines)  # with its reason
    assert all(r.stderr.count(f"warning: skipping {path}:") == 1 for path in bad)  # each warned about once
    # more bad files than allowed: one clear message before training
    r = cli("training_vqgan", "--dataset-path", data, "--output-dir", tmp_path / "run2", *TINY_FLAGS,
            "--max-steps", "1", "--max-bad-fraction", "0.1")
    assert_user_error(r, "--max-bad-fraction")


# --------------------------------------------------------------------------- bad configuration
def _stage2_checkpoint(tmp_path):
    torch.save({"kind": "transformer", "model": {}}, tmp_path / "gpt.pt")
    return tmp_path / "gpt.pt"


def _file_as_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


# (script, extra flags, what the message names, the fix it gives); the output folder is tmp/run
BAD_CONFIGURATIONS = {
    "batch_too_big": ("training_vqgan", lambda tmp: ["--batch-size", "64"], "larger than the",
                      "lower --batch-size"),
    "unwritable_output": ("training_vqgan", lambda tmp: ["--output-dir", _file_as_parent(tmp) / "run"],
                          "cannot write to the output folder", "choose a writable --output-dir"),
    "resume_from_stage2": ("training_vqgan", lambda tmp: ["--resume", _stage2_checkpoint(tmp)],
                           "not a stage-1 training checkpoint", "--resume takes a checkpoint written by"),
    "gpt_too_big_for_batch": ("training_transformer", lambda tmp: ["--vqgan-checkpoint", tmp / "vq.pt",
                                                                    "--batch-size", "64"],
                              "larger than the", "lower --batch-size"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGURATIONS))
def test_bad_configuration_exits_2_before_training(images, vqgan_run, tmp_path, cli, case):
    import shutil

    script, extra, problem, fix = BAD_CONFIGURATIONS[case]
    shutil.copy(vqgan_run.last, tmp_path / "vq.pt")
    flags = TINY_FLAGS if script == "training_vqgan" else ["--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                                                            "--num-workers", "0", "--device", "cpu"]
    r = cli(script, "--dataset-path", images, "--output-dir", tmp_path / "run", *flags, "--max-steps", "1",
            *extra(tmp_path))
    assert_user_error(r, problem)
    assert fix in r.stderr
    assert not (tmp_path / "run").exists()  # no run folder left behind


def test_a_malicious_resume_checkpoint_never_runs_its_payload(images, tmp_path, cli):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"kind": "vqgan", "payload": Payload()}, tmp_path / "evil.pt")
    r = cli("training_vqgan", "--dataset-path", images, "--output-dir", tmp_path / "run", *TINY_FLAGS,
            "--max-steps", "1", "--resume", tmp_path / "evil.pt")
    assert_user_error(r, "not a stage-1 training checkpoint")
    assert not marker.exists()  # the pickled payload never ran
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_script_run_as_a_program_exits_2_on_a_user_error(tmp_path):
    """Each script's __main__ as `python SCRIPT.py ...` runs it (every other CLI test calls the
    same cli() in-process): the exit code and the one error line. One Python process runs them
    all, each as __main__ with its own captured stderr (a process per script would cost seconds
    each)."""
    missing = str(tmp_path / "missing.pt")
    cases = {"training_vqgan": ["--batch-size", "0"], "training_transformer": ["--batch-size", "0"],
             "sample_transformer": ["--checkpoint", missing], "evaluate_vqgan": ["--checkpoint", missing],
             "benchmark": ["stage1", "--batch-size", "0", "--device", "cpu"],
             "vqgan": ["export", "--checkpoint", missing, "--out", str(tmp_path / "out")],
             "fid": ["--samples", missing, "--reference", str(tmp_path)]}
    driver = (
        "import contextlib, io, json, runpy, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        f"cases = {cases!r}\n"
        "results = {}\n"
        "for script, args in cases.items():\n"
        "    sys.argv, err, code = [script + '.py', *args], io.StringIO(), None\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        f"            runpy.run_path({ROOT!r} + '/' + script + '.py', run_name='__main__')\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    results[script] = [code, err.getvalue()]\n"
        "print(json.dumps(results))\n")
    r = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, **NO_NETWORK})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(cases)
    for script, (code, err) in results.items():
        assert code == 2, (script, err[-2000:])
        assert err.startswith("error: ") and "Traceback" not in err, (script, err)
        assert len(err.strip().splitlines()) == 1, (script, err)


# ------------------------------------------------------------------- no waiting for the device
HOST_READS = ("item", "__bool__", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__")
# operators that read a value back to the host (every Python read ends in _local_scalar_dense), or
# size their output by the values, or check them there (multinomial): on a GPU each waits for it
HOST_READING_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::unique",
                    "aten::_unique", "aten::masked_select", "aten::multinomial")


class NoHostReads(TorchDispatchMode):
    """Every operator that would wait for the device raises, seen at the dispatcher, so also when
    C++ code calls it (a Scalar argument made from a tensor, an operator's own checks)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith(HOST_READING_OPS):
            raise AssertionError(f"{func._schema.name} inside the training step: it waits for the device")
        return func(*args, **(kwargs or {}))


def forbid_host_reads(monkeypatch):
    """Every way Python reads a tensor back to the host raises; returns the dispatcher-level guard
    (a context) for the rest."""
    def read(*args, **kwargs):
        raise AssertionError("a tensor read back to the host inside the training step")
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, read)
    return NoHostReads()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", ["finite", "nan"])
def test_the_stage1_step_never_reads_a_tensor_back(tiny_cfg, monkeypatch, batch, precision):
    """The GAN term, the improved codebook (factorized, EMA codes, restarts, k-means done at the
    first step), the EMA of the weights: a step runs without one host read, and so does the skip
    of a non-finite batch, which changes nothing; under fp16 with the GradScalers too (bf16 takes
    the fp32 path: no scaler)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, codebook_dim=4, codebook_ema=0.9, codebook_restart_after=1,
                              codebook_kmeans_init=True)
    s = make_stage1(cfg, disc_start=0, ema_decay=0.9, precision=precision)
    assert s.scaler_g.is_enabled() == (precision == "fp16")
    training_vqgan.train_step(s, random_batch(0), step=0)  # k-means reads its pool on the host, once
    assert s.model.quantize.codes_initialized()
    x = random_batch(1)
    if batch == "nan":
        x[0, 0, 0, 0] = float("nan")
    before = [t.detach().clone() for t in [*s.model.state_dict().values(), *s.disc.state_dict().values(),
                                           *s.ema.weights]]
    with forbid_host_reads(monkeypatch):
        logs = training_vqgan.train_step(s, x, step=1)
    monkeypatch.undo()
    after = [*s.model.state_dict().values(), *s.disc.state_dict().values(), *s.ema.weights]
    unchanged = [torch.equal(a, b) for a, b in zip(before, after)]
    assert logs["skipped"].item() == (batch == "nan")
    assert all(unchanged) if batch == "nan" else not any(unchanged[:4])  # trained: the first weights moved
    assert s.ema.updates == (1 if batch == "nan" else 2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", ["finite", "nan"])
def test_the_stage2_step_never_reads_a_tensor_back(tiny_cfg, monkeypatch, batch, precision):
    """The GPT's step with gradient clipping and the EMA of the weights, on cached tokens: no host
    read; a non-finite loss (here: a NaN injected into the GPT's weights' gradients) is skipped.
    Under fp16 the GradScaler unscales, decides and updates on the device too."""
    from config import GPTConfig, TrainTransformerConfig
    from training_transformer import build_stage2, train_step
    from transformer import VQGANTransformer, gpt_shape
    from vqgan import VQGAN

    torch.manual_seed(0)
    vqgan = VQGAN(tiny_cfg)
    gpt = GPTConfig(n_layer=1, n_head=2, n_embd=32, **gpt_shape(tiny_cfg, 0))
    cfg = TrainTransformerConfig(model=gpt, batch_size=2, ema_decay=0.9, grad_clip=1.0, precision=precision)
    s = build_stage2(cfg, VQGANTransformer(vqgan, gpt), torch.device("cpu"), total_steps=10)
    tokens = torch.randint(0, tiny_cfg.n_embed, (2, tiny_cfg.latent_size, tiny_cfg.latent_size))
    if batch == "nan":
        s.model.gpt.tok_emb.weight.register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in [*s.model.gpt.parameters(), *s.ema.weights]]
    with forbid_host_reads(monkeypatch):
        logs = train_step(s, [tokens], step=0)
    monkeypatch.undo()
    unchanged = [torch.equal(a, b) for a, b in zip(before, [*s.model.gpt.parameters(), *s.ema.weights])]
    assert logs["skipped"].item() == (batch == "nan")
    assert all(unchanged) if batch == "nan" else not all(unchanged)
    assert all(st["step"] == (batch != "nan") for st in s.opt.state.values())


def test_optimizer_state_saved_by_a_non_fused_optimizer_resumes_into_the_fused_one(tiny_cfg):
    """Earlier versions trained on the CPU with Adam not fused, and their checkpoints say so; they
    resume into today's fused optimizers, which then skip a non-finite step as usual."""
    from checkpoint import load_optimizer

    s = make_stage1(tiny_cfg, disc_start=0)
    training_vqgan.train_step(s, random_batch(0), step=0)
    saved = {name: getattr(s, name).state_dict() for name in ("opt_g", "opt_d")}
    for state in saved.values():
        for group in state["param_groups"]:
            group.update(fused=None, foreach=None)  # as torch.optim.Adam(...) without fused=True writes
    resumed = make_stage1(tiny_cfg, disc_start=0)
    for name, state in saved.items():
        load_optimizer(getattr(resumed, name), state, "the checkpoint")
    bad = random_batch(1)
    bad[0, 0, 0, 0] = float("nan")
    assert training_vqgan.train_step(resumed, bad, step=1)["skipped"].item() == 1
    assert training_vqgan.train_step(resumed, random_batch(2), step=2)["skipped"].item() == 0
    assert all(st["step"] == 2 for st in resumed.opt_g.state.values())
