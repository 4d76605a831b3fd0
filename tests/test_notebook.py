"""notebooks/quickstart.ipynb: a valid notebook, stored with outputs, whose code parses and uses the
public API (its outputs come from the demo models; running it needs the demo run folders)."""
import ast
import json
import os

from conftest import ROOT


def test_quickstart_notebook_is_valid_and_has_outputs():
    with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    for cell in code:
        ast.parse("".join(cell["source"]))
    assert all(cell["outputs"] for cell in code[1:])  # all but the set-up cell show what they did
    source = "".join("".join(c["source"]) for c in code)
    for call in ("VQGAN.from_checkpoint", ".encode(", ".decode_indices(", "VQGANTransformer.from_checkpoint",
                 ".sample(", ".indices_to_images("):
        assert call in source
    images = [o for c in code for o in c["outputs"] if "image/jpeg" in o.get("data", {})]
    assert len(images) >= 3
