"""Stage-1 training: gradient isolation of the two steps, the single-backward generator step
against the reference's two-backward computation, learning, determinism, and the CLI."""
import dataclasses
import json
import math
import os

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import TINY_FLAGS, assert_user_error, copy_run, make_stage1, random_batch, random_vgg_file, write_images
from training_vqgan import discriminator_step, generator_step, train_step
from vqgan import VQGAN


def test_generator_step_gives_no_gradient_to_the_discriminator(tiny_cfg):
    s = make_stage1(tiny_cfg, disc_start=0)
    before = [p.detach().clone() for p in s.disc.parameters()]
    logs, x_recs, _ = generator_step(s, random_batch(), step=0)
    assert logs["g_loss"].item() != 0 and logs["d_weight"].item() > 0  # the GAN term was active
    assert all(p.grad is None for p in s.disc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, s.disc.parameters()))
    assert all(p.requires_grad for p in s.disc.parameters())  # unfrozen again afterwards
    assert s.model.decoder.conv_out.weight.grad is not None
    assert len(x_recs) == 1 and not x_recs[0].requires_grad


def test_discriminator_step_gives_no_gradient_to_the_vqgan(tiny_cfg):
    s = make_stage1(tiny_cfg, disc_start=0)
    x = random_batch()
    x_rec, _, _ = s.model(x)  # not detached on purpose: the step must detach it
    s.model.zero_grad(set_to_none=True)
    params = [p.detach().clone() for p in s.model.parameters()]
    logs = discriminator_step(s, x, x_rec, step=0)
    assert logs["d_loss"].item() > 0
    assert all(p.grad is None for p in s.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, s.model.parameters()))
    assert all(p.grad is not None for p in s.disc.parameters())


def test_no_discriminator_work_before_disc_start(tiny_cfg):
    s = make_stage1(tiny_cfg, disc_start=10)
    logs = train_step(s, random_batch(), step=9)
    assert "d_loss" not in logs and logs["g_loss"].item() == 0
    assert all(p.grad is None for p in s.disc.parameters())
    assert "d_loss" in train_step(s, random_batch(), step=10)


def test_a_channels_last_step_is_the_contiguous_step(tiny_cfg, tmp_path, float64):
    """--memory-format channels-last keeps every convolution weight (VQGAN, discriminator,
    LPIPS) and the batches in NHWC; it is a layout, not other arithmetic: two whole training
    steps (GAN and LPIPS active) give the contiguous run's losses and weights (float64), and the
    weights load into a contiguous model as they are."""
    from lpips import load_lpips

    vgg = str(random_vgg_file(tmp_path)[0])
    runs = {}
    for fmt in ("contiguous", "channels-last"):
        s = make_stage1(tiny_cfg, disc_start=0, perceptual_loss_factor=1.0, perceptual=load_lpips(vgg).double(),
                        memory_format=fmt)
        logs = [train_step(s, random_batch(seed), step=seed) for seed in range(2)]
        runs[fmt] = s, logs
    (plain, plain_logs), (nhwc, nhwc_logs) = runs["contiguous"], runs["channels-last"]
    assert not plain.channels_last and nhwc.channels_last
    for net in (nhwc.model, nhwc.disc, nhwc.perceptual):
        convs = [p for p in net.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
                             if p.shape[2:] != (1, 1))  # (1x1 kernels have both layouts at once)
    for a, b in zip(plain_logs, nhwc_logs):
        for key in ("rec_loss", "p_loss", "q_loss", "g_loss", "d_loss"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-12)
    for net in ("model", "disc"):  # Adam moved each weight by about 1e-3 per step: equal to a millionth of that
        for (name, a), b in zip(getattr(plain, net).state_dict().items(), getattr(nhwc, net).state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-9, msg=lambda m: f"{name}: {m}")
    fresh = VQGAN(tiny_cfg)
    fresh.load_state_dict(nhwc.model.state_dict())
    assert all(p.is_contiguous() for p in fresh.parameters())


def test_compile_mode_reaches_every_compiled_network_of_both_stages(tiny_cfg, monkeypatch):
    """--compile-mode (e.g. reduce-overhead: CUDA graphs) is what torch.compile receives for each
    network stage 1 compiles and for stage 2's GPT with its loss; default passes no mode."""
    from config import GPTConfig, TrainTransformerConfig
    from training_transformer import build_stage2
    from transformer import VQGANTransformer, gpt_shape

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(("trunk", kw)) or fn)
    for mode in ("reduce-overhead", "default"):
        seen.clear()
        make_stage1(tiny_cfg, compile=True, compile_mode=mode)
        gpt = GPTConfig(n_layer=1, n_head=2, n_embd=32, **gpt_shape(tiny_cfg, 0))
        build_stage2(TrainTransformerConfig(model=gpt, compile=True, compile_mode=mode),
                     VQGANTransformer(VQGAN(tiny_cfg), gpt), torch.device("cpu"), total_steps=10)
        names = [name for name, _ in seen]
        assert names == ["Encoder", "VectorQuantizer", "trunk", "NLayerDiscriminator", "VQGANTransformer"], names
        expected = mode if mode != "default" else None
        assert all(kw.get("mode") == expected for _, kw in seen), seen


def test_memory_format_auto_is_channels_last_only_compiled_on_cuda(tiny_cfg):
    from config import TrainVQGANConfig
    from training_vqgan import uses_channels_last

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = TrainVQGANConfig(model=tiny_cfg)
    assert not uses_channels_last(auto, cuda) and not uses_channels_last(auto, cpu)
    assert uses_channels_last(dataclasses.replace(auto, compile=True), cuda)
    assert not uses_channels_last(dataclasses.replace(auto, compile=True), cpu)
    assert uses_channels_last(dataclasses.replace(auto, memory_format="channels-last"), cpu)
    assert not uses_channels_last(dataclasses.replace(auto, compile=True, memory_format="contiguous"), cuda)


@pytest.mark.parametrize("perceptual", [False, True])
def test_the_generator_step_computes_the_two_backward_gradients(tiny_cfg, tmp_path, float64, perceptual):
    """generator_step (the single-backward execution, the discriminator frozen and scoring the
    reconstructions on their own) against the reference's two-backward execution of the paper's
    objective (losses.backward_two_pass) on an identical copy. Equal in exact arithmetic, so
    compared in float64: lambda and every VQGAN gradient."""
    from losses import LossWeights, backward_two_pass, generator_terms
    from lpips import load_lpips

    lp = load_lpips(str(random_vgg_file(tmp_path)[0])).double() if perceptual else None
    kw = dict(disc_start=0, disc_weight=0.7, disc_factor=0.9, codebook_weight=1.3,
              perceptual_loss_factor=float(perceptual), perceptual=lp)
    x = random_batch()
    fast = make_stage1(tiny_cfg, **kw)
    logs, _, _ = generator_step(fast, x, step=0)
    plain = make_stage1(tiny_cfg, **kw)
    x_rec, _, q_loss = plain.model(x)
    plain.disc.requires_grad_(False)
    w = LossWeights.of(plain.cfg)
    lam = backward_two_pass(generator_terms(x, x_rec, q_loss, w, lp, plain.disc(x_rec)), plain.model.last_layer, w,
                            gan=True, scale=torch.ones(()))

    assert logs["d_weight"].dtype == torch.float64 and lam.item() > 0
    torch.testing.assert_close(logs["d_weight"], lam, rtol=1e-10, atol=0)
    n_grads = 0
    for (name, a), b in zip(fast.model.named_parameters(), plain.model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            # atol: gradients that are zero in exact arithmetic (conv biases before a GroupNorm)
            # come out as float64 rounding noise on both sides
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13, msg=name)
            n_grads += 1
    assert n_grads == sum(1 for p in plain.model.parameters() if p.requires_grad)


def test_restarts_count_optimizer_steps_under_gradient_accumulation(tiny_cfg):
    """With --grad-accum 2 each optimizer step sees two forward passes; a code unused for N
    optimizer steps is restarted at step N, not N/2."""
    import dataclasses

    s = make_stage1(dataclasses.replace(tiny_cfg, codebook_restart_after=4), disc_start=10**9)
    with torch.no_grad():
        s.model.quantize.embedding.weight[5] = 1e4  # a code no encoder output comes near
    restarted_at = None
    for step in range(4):
        logs = train_step(s, [random_batch(2 * step, n=2), random_batch(2 * step + 1, n=2)], step)
        counter = s.model.quantize.maintenance.unused_steps[5].item()
        if logs["codes_restarted"].item() > 0:
            restarted_at = step + 1
            break
        assert counter == step + 1  # one count per optimizer step, not per micro-batch
    assert restarted_at == 4 and s.model.quantize.embedding.weight[5].abs().max() < 1e3


def test_the_discriminator_sees_real_and_fake_separately_by_default(tiny_cfg, monkeypatch):
    """As the reference: the generator step scores the reconstructions alone, the discriminator
    step makes one pass over the real and one over the reconstructed batch; --disc-joint-batch
    makes one pass over both, in both steps."""
    from discriminator import NLayerDiscriminator

    batches = []
    forward = NLayerDiscriminator.forward
    monkeypatch.setattr(NLayerDiscriminator, "forward", lambda self, x: batches.append(x.shape[0]) or forward(self, x))
    for joint, expected in ((False, [4, 4, 4]), (True, [8, 8])):
        batches.clear()
        train_step(make_stage1(tiny_cfg, disc_start=0, disc_joint_batch=joint), random_batch(), step=0)
        assert batches == expected, joint


@pytest.mark.slow  # 60 optimizer steps: about 5 s (the L1 loss is then near 0.3 of its first value)
def test_overfitting_one_batch_halves_l1(tiny_cfg):
    s = make_stage1(tiny_cfg, disc_start=10**9)
    x = random_batch(n=4)
    first = None
    for step in range(60):
        logs = train_step(s, x, step)
        first = first if first is not None else logs["rec_loss"].item()
    assert logs["rec_loss"].item() < 0.5 * first


def test_same_seed_same_losses(tiny_cfg):
    runs = []
    for _ in range(2):
        s = make_stage1(tiny_cfg, disc_start=1)
        runs.append([train_step(s, random_batch(i), i)["loss"].item() for i in range(3)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_step_runs_on_cpu(tiny_cfg, precision):
    """bf16 autocast, and fp16 with its GradScalers (each optimizer its own), on the CPU."""
    s = make_stage1(tiny_cfg, disc_start=0, precision=precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert s.amp_dtype == dtype and s.scaler_g.is_enabled() == (precision == "fp16")
    x = random_batch()
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
    s = make_stage1(tiny_cfg, disc_start=0, lr_schedule=schedule)
    s.total_steps = 10
    for step, lr in zip((0, 5, 10), expected):
        train_step(s, random_batch(step), step)
        assert [g["lr"] for opt in (s.opt_g, s.opt_d) for g in opt.param_groups] == pytest.approx([lr, lr])


# ------------------------------------------------------------------------------------- CLI
def test_a_cli_run_fills_its_run_folder(vqgan_run):
    """The shared 3-step run: what it printed, its files, metrics, config and checkpoints."""
    out = vqgan_run.path
    assert "validation PSNR before training" in vqgan_run.stdout and "validation PSNR after 3 steps" in vqgan_run.stdout
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "file_index.json", "metrics.jsonl", "samples"]
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert os.listdir(out / "samples") == ["step_0000003.png"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert "d_loss" in train_lines[-1] and "d_loss" not in train_lines[0]  # the discriminator from step 2
    for key in ("rec_loss", "q_loss", "g_loss", "d_weight", "usage", "perplexity", "lr", "step_time"):
        assert key in train_lines[-1]
    assert any("val_psnr" in m for m in lines)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_embed"] == 32 and config["model"]["resolution"] == 16

    ckpt = torch.load(vqgan_run.last, weights_only=True)
    for key in ("model", "model_config", "discriminator", "opt_g", "opt_d", "step", "train_config", "rng"):
        assert key in ckpt
    assert ckpt["step"] == 3
    model = VQGAN.from_checkpoint(vqgan_run.last)
    assert model(torch.zeros(1, 3, 16, 16))[1].shape == (1, 8, 8)


def test_resume_continues_and_a_new_run_may_not_overwrite(vqgan_run, images, tmp_path, cli):
    out = copy_run(vqgan_run, tmp_path)
    base = ["--dataset-path", images, "--output-dir", out, *TINY_FLAGS, "--val-fraction", "0.2"]
    # a second run into the same folder must not overwrite it ...
    assert_user_error(cli("training_vqgan", *base, "--max-steps", "5"), "--resume latest")
    # ... --resume latest continues the step count
    r = cli("training_vqgan", *base, "--max-steps", "5", "--resume", "latest", "--log-every", "1")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 3" in r.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 5
    # resuming with another architecture is refused with the difference named
    r = cli("training_vqgan", *base, "--max-steps", "6", "--resume", "latest", "--num-codebook-vectors", "64")
    assert_user_error(r, "trained with --n-embed 32")
    assert json.loads((out / "config.json").read_text())["model"]["n_embed"] == 32  # the run folder is untouched


@pytest.mark.parametrize("case", ["empty", "missing", "no_vgg", "bad_size", "batch_zero", "resume_missing"])
def test_cli_user_errors_exit_2_with_one_message(tmp_path, cli, case):
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
    r = cli("training_vqgan", *args)
    expected = {"empty": "holds no image files", "missing": "is not a folder",
                "no_vgg": "--perceptual-loss-factor 0", "bad_size": "not divisible",
                "batch_zero": "--batch-size 0 is out of range", "resume_missing": "does not exist"}[case]
    assert_user_error(r, expected)
    assert r.stderr.startswith("error: ")
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_cli_help_lists_flags_with_defaults(cli):
    r = cli("training_vqgan", "--help")
    assert r.returncode == 0
    for text in ("--dataset-path", "--preset", "--max-steps", "--vgg-weights", "--precision", "(default: hinge)"):
        assert text in r.stdout


def test_gumbel_quantizer_trains_with_the_reference_temperature_schedule(tiny_cfg):
    """The reference's GumbelVQ: the temperature follows a cosine from 0.9 towards 1e-6 over
    1,000,001 steps (set at every step), and the KL term weighs 1e-8."""
    import dataclasses

    from training_vqgan import gumbel_temperature

    s = make_stage1(dataclasses.replace(tiny_cfg, quantizer="gumbel", z_channels=8, embed_dim=8), disc_start=10**9)
    assert s.model.quantize.kl_weight == 1e-8
    assert gumbel_temperature(0, s.cfg) == pytest.approx(0.9, rel=1e-12)
    assert gumbel_temperature(500000, s.cfg) == pytest.approx(1e-6 + 0.5 * (0.9 - 1e-6) * (1 + math.cos(math.pi * 500000 / 1000001)), rel=1e-12)
    assert gumbel_temperature(2 * 10**6, s.cfg) == pytest.approx(1e-6, rel=1e-9)
    logs = train_step(s, random_batch(), step=250000)
    assert s.model.quantize.temperature == gumbel_temperature(250000, s.cfg) and logs["skipped"].item() == 0
    assert 0 < logs["usage"].item() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", ["contiguous", "channels-last"])
def test_compiled_training_is_one_graph_per_network_and_does_not_recompile(tiny_cfg, monkeypatch, memory_format):
    """--compile: encoder, quantizer (factorized, l2-normalized, EMA codes, entropy term: every
    option of its forward), decoder trunk and discriminator each trace as one graph
    (fullgraph=True: nothing in them needs the host), and after the first steps without and with
    the GAN term further steps reuse the compiled graphs (the compile counters do not move); in
    either memory format (channels-last: what --compile uses on CUDA)."""
    import training_vqgan
    from torch._dynamo.utils import counters

    monkeypatch.setattr(training_vqgan, "COMPILE_OPTIONS", dict(backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    codebook = dict(codebook_dim=8, codebook_l2_norm=True, codebook_ema=0.9, codebook_entropy_weight=0.1,
                    codebook_restart_after=2)
    s = make_stage1(dataclasses.replace(tiny_cfg, **codebook), compile=True, disc_start=1, memory_format=memory_format)
    assert s.channels_last == (memory_format == "channels-last")
    x = random_batch(n=2)
    before = counters["stats"]["unique_graphs"]  # the counters add up over the test session
    for step in range(2):  # warm-up: a step without the GAN term, then one with it
        train_step(s, x, step)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= before + 4  # the networks really are compiled
    for step in range(2, 5):
        train_step(s, x, step)
    assert counters["stats"]["unique_graphs"] == graphs
    # validation and sample grids (eval mode, no gradients, another batch size) run eagerly: no new graphs
    psnr = training_vqgan.evaluate_psnr(s, [random_batch(n=3), random_batch(n=1)])
    with torch.no_grad(), s.eval_weights():
        s.model.eval()
        s.model(x)
    assert math.isfinite(psnr) and counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
