"""Rebuild notebooks/quickstart.ipynb: run its cells against the demo run folders (runs/vqgan,
runs/transformer) and store their outputs. Run from anywhere: python notebooks/make_quickstart.py"""
import base64
import contextlib
import io
import json
import os
import sys
import ast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
sys.path.insert(0, ROOT)

cells = [
    ("markdown", """# Quickstart: tokens in, tokens out

This notebook uses the two demo runs (`python training_vqgan.py`, then `python training_transformer.py`)
to show the public API: encode images to code indices, decode them back, and sample new token grids
with the stage-2 transformer. The outputs stored here come from those tiny CPU demo models
(64x64 images, 16x16 tokens, 1024 codes), so expect blurry pictures; the calls are the same for
full-size models and for the official taming-transformers checkpoints."""),
    ("code", """import os, sys
if os.path.basename(os.getcwd()) == "notebooks":  # run from the repository root
    os.chdir("..")
sys.path.insert(0, os.getcwd())

import torch
from PIL import Image
from torchvision.utils import make_grid

from vqgan import VQGAN
from transformer import VQGANTransformer
from data import image_datasets

def show(*rows):
    \"\"\"Images in [-1, 1], one row per tensor, as a PIL image.\"\"\"
    grid = make_grid(torch.cat(rows).clamp(-1, 1).add(1).div(2), nrow=rows[0].shape[0], padding=2)
    img = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    return img"""),
    ("markdown", "## Stage 1: encode and decode"),
    ("code", """model = VQGAN.from_checkpoint("runs/vqgan/checkpoints/last.pt")
print(model.config)"""),
    ("code", """# held-out crops of the demo photographs, in [-1, 1]
_, val, _ = image_datasets(None, size=64, channels=3, flip=False, val_fraction=0.05, seed=0)
x = torch.stack([val[(i, 0)] for i in range(8)])
with torch.no_grad():
    z_q, indices, q_loss = model.encode(x)
print("z_q", tuple(z_q.shape), "indices", tuple(indices.shape), "q_loss", round(q_loss.item(), 4))
print(indices[0])"""),
    ("code", """with torch.no_grad():
    x_rec = model.decode_indices(indices)          # the same as model.decode(z_q)
show(x, x_rec)                                      # inputs above reconstructions"""),
    ("markdown", "## Stage 2: sample new token grids"),
    ("code", """gpt = VQGANTransformer.from_checkpoint("runs/transformer/checkpoints/last.pt")
g = torch.Generator().manual_seed(0)
samples = gpt.sample(8, temperature=1.0, top_k=100, generator=g)   # (8, h, w) code indices
print(tuple(samples.shape), samples.min().item(), samples.max().item())
show(gpt.indices_to_images(samples))"""),
    ("code", """# complete the bottom half of each held-out crop from its top half
h, w = gpt.latent_shape
completed = gpt.sample(8, prefix=indices[:, : h // 2], top_k=100, generator=g)
show(x, gpt.indices_to_images(indices), gpt.indices_to_images(completed))"""),
    ("code", """# a grid three times as wide as the training grid, with the sliding attention window
wide = gpt.sample(2, grid=(h, 3 * w), top_k=100, generator=g)
show(gpt.indices_to_images(wide))"""),
]


def run_cell(src, ns):
    tree = ast.parse(src)
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    body = ast.Module(body=tree.body[:-1] if last else tree.body, type_ignores=[])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(body, "<cell>", "exec"), ns)
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns) if last else None
    outputs = []
    if out.getvalue():
        outputs.append({"output_type": "stream", "name": "stdout", "text": out.getvalue().splitlines(True)})
    if value is not None:
        from PIL import Image
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.convert("RGB").save(buf, format="JPEG", quality=92)
            text = f"<PIL.Image.Image image mode={value.mode} size={value.width}x{value.height}>"
            data = {"image/jpeg": base64.b64encode(buf.getvalue()).decode(), "text/plain": [text]}
        else:
            data = {"text/plain": [repr(value)]}
        outputs.append({"output_type": "execute_result", "data": data, "metadata": {}, "execution_count": None})
    return outputs


ns = {}
nb_cells = []
count = 0
for kind, src in cells:
    lines = src.splitlines(True)
    if kind == "markdown":
        nb_cells.append({"cell_type": "markdown", "metadata": {}, "source": lines})
        continue
    count += 1
    outputs = run_cell(src, ns)
    for o in outputs:
        if o["output_type"] == "execute_result":
            o["execution_count"] = count
    nb_cells.append({"cell_type": "code", "execution_count": count, "metadata": {}, "outputs": outputs,
                     "source": lines})

nb = {"cells": nb_cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                      "name": "python3"},
                                       "language_info": {"name": "python"}},
      "nbformat": 4, "nbformat_minor": 5}
os.makedirs("notebooks", exist_ok=True)
with open("notebooks/quickstart.ipynb", "w") as f:
    json.dump(nb, f, indent=1)
    f.write("\n")
print("wrote notebooks/quickstart.ipynb", os.path.getsize("notebooks/quickstart.ipynb"), "bytes")
