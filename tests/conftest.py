"""Shared fixtures: the flat layout's modules on sys.path, tiny configurations and command-line
flags, image folders, tiny checkpoints made once per test run, and an in-process CLI runner.

Nothing here downloads: a closed local port is the proxy for the whole run, and torch's hub cache
points at an empty folder, so a test sees the same machine whatever a user has cached."""
import importlib
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# any download attempt fails at once instead of reaching the network
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
              "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
os.environ.update(NO_NETWORK)

from config import VQGANConfig  # noqa: E402

# A stage-1 model for command-line runs: 16x16 images, two levels (8x8 tokens), 32 codes.
TINY_FLAGS = ["--ch", "32", "--ch-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
              "--image-size", "16", "--latent-dim", "16", "--num-codebook-vectors", "32", "--batch-size", "2",
              "--disc-ndf", "8", "--disc-layers", "1", "--num-workers", "0", "--perceptual-loss-factor", "0",
              "--device", "cpu"]
# A stage-2 GPT for command-line runs: one layer, width 32.
GPT_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--num-workers", "0",
             "--device", "cpu", "--num-samples", "2", "--lr-warmup-steps", "1"]


@pytest.fixture(scope="session", autouse=True)
def empty_torch_hub(tmp_path_factory):
    """torch's hub cache in an empty folder: no test finds (or writes) VGG16 weights there."""
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))
    yield
    if old is None:
        del os.environ["TORCH_HOME"]
    else:
        os.environ["TORCH_HOME"] = old


@pytest.fixture
def tiny_cfg() -> VQGANConfig:
    """Two levels (f2), attention at 16x16 and in the middle, 64 codes, 32x32 images."""
    return VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                       z_channels=16, embed_dim=8, n_embed=64)


def write_images(folder, n=6, size=(40, 48), seed=0):
    """n small random RGB images (PNG and JPEG) in two class folders; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"class{i % 2}")
        os.makedirs(sub, exist_ok=True)
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = os.path.join(sub, f"img{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """12 random 24x24 images in class0/ and class1/ (read-only by convention: copy to change)."""
    folder = tmp_path_factory.mktemp("images") / "images"
    write_images(folder, n=12, size=(24, 24))
    return folder


# ------------------------------------------------------------------------------- the CLIs
@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """cli("training_vqgan", *args): the script's command line run in this process (its `cli`
    function: exit code 0, or 2 after a user error), with what it printed."""

    def run(module: str, *args) -> Result:
        capsys.readouterr()  # drop what came before
        try:
            code = importlib.import_module(module).cli([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, bad choices
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def assert_user_error(result: Result, expected: str) -> None:
    """Exit code 2, one `error:` line naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-2000:]


def assert_same_state(a, b, path=""):
    """Nested dicts/lists of tensors and plain values equal exactly (tensors bit for bit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ------------------------------------------------------------------- checkpoints made once
@dataclass
class Run:
    """A run folder made by a fixture and what its command printed."""
    path: "os.PathLike"
    stdout: str
    stderr: str

    @property
    def last(self):
        return self.path / "checkpoints" / "last.pt"


def run_in_process(main, cfg) -> tuple[str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(cfg)
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def vqgan_run(images, tmp_path_factory) -> Run:
    """A stage-1 run folder trained for 3 steps with TINY_FLAGS (discriminator from step 2,
    snapshots at steps 2 and 3, one sample grid), shared by the whole test session: copy it
    (copy_run) before changing it."""
    import training_vqgan
    from runconfig import parse_train_vqgan

    out = tmp_path_factory.mktemp("vqgan_run") / "run"
    logs = run_in_process(training_vqgan.main, parse_train_vqgan([
        "--dataset-path", str(images), "--output-dir", str(out), *TINY_FLAGS, "--max-steps", "3", "--disc-start", "2",
        "--log-every", "1", "--sample-every", "3", "--save-every", "2", "--val-fraction", "0.2"]))
    return Run(out, *logs)


@pytest.fixture(scope="session")
def transformer_run(images, vqgan_run, tmp_path_factory) -> Run:
    """A conditional stage-2 run folder (2 classes, 3 steps) over vqgan_run's checkpoint."""
    import training_transformer
    from runconfig import parse_train_transformer

    out = tmp_path_factory.mktemp("transformer_run") / "run"
    logs = run_in_process(training_transformer.main, parse_train_transformer([
        "--dataset-path", str(images), "--vqgan-checkpoint", str(vqgan_run.last), "--output-dir", str(out),
        "--max-steps", "3", "--conditional", "--log-every", "1", "--sample-every", "3", "--val-fraction", "0.2",
        *GPT_FLAGS]))
    return Run(out, *logs)


def copy_run(run: Run, tmp_path):
    """A private copy of a shared run folder."""
    return shutil.copytree(run.path, tmp_path / "run_copy")


def random_vgg_file(tmp_path, seed=0):
    """A VGG16 state dict in torchvision's layout (features.N.*, classifier.*), random weights."""
    from lpips import LPIPS

    torch.manual_seed(seed)
    state = {}
    for name, value in LPIPS().net.state_dict().items():  # slice2.5.weight -> features.5.weight
        state["features." + name.split(".", 1)[1]] = torch.randn_like(value) * 0.05
    state["classifier.0.weight"] = torch.randn(4, 4)  # ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    return path, state


def reference_shapes(section):
    """Names and shapes read off the reference implementation (tests/data)."""
    import json

    with open(os.path.join(ROOT, "tests", "data", "taming_state_dicts.json")) as f:
        return {k: list(v) for k, v in json.load(f)[section].items()}


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """torch-fidelity's Inception architecture with random weights, saved as its weights file
    would be (the real one is downloaded by users, never by tests)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    monkeypatch.undo()
    for m in net.modules():  # He initialization keeps the random features from vanishing
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def float64():
    """Tensors and modules created inside the test are float64: identities that hold in exact
    arithmetic are then compared tightly, on any CPU (float32 sums re-associate differently
    across machines and thread counts)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------------ stage-1 pieces
def make_stage1(model_cfg, **kw):
    """A Stage1 on the CPU without LPIPS (unless perceptual=...): batch 4, learning rate 1e-3, a
    small discriminator, 1000 steps in the run (total_steps=...)."""
    from config import TrainVQGANConfig
    from training_vqgan import build_stage1
    from utils import seed_everything

    seed_everything(0)
    options = dict(perceptual_loss_factor=0, batch_size=4, learning_rate=1e-3, disc_ndf=16, disc_layers=2)
    perceptual, total_steps = kw.pop("perceptual", None), kw.pop("total_steps", 1000)
    cfg = TrainVQGANConfig(model=model_cfg, **{**options, **kw})
    return build_stage1(cfg, torch.device("cpu"), perceptual, total_steps)


def random_batch(seed=0, n=4, size=32):
    """n random images in [-1, 1] (in the default dtype)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1).to(torch.get_default_dtype())


# ------------------------------------------------------------ the reference's file layout
def save_lightning(path, state_dict, extra=None):
    """torch.save a Lightning-style checkpoint whose callbacks are keyed by a class from a module
    that is removed again before loading (as pytorch_lightning is absent here)."""
    import types

    module = types.ModuleType("fake_lightning_callbacks")
    exec("class ModelCheckpoint:\n    def __init__(self):\n        self.best = 1.0\n", module.__dict__)
    module.ModelCheckpoint.__module__ = module.__name__
    sys.modules[module.__name__] = module
    try:
        torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                    "state_dict": state_dict, "callbacks": {module.ModelCheckpoint: {"best_model_score": 0.5}},
                    "hparams": module.ModelCheckpoint(), **(extra or {})}, path)
    finally:
        del sys.modules[module.__name__]


# Attention at 128 for resolution 256 is level 1: the same numbers shape inference reports.
REFERENCE_TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), resolution=256,
                             z_channels=16, embed_dim=16, n_embed=24, legacy_beta=True)


def reference_vqgan(tmp_path, cfg=REFERENCE_TINY, seed=0):
    """A tiny random VQGAN saved as a taming-transformers .ckpt (with loss.* entries)."""
    from vqgan import VQGAN

    torch.manual_seed(seed)
    model = VQGAN(cfg).eval()
    state = {**model.state_dict(), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
             "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1)}
    path = tmp_path / "last.ckpt"
    save_lightning(path, state)
    return model, path
