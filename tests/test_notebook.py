"""notebooks/quickstart.ipynb: a valid notebook stored with outputs, whose code cells run, in this
process, against tiny random checkpoints laid out as the demo runs leave them."""
import ast
import json
import os

import pytest
import torch
from PIL import Image

from checkpoint import save_checkpoint
from config import GPTConfig, VQGANConfig, config_to_dict
from conftest import ROOT
from transformer import VQGANTransformer, gpt_shape
from vqgan import VQGAN

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.fixture
def demo_runs(tmp_path):
    """runs/vqgan and runs/transformer checkpoints of the demo's shapes (64x64 images, 16x16
    tokens), with tiny random weights."""
    torch.manual_seed(0)
    vq_cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), resolution=64,
                         z_channels=8, embed_dim=8, n_embed=32)
    vqgan = VQGAN(vq_cfg)
    model = VQGANTransformer(vqgan, GPTConfig(n_layer=1, n_head=2, n_embd=32, **gpt_shape(vq_cfg, 0)))
    for name in ("vqgan", "transformer"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
    save_checkpoint({"kind": "vqgan", "model": vqgan.state_dict(), "model_config": vqgan.config_dict()},
                    tmp_path / "runs" / "vqgan" / "checkpoints" / "last.pt")
    save_checkpoint({"kind": "transformer", "model": model.gpt.state_dict(),
                     "model_config": config_to_dict(model.gpt.config), "vqgan": vqgan.state_dict(),
                     "vqgan_config": vqgan.config_dict(), "classes": []},
                    tmp_path / "runs" / "transformer" / "checkpoints" / "last.pt")
    return tmp_path


def code_cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def run_cell(source: str, namespace: dict):
    """Run a cell as Jupyter does: its last expression's value is the cell's output."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), namespace)
    return eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace) if last else None


def test_notebook_is_stored_with_outputs():
    cells = code_cells()
    assert len(cells) >= 5 and all(cell["outputs"] for cell in cells[1:])  # all but the set-up cell
    images = [o for c in cells for o in c["outputs"] if "image/jpeg" in o.get("data", {})]
    assert len(images) >= 3


def test_notebook_cells_run_against_demo_shaped_checkpoints(demo_runs, monkeypatch, capsys):
    monkeypatch.chdir(demo_runs)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the set-up cell inserts the cwd
    namespace: dict = {}
    shown = []
    for cell in code_cells():
        value = run_cell("".join(cell["source"]), namespace)
        if isinstance(value, Image.Image):
            shown.append(value.size)
    printed = capsys.readouterr().out
    assert "z_q (8, 8, 16, 16) indices (8, 16, 16)" in printed and "(8, 16, 16)" in printed
    # inputs above reconstructions; samples; inputs, reconstructions, completions; the 16x48 grid
    assert shown == [(8 * 66 + 2, 2 * 66 + 2), (8 * 66 + 2, 66 + 2), (8 * 66 + 2, 3 * 66 + 2), (2 * 194 + 2, 66 + 2)]
    # "the same as model.decode(z_q)", as the cell says: equal in exact arithmetic, so checked in float64
    model, x = namespace["model"].double(), namespace["x"].double()
    with torch.no_grad():
        z_q, indices, _ = model.encode(x)
        torch.testing.assert_close(model.decode_indices(indices), model.decode(z_q), rtol=1e-10, atol=1e-10)
    assert torch.equal(namespace["completed"][:, :8], namespace["indices"][:, :8])  # the prefix is kept
    assert namespace["wide"].shape == (2, 16, 48)
