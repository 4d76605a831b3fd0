"""torchrun / DistributedDataParallel on the CPU (gloo, 2 processes): both training scripts, equal
replicas, the 2 x b = 1 x 2b equivalence of a generator update, and resume under torchrun."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import TrainVQGANConfig, VQGANConfig
from conftest import NO_NETWORK, ROOT, TINY_FLAGS
from sample_transformer import SampleConfig, sample_all
from training_vqgan import build_stage1, generator_step
from distributed import DistInfo
from utils import seed_everything

STAGE1 = [*TINY_FLAGS, "--val-fraction", "0.2", "--log-every", "1", "--sample-every", "2", "--save-every", "2"]


def start_torchrun(*args, nproc=2) -> subprocess.Popen:
    """A real torchrun launch (the point of these tests: processes, rendezvous, gloo), started."""
    env = {**os.environ, **NO_NETWORK, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def torchrun(*args, nproc=2) -> subprocess.CompletedProcess:
    return finish(start_torchrun(*args, nproc=nproc))


@pytest.fixture(scope="module")
def side_jobs(images, tmp_path_factory):
    """Three torchrun jobs started at once (each spends seconds starting processes): a user error on
    every rank, an exception on rank 1 alone, and a job that succeeds after DDP and collectives."""
    tmp = tmp_path_factory.mktemp("torchrun_jobs")
    driver = tmp / "driver.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import training_vqgan\n"
        "from runconfig import parse_train_vqgan\n"
        "from utils import run_cli\n"
        "real = training_vqgan.train_step\n"
        "def failing(s, x, step):\n"
        "    if step == 2 and os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return real(s, x, step)\n"
        "training_vqgan.train_step = failing\n"
        "sys.exit(run_cli(training_vqgan.main, parse_train_vqgan))\n")
    clean = tmp / "clean_exit.py"
    clean.write_text(
        "import atexit, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import torch.distributed as dist\n"
        "from distributed import setup_distributed\n"
        "from utils import run_cli\n"
        "atexit.register(lambda: print('interpreter shutdown ran', flush=True))\n"
        "def main(_):\n"
        "    setup_distributed(torch.device('cpu'))\n"
        "    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))\n"
        "    for _ in range(10):\n"
        "        dist.broadcast(torch.ones(1000), 0)\n"
        "    print('main done', flush=True)\n"
        "sys.exit(run_cli(main, lambda argv: None, []))\n")
    start = time.time()
    jobs = {"user_error": start_torchrun("training_vqgan.py", "--dataset-path", str(images), "--output-dir",
                                         str(tmp / "r"), *STAGE1, "--max-steps", "2", "--grad-accum", "4"),
            "exception": start_torchrun(str(driver), "--dataset-path", str(images), "--output-dir", str(tmp / "run"),
                                        *STAGE1, "--max-steps", "6"),
            "clean_exit": start_torchrun(str(clean))}
    results = {name: finish(proc) for name, proc in jobs.items()}
    return results, tmp, time.time() - start


@pytest.mark.slow
def test_both_stages_under_torchrun_keep_replicas_identical_and_resume(images, tmp_path):
    """Stage 1 for 2 steps with one discriminator pass over real and fake (--disc-joint-batch),
    resumed to step 4 with the default separate passes (BatchNorm buffers not broadcast); then
    stage 2. Every run ends with identical replicas (weights, and their EMA)."""
    run = tmp_path / "vqgan"
    codebook = ["--codebook-ema", "0.9", "--codebook-restart-after", "1", "--codebook-kmeans-init", "--ema-decay", "0.9"]
    first = torchrun("training_vqgan.py", "--dataset-path", str(images), "--output-dir", str(run), *STAGE1, *codebook,
                     "--max-steps", "2", "--disc-start", "1", "--grad-accum", "2", "--disc-joint-batch")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "weights identical on all 2 processes" in first.stdout
    assert "global batch 8 = 2 per process x 2 x 2 accumulated" in first.stdout
    assert first.stdout.count("validation PSNR before training") == 1  # only rank 0 prints
    assert "EMA of the weights, decay 0.9" in first.stdout  # its tensors are among the replicas compared

    resumed = torchrun("training_vqgan.py", "--dataset-path", str(images), "--output-dir", str(run), *STAGE1, *codebook,
                       "--max-steps", "4", "--disc-start", "1", "--grad-accum", "2", "--resume", "latest",
                       "--no-disc-joint-batch")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout and "weights identical on all 2 processes" in resumed.stdout
    assert "changed on resume: disc_joint_batch True -> False" in resumed.stdout
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss" in m]
    assert steps == [1, 2, 3, 4]  # one line per step, written once (rank 0), continuing the count
    # the discriminator learnt from --disc-start 1 on: joint at step 2, separate at steps 3 and 4
    assert [m["step"] for m in lines if "d_loss" in m] == [2, 3, 4]
    rng = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["rng"]
    assert len(rng["ranks"]) == 2  # each process resumes its own random stream
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])  # seeded per process

    stage2 = torchrun("training_transformer.py", "--dataset-path", str(images), "--vqgan-checkpoint",
                      str(run / "checkpoints" / "last.pt"), "--output-dir", str(tmp_path / "gpt"), "--n-layer", "1",
                      "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
                      "--max-steps", "2", "--val-fraction", "0.2", "--num-samples", "2", "--grad-accum", "2",
                      "--ema-decay", "0.9")
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    assert "weights identical on all 2 processes" in stage2.stdout


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(side_jobs):
    """A user error (here: the global batch is larger than the data) ends every process, exit 2
    from the ranks, with the rank named; no hang."""
    bad = side_jobs[0]["user_error"]
    assert bad.returncode != 0 and "(rank 0 of 2)" in bad.stderr and "global batch" in bad.stderr


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_the_job_without_a_hang(side_jobs):
    """Rank 1 alone fails mid-training; rank 0, waiting in a collective, must not hang."""
    results, _, elapsed = side_jobs
    r = results["exception"]
    assert r.returncode != 0 and "injected failure on rank 1" in r.stderr + r.stdout
    assert elapsed < 300  # ended by torchrun, not by a collective's 30-minute timeout


@pytest.mark.slow
def test_a_torchrun_process_ends_without_the_interpreter_shutdown(side_jobs):
    """After DDP and collectives, PyTorch keeps gloo's worker threads past destroy_process_group;
    one that lets go of a collective's tensor while the interpreter shuts down aborts the process
    (exit -6, "terminate called without an active exception"; a race, seen about once in 50 jobs
    on a loaded 2-core machine). So run_cli ends a torchrun process without that shutdown: exit
    code 0, the output complete, and no atexit handler runs."""
    r = side_jobs[0]["clean_exit"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("main done") == 2
    assert "interpreter shutdown ran" not in r.stdout


def _config(tiny_cfg, batch_size):
    return TrainVQGANConfig(model=tiny_cfg, perceptual_loss_factor=0, batch_size=batch_size, learning_rate=1e-3,
                            disc_ndf=16, disc_layers=2, disc_start=10**9)


def _worker(rank, world, init_file, cfgs, x, out, sample_args):
    """One process of the pair: a generator step on its half of the batch for each config, then
    its share of the samples (only rank 0 writes, as under torchrun)."""
    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # as the single process in the test
        for i, cfg in enumerate(cfgs):
            seed_everything(0)
            s = build_stage1(_config(cfg, x.shape[0] // world), torch.device("cpu"), None, 10, DistInfo(rank, rank, world))
            half = x.shape[0] // world
            generator_step(s, x[rank * half:(rank + 1) * half], step=0)
            torch.save({"state": {k: v.clone() for k, v in s.model.state_dict().items()},
                        "grad": {k: p.grad.clone() for k, p in s.model.named_parameters() if p.grad is not None}},
                       f"{out}.{i}.{rank}")
        torch.set_default_dtype(default)
        sample_all(sample_args, torch.device("cpu"), rank, world)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, transformer_run):
    """One pair of gloo processes (starting processes costs seconds) for the checks below: a
    generator step on each half of a batch for two codebook configs, then sampling 5 images split
    between them. Returns what the tests compare against one process."""
    tmp = tmp_path_factory.mktemp("two_processes")
    cfg = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=16,
                      embed_dim=8, n_embed=64)
    cfgs = [dataclasses.replace(cfg, codebook_ema=ema) for ema in (0.0, 0.9)]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    sample_args = SampleConfig(checkpoint=str(transformer_run.last), num_samples=5, batch_size=3, top_k=5,
                               class_label="1", npz=str(tmp / "two.npz"), png=False, device="cpu")
    mp.spawn(_worker, args=(2, str(tmp / "init"), cfgs, x, str(tmp / "state"), sample_args), nprocs=2, join=True)
    return dict(cfgs=cfgs, x=x, out=str(tmp / "state"), sample_args=sample_args, tmp=tmp)


@pytest.mark.slow
def test_two_processes_of_batch_b_update_like_one_process_of_batch_2b(two_processes, float64):
    """Without the GAN term (BatchNorm statistics are per process) the generator's update is a
    mean over the batch: DDP's averaged gradients (and the all-reduced EMA statistics of an EMA
    codebook, the second case) must give the single-process update. Equal in exact arithmetic,
    so everything runs in float64 and is compared tightly. Gradients are compared rather than
    Adam's first step, which is lr * sign(g) and so flips on rounding noise where a gradient is
    ~0 (conv biases before GroupNorm)."""
    x, out = two_processes["x"], two_processes["out"]
    for i, cfg in enumerate(two_processes["cfgs"]):
        seed_everything(0)
        single = build_stage1(_config(cfg, 4), torch.device("cpu"), None, 10)
        generator_step(single, x, step=0)
        ranks = [torch.load(f"{out}.{i}.{r}") for r in range(2)]
        for name, value in single.model.state_dict().items():
            assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # identical replicas
            if name.startswith("quantize."):  # the EMA codebook and its statistics (not moved by Adam)
                torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-10, atol=1e-13, msg=name)
        grads = {k: p.grad for k, p in single.model.named_parameters() if p.grad is not None}
        assert set(grads) == set(ranks[0]["grad"])
        for name, grad in grads.items():
            # atol: gradients that are zero in exact arithmetic come out as float64 rounding noise
            assert grad.dtype == torch.float64
            torch.testing.assert_close(ranks[0]["grad"][name], grad, rtol=1e-9, atol=1e-13, msg=name)


@pytest.mark.slow
def test_two_processes_split_the_samples_and_rank_0_gathers_them_in_order(two_processes):
    """5 samples on 2 processes: rank 0 draws the first 3 with seed 0, rank 1 the other 2 with
    seed 1, and the .npz holds all 5 in order: the same as one process drawing each share."""
    args, tmp = two_processes["sample_args"], two_processes["tmp"]
    two = np.load(tmp / "two.npz")["arr_0"]
    sample_all(dataclasses.replace(args, num_samples=3, npz=str(tmp / "a.npz")), torch.device("cpu"), 0, 1)
    sample_all(dataclasses.replace(args, num_samples=2, seed=1, npz=str(tmp / "b.npz")), torch.device("cpu"), 0, 1)
    expected = np.concatenate([np.load(tmp / f"{n}.npz")["arr_0"] for n in "ab"])
    assert two.dtype == np.uint8 and two.shape == (5, 16, 16, 3)
    # the same tokens; a decoded value on a rounding boundary may differ by one level between thread counts
    assert np.abs(two.astype(int) - expected.astype(int)).max() <= 1
