"""GPT: reference names, causality, the key/value cache, optimizer groups."""
import pytest
import torch

from config import GPTConfig
from conftest import reference_shapes
from mingpt import GPT


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_state_dict_matches_reference_and_accepts_its_mask():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=1024, block_size=512, n_layer=2, n_head=16, n_embd=1024))
    reference = reference_shapes("gpt_first_two_blocks_vocab1024_block512_embd1024")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: v for k, v in reference.items() if not k.endswith("attn.mask")}
    small = tiny_gpt()
    state = dict(small.state_dict())
    for i in range(2):
        state[f"blocks.{i}.attn.mask"] = torch.tril(torch.ones(1, 1, 24, 24))
    small.load_state_dict(state, strict=True)  # the reference's buffer is accepted and ignored


def test_causality(float64):
    model = tiny_gpt()
    idx = torch.randint(0, 37, (2, 20))
    logits = model(idx)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 37
    new = model(changed)
    torch.testing.assert_close(new[:, :10], logits[:, :10], rtol=1e-12, atol=1e-12)
    assert ((new[:, 10:] - logits[:, 10:]).abs().amax(-1) > 1e-3).all()  # every later position sees it


def test_cached_logits_equal_full_forward_at_every_position(float64):
    model = tiny_gpt()
    idx = torch.randint(0, 37, (3, 24))
    full = model(idx)
    cache = model.new_cache(3)
    prefill = model(idx[:, :5], cache=cache, start=0)  # several tokens at once, then one by one
    steps = [prefill] + [model(idx[:, t:t + 1], cache=cache, start=t) for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_weight_decay_only_on_linear_weights():
    model = tiny_gpt()
    decay, no_decay = model.optimizer_groups(0.1)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"tok_emb.weight", "pos_emb", "ln_f.weight", "blocks.0.attn.key.bias"} <= skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
