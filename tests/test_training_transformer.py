"""Stage 2 end to end: the shared tiny VQGAN run -> training_transformer.py -> sample_transformer.py,
in-process through each script's cli()."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import GPT_FLAGS, assert_user_error, copy_run, write_images
from transformer import VQGANTransformer


def test_unconditional_pipeline_and_resume(tmp_path, vqgan_run, images, cli):
    out = tmp_path / "run"
    common = ["--dataset-path", images, "--checkpoint-path", vqgan_run.last, "--output-dir", out, "--log-every", "1",
              "--val-fraction", "0.2", *GPT_FLAGS]
    r = cli("training_transformer", *common, "--max-steps", "3", "--sample-every", "3", "--sos-token", "0")
    assert r.returncode == 0, r.stderr
    assert "--sos-token 0 is ignored" in r.stderr and "tokens cached" in r.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt", "step_0000003.pt"]
    grid = Image.open(out / "samples" / "step_0000003.png")
    assert grid.size[1] > 3 * 16  # four rows of 16-pixel images
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3] and any("val_loss" in m for m in lines)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["kind"] == "transformer" and ckpt["classes"] == [] and ckpt["model_config"]["vocab_size"] == 33

    model = VQGANTransformer.from_checkpoint(out / "checkpoints" / "last.pt")
    images_ = model.indices_to_images(model.sample(2))
    assert images_.shape == (2, 3, 16, 16) and images_.min() >= -1 and images_.max() <= 1

    samples = tmp_path / "samples"
    r = cli("sample_transformer", "--checkpoint", out / "checkpoints" / "last.pt", "--num-samples", "3",
            "--batch-size", "2", "--top-k", "5", "--out", samples, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(samples)) == ["grid.png", "sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert Image.open(samples / "sample_0000.png").size == (16, 16)
    r = cli("sample_transformer", "--checkpoint", out / "checkpoints" / "last.pt", "--num-samples", "1",
            "--grid", "8", "10", "--out", tmp_path / "big", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "big" / "sample_0000.png").size == (20, 16)  # 8x10 tokens of 2x2 pixels

    r = cli("training_transformer", *common, "--max-steps", "5", "--resume", "latest")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5]


def test_conditional_run_and_guided_sampling(transformer_run, tmp_path, cli):
    assert "2 classes" in transformer_run.stdout and "tokens cached" in transformer_run.stdout
    assert torch.load(transformer_run.last, weights_only=True)["classes"] == ["class0", "class1"]
    r = cli("sample_transformer", "--checkpoint", transformer_run.last, "--num-samples", "2", "--class-label", "class1",
            "--cfg-scale", "2", "--out", tmp_path / "s", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "sample_0000.png", "sample_0001.png"]


@pytest.mark.parametrize("args, expected", [
    (["--class-label", "cat"], "not one of this model's classes"),
    (["--class-label", "7"], "not known to this model"),
    (["--grid", "2", "8"], "smaller than the training grid"),
    (["--top-k", "0"], "keeps no token"),
])
def test_sampling_user_errors_write_nothing(transformer_run, tmp_path, cli, args, expected):
    r = cli("sample_transformer", "--checkpoint", transformer_run.last, "--out", tmp_path / "x", "--device", "cpu", *args)
    assert_user_error(r, expected)
    assert not (tmp_path / "x").exists()  # nothing written half-way


def test_a_stage1_checkpoint_is_not_a_transformer(vqgan_run, tmp_path, cli):
    r = cli("sample_transformer", "--checkpoint", vqgan_run.last, "--out", tmp_path / "x", "--device", "cpu")
    assert_user_error(r, "not a stage-2 (transformer) checkpoint")
    assert not (tmp_path / "x").exists()


def test_conditional_runs_check_their_classes(transformer_run, vqgan_run, tmp_path, cli):
    # a stage-2 checkpoint where a VQGAN is expected gives its VQGAN: what stops this run is the empty folder
    r = cli("training_transformer", "--dataset-path", tmp_path, "--vqgan-checkpoint", transformer_run.last,
            "--output-dir", tmp_path / "r2", *GPT_FLAGS)
    assert_user_error(r, "holds no image files")
    # resuming a conditional run on a folder with other classes
    out = copy_run(transformer_run, tmp_path)
    other = tmp_path / "other"
    write_images(other / "x", n=2, size=(20, 20))
    write_images(other / "y", n=2, size=(20, 20))
    r = cli("training_transformer", "--dataset-path", other, "--vqgan-checkpoint", vqgan_run.last, "--output-dir", out,
            "--max-steps", "4", "--conditional", "--resume", "latest", *GPT_FLAGS)
    assert_user_error(r, "differ from the checkpoint's")
    # images directly in the dataset folder cannot be given a class
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(flat / f"{i}.png")
    r = cli("training_transformer", "--dataset-path", flat, "--vqgan-checkpoint", vqgan_run.last,
            "--output-dir", tmp_path / "r3", "--conditional", *GPT_FLAGS)
    assert_user_error(r, "first-level subfolder")


def test_augmented_runs_encode_every_step(images, vqgan_run, tmp_path, cli):
    r = cli("training_transformer", "--dataset-path", images, "--vqgan-checkpoint", vqgan_run.last, "--output-dir",
            tmp_path / "run", "--max-steps", "2", "--augment", *GPT_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "tokens cached" not in r.stdout


def test_demo_without_stage1_says_what_to_run(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/vqgan here
    r = cli("training_transformer", "--device", "cpu")
    assert_user_error(r, "run `python training_vqgan.py` first")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_vqgan_saved_inside_its_codebook_warmup_is_refused(tmp_path):
    from config import TrainTransformerConfig, VQGANConfig
    from errors import UserError
    from training_transformer import load_vqgan
    from vqgan import VQGAN

    cfg = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=8,
                      embed_dim=8, n_embed=16, codebook_kmeans_init=True, codebook_warmup=5)
    model = VQGAN(cfg)
    model.save_pretrained(tmp_path / "early")
    run = TrainTransformerConfig(dataset_path=str(tmp_path), vqgan_checkpoint=str(tmp_path / "early"))
    with pytest.raises(UserError, match="inside its run's codebook warm-up"):
        load_vqgan(run, None, None)
    model.quantize.maintenance.initted.fill_(True)  # after the k-means step it is a tokenizer
    model.save_pretrained(tmp_path / "later")
    vqgan, _ = load_vqgan(TrainTransformerConfig(dataset_path=str(tmp_path), vqgan_checkpoint=str(tmp_path / "later")),
                          None, None)
    assert vqgan.quantize.codes_initialized()


def test_compiled_training_is_one_graph_and_does_not_recompile(tiny_cfg, monkeypatch):
    """--compile in stage 2: the GPT with its loss, input corruption and class dropout trace as one
    graph (fullgraph=True), and after the first step the following ones reuse it while the
    learning rate warms up, the gradients are clipped and the EMA moves (the compile counters do
    not move); validation and sample grids, with a last batch of another size, run eagerly."""
    import training_transformer
    from torch._dynamo.utils import counters

    from config import GPTConfig, TrainTransformerConfig
    from training_transformer import build_stage2, evaluate_loss, sample_grid, train_step
    from transformer import gpt_shape
    from vqgan import VQGAN

    monkeypatch.setattr(training_transformer, "COMPILE_OPTIONS", dict(backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    torch.manual_seed(0)
    gpt = GPTConfig(n_layer=1, n_head=2, n_embd=32, **gpt_shape(tiny_cfg, 2))
    cfg = TrainTransformerConfig(model=gpt, batch_size=2, compile=True, pkeep=0.7, class_dropout=0.5, ema_decay=0.9,
                                 grad_clip=1.0, lr_warmup_steps=4, num_samples=2)
    s = build_stage2(cfg, VQGANTransformer(VQGAN(tiny_cfg), gpt, classes=("a", "b")), torch.device("cpu"),
                     total_steps=10)
    h = tiny_cfg.latent_size

    def batch(n):
        return torch.randint(0, tiny_cfg.n_embed, (n, h, h)), torch.randint(0, 2, (n,))

    before = counters["stats"]["unique_graphs"]  # the counters add up over the test session
    first = train_step(s, [batch(2)], 0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 1 and first["skipped"].item() == 0  # the forward really is compiled, as one graph
    for step in range(1, 4):
        logs = train_step(s, [batch(2)], step)
    assert counters["stats"]["unique_graphs"] == graphs and logs["skipped"].item() == 0
    loss = evaluate_loss(s, [batch(2), batch(1)])
    with s.eval_weights():
        rows = sample_grid(s, torch.rand(2, 3, tiny_cfg.resolution, tiny_cfg.resolution) * 2 - 1, torch.tensor([0, 1]),
                           torch.Generator().manual_seed(0))
    assert loss > 0 and len(rows) == 4 and counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
