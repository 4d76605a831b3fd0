"""VQGANTransformer: token layout, sampling filters, cache, sliding window, conditioning."""
import types

import pytest
import torch

from config import GPTConfig
from transformer import TokenLayout, VQGANTransformer, filter_logits, gpt_shape
from vqgan import VQGAN


def make(tiny_cfg, classes=(), seed=0):
    torch.manual_seed(seed)
    vqgan = VQGAN(tiny_cfg)  # 32x32 images -> 16x16 tokens; use a smaller grid for speed below
    gpt = GPTConfig(n_layer=2, n_head=2, n_embd=32, **gpt_shape(tiny_cfg, len(classes)))
    return VQGANTransformer(vqgan, gpt, classes).eval()


@pytest.fixture
def small_cfg(tiny_cfg):
    """4x4 tokens (16 per image): f8 from 32x32 images."""
    from dataclasses import replace
    return replace(tiny_cfg, ch_mult=(1, 1, 1, 2), attn_resolutions=())


def test_token_layout(small_cfg):
    m = make(small_cfg, classes=("a", "b", "c"))
    assert m.n_codes == 64 and m.layout.start_token == 67 and m.gpt.config.vocab_size == 68
    assert m.layout.class_offset == 64 and m.layout.has_null_class
    assert m.gpt.config.block_size == 16 and m.latent_shape == (4, 4)
    u = make(small_cfg)
    assert u.layout.start_token == 64 and u.gpt.config.vocab_size == 65
    # the reference's released transformers: vocabulary = codes, class k is token k, sos shared with code 0
    ref = TokenLayout(64, 3, reference=True, sos_token=0)
    assert (ref.vocab_size, ref.class_offset, ref.start_token, ref.has_null_class) == (64, 0, 0, False)


def test_filters_keep_exactly_the_intended_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()[0].tolist()
    assert kept == [False, True, True, False, False] or kept == [False, True, False, True, False]
    assert filter_logits(logits, top_k=3).isfinite().sum() == 3
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert filter_logits(p, top_p=0.5).isfinite()[0].tolist() == [True, False, False, False]
    assert filter_logits(p, top_p=0.6).isfinite()[0].tolist() == [True, True, False, False]
    assert filter_logits(p, top_p=0.96).isfinite()[0].tolist() == [True, True, True, True]
    assert filter_logits(p, top_p=0.01).isfinite()[0].tolist() == [True, False, False, False]


def test_sampling_options_that_leave_nothing_are_refused(small_cfg):
    m = make(small_cfg)
    for kw in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            m.sample(1, **kw)


def test_cached_and_uncached_greedy_sampling_agree(small_cfg, float64):
    m = make(small_cfg)  # float64: the two paths' logits agree to ~1e-15, so no argmax can flip
    a = m.sample(3, top_k=1, use_cache=True)
    b = m.sample(3, top_k=1, use_cache=False)
    assert a.shape == (3, 4, 4) and torch.equal(a, b)


def test_greedy_sampling_under_bf16_autocast_equals_float32(small_cfg, monkeypatch):
    """A GPT trained to continue one sequence (so every next code leads the runner-up by a clear
    margin) samples the same greedy tokens under bf16 autocast as in float32, through a
    key/value cache held in bf16."""
    m = make(small_cfg).train()
    target = ((torch.arange(16) * 5 + 3) % 64).view(1, 4, 4)
    opt = torch.optim.AdamW(m.gpt.parameters(), lr=1e-2)
    for _ in range(40):
        _, loss = m(target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    greedy = m.sample(2, top_k=1)
    assert torch.equal(greedy, target.expand(2, 4, 4))
    with torch.no_grad():  # the margins, along the greedy path, in float32 and in bf16
        inputs = torch.cat([m.first_tokens(None, 2, "cpu"), greedy.flatten(1)[:, :-1]], 1)
        logits = m.gpt(inputs)[..., :64]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = m.gpt(inputs)[..., :64].float()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 20 * (logits - bf16_logits).abs().max()
    caches = []
    new_cache = m.gpt.new_cache
    monkeypatch.setattr(m.gpt, "new_cache", lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = m.sample(2, top_k=1)
    assert torch.equal(bf16, greedy)
    assert len(caches) == 1 and caches[0].dtype == caches[0].k[0].dtype == caches[0].v[-1].dtype == torch.bfloat16


def test_special_tokens_are_never_sampled(small_cfg):
    m = make(small_cfg, classes=("a", "b"))
    with torch.no_grad():
        m.gpt.head.weight[64:] = 10.0  # make class and start tokens by far the most likely
    out = m.sample(4, class_labels=[0, 1, 0, 1], generator=torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() < 64


def test_sliding_window(small_cfg, float64):
    m = make(small_cfg)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    big = m.sample(2, grid=(6, 9), generator=g(), top_k=10)
    assert big.shape == (2, 6, 9) and big.min() >= 0 and big.max() < 64
    same = m.sample(2, grid=(4, 4), generator=g(), top_k=10)
    plain = m.sample(2, use_cache=False, generator=g(), top_k=10)
    assert torch.equal(same, plain)
    assert m.indices_to_images(big).shape == (2, 3, 48, 72)
    with pytest.raises(ValueError, match="smaller than the transformer's training grid"):
        m.sample(1, grid=(3, 8))


def test_window_context_is_the_clamped_window(small_cfg):
    """Record what the GPT sees for the last token of a 6x6 grid: the bottom-right 4x4 window."""
    m = make(small_cfg)
    seen = []
    m.gpt.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    codes = m.sample(1, grid=(6, 6), generator=torch.Generator().manual_seed(0))
    last = seen[-1][0]  # [start] + 15 window tokens before (3, 3) in the window
    window = codes[0, 2:6, 2:6].reshape(-1)
    assert last[0].item() == m.layout.start_token and torch.equal(last[1:], window[:15])


def test_class_token_and_guidance(small_cfg):
    m = make(small_cfg, classes=("a", "b", "c"))
    seen = []
    m.gpt.register_forward_hook(lambda mod, args, out: seen.append(args[0][:, 0].clone()))
    m.sample(2, class_labels=2, top_k=1)
    assert seen[0].tolist() == [66, 66]
    seen.clear()
    m.sample(2, class_labels=[1, 0], cfg_scale=3.0, top_k=1)
    assert seen[0].tolist() == [65, 64, 67, 67]  # conditional half, then "no class"
    with pytest.raises(ValueError, match="not known to this model"):
        m.sample(1, class_labels=3)
    with pytest.raises(ValueError, match="unconditional"):
        make(small_cfg).sample(1, class_labels=0)


def test_prefix_completion_keeps_the_prefix(small_cfg):
    m = make(small_cfg)
    prefix = torch.randint(0, 64, (2, 2, 4))
    out = m.sample(2, prefix=prefix, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :2], prefix)


def test_training_forward_and_overfitting(small_cfg):
    m = make(small_cfg, classes=("a", "b")).train()
    tokens = torch.randint(0, 64, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(m.gpt.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        logits, loss = m(tokens, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logits.shape == (8, 16, m.gpt.config.vocab_size)
    assert loss.item() < 0.2 * first
    assert all(p.grad is None for p in m.vqgan.parameters())
    assert not m.vqgan.training


def test_pkeep_and_class_dropout_corrupt_the_inputs(small_cfg):
    m = make(small_cfg, classes=("a",)).train()
    seen = []
    m.gpt.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    tokens = torch.zeros(64, 4, 4, dtype=torch.long)
    torch.manual_seed(0)
    m(tokens, torch.zeros(64, dtype=torch.long), pkeep=0.5, class_dropout=0.5)
    inputs = seen[0]
    assert 0.3 < (inputs[:, 1:] != 0).float().mean() < 0.7  # about half the codes replaced
    assert set(inputs[:, 0].tolist()) == {64, 65}  # class token or "no class"
    m.eval()(tokens, torch.zeros(64, dtype=torch.long), pkeep=0.5, class_dropout=0.5)
    assert (seen[1][:, 1:] == 0).all() and (seen[1][:, 0] == 64).all()  # never in eval mode


# ------------------------------------------------------------- the token loop: fixed shapes, no sync
def loop_for(m, n_samples=2, prefix=0, **pick):
    """A TokenLoop after its prefill, as sample() builds it."""
    from transformer import TokenLoop

    first = m.first_tokens(None, n_samples, torch.device("cpu"))
    codes = torch.zeros(n_samples, 16, dtype=torch.long)
    noise = torch.ones(n_samples, m.n_codes)
    options = {**dict(guided=False, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None), **pick}
    return TokenLoop(m, first, codes, prefix, noise, options)


def test_cached_and_uncached_stochastic_sampling_draw_the_same_tokens(small_cfg, float64):
    """The same random numbers give the same tokens with the fixed-shape cached step as with
    full forwards (float64: the logits agree to ~1e-15, no draw can fall between them), with
    top-k, top-p, temperature and guidance."""
    m = make(small_cfg, classes=("a", "b"))
    for options in (dict(top_k=7, temperature=0.8), dict(top_p=0.9), dict(class_labels=[1, 0], cfg_scale=2.5)):
        a = m.sample(2, use_cache=True, generator=torch.Generator().manual_seed(3), **options)
        b = m.sample(2, use_cache=False, generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(a, b), options
    draws = {m.sample(2, generator=torch.Generator().manual_seed(s)).sum().item() for s in range(4)}
    assert len(draws) > 1  # and they are draws: other numbers, other tokens


def test_the_pick_is_the_draw_torch_multinomial_makes(float64):
    """argmax(p / Exp(1)) with the numbers multinomial would draw is multinomial's own draw."""
    from transformer import pick_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=g) * 3
    for seed in range(5):
        probs = logits.float().softmax(-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        noise = torch.empty(64, 30, dtype=torch.float32).exponential_(1, generator=torch.Generator().manual_seed(seed))
        got = pick_tokens(logits, noise, 30, False, 1.0, 1.0, None, None)
        assert torch.equal(got, expected)


def test_the_token_step_compiles_as_one_graph_and_gives_the_eager_tokens(small_cfg):
    """TokenLoop.step (pick, write the code, GPT.decode_step, advance) traced with fullgraph=True:
    no graph break, so nothing in it needs the host. Run compiled, it gives the eager tokens."""
    m = make(small_cfg)
    eager, compiled = loop_for(m, top_k=5), loop_for(m, top_k=5)
    compiled.step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    for loop in (eager, compiled):
        loop.run(16, lambda loop=loop: loop.noise.exponential_(1, generator=torch.Generator().manual_seed(int(loop.t))))
    assert torch.equal(eager.codes, compiled.codes)


def test_sampling_with_the_compiled_step_compiles_once_and_draws_the_eager_tokens(small_cfg, monkeypatch):
    """sample(compile=True) runs the token step compiled: a second call (other random numbers)
    reuses the compiled code (no guard fails, nothing compiles again), and both draw the tokens
    of the eager step. ("aot_eager": the same graph as inductor's, without code generation.)"""
    import transformer
    from torch._dynamo.utils import counters

    monkeypatch.setattr(transformer, "STEP_COMPILE_OPTIONS", dict(backend="aot_eager", fullgraph=True, dynamic=False))
    monkeypatch.setattr(transformer, "_compiled_step", None)
    torch._dynamo.reset()
    m = make(small_cfg)
    graphs = []
    for seed in (0, 1):
        compiled = m.sample(3, top_k=5, generator=torch.Generator().manual_seed(seed), compile=True)
        graphs.append(counters["stats"]["unique_graphs"])
        eager = m.sample(3, top_k=5, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(compiled, eager), seed
    assert graphs[0] >= 1 and graphs[1] == graphs[0]  # compiled once, reused


def test_a_step_that_fails_to_compile_samples_eagerly_with_a_warning(small_cfg, monkeypatch):
    """A machine where torch.compile cannot compile (no C++ compiler, say): one warning, and the
    eager step's tokens, not a traceback."""
    import transformer

    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found (injected)")
    monkeypatch.setattr(transformer, "STEP_COMPILE_OPTIONS", dict(backend=broken, fullgraph=True, dynamic=False))
    monkeypatch.setattr(transformer, "_compiled_step", None)
    torch._dynamo.reset()
    m = make(small_cfg)
    with pytest.warns(UserWarning, match="eager token step .compiling it failed"):
        compiled = m.sample(2, top_k=5, generator=torch.Generator().manual_seed(0), compile=True)
    assert torch.equal(compiled, m.sample(2, top_k=5, generator=torch.Generator().manual_seed(0)))


def test_weights_cast_once_give_the_numbers_of_autocast(small_cfg):
    """The token step reads its matmul weights cast to bf16 once (GPT.decode_weights) instead of
    having autocast cast the float32 ones at every call: the logits are bit for bit the same."""
    m = make(small_cfg)
    logits = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):  # float32: autocast casts them inside every matmul
            loop = loop_for(m, top_k=5)
            loop.weights = m.gpt.decode_weights(dtype)
            for _ in range(3):
                loop.noise.exponential_(1, generator=torch.Generator().manual_seed(int(loop.t)))
                loop.step()
            logits.append(loop.logits.clone())
    assert loop.weights[0][0].dtype == torch.bfloat16 and m.gpt.head.weight.dtype == torch.float32
    assert torch.equal(logits[0], logits[1])


def test_the_token_loop_never_synchronizes_with_the_host(small_cfg, monkeypatch):
    """Every way Python reads a tensor back to the host raises inside the loop (the prefill is
    outside it): the loop must run through all the same."""
    m = make(small_cfg)
    loop = loop_for(m, top_k=5, top_p=0.9)
    generator = torch.Generator().manual_seed(0)

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the token loop")
    for name in ("item", "__bool__", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    codes = loop.run(16, lambda: loop.noise.exponential_(1, generator=generator))
    monkeypatch.undo()
    assert codes.shape == (2, 16) and int(codes.max()) < m.n_codes and int(loop.t) == 15


def test_cuda_graphs_are_refused_without_cuda(small_cfg):
    with pytest.raises(ValueError, match="CUDA device"):
        make(small_cfg).sample(1, cuda_graph=True)


def test_the_training_forward_with_its_loss_is_one_graph(small_cfg):
    """--compile in stage 2 compiles VQGANTransformer.forward: GPT (fused q/k/v), input corruption,
    class dropout and the loss trace with fullgraph=True, and give the eager loss."""
    m = make(small_cfg, classes=("a", "b")).train()
    codes = torch.randint(0, m.n_codes, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1])
    compiled = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    _, loss = compiled(codes, labels, pkeep=0.7, class_dropout=0.5)
    torch.manual_seed(1)
    _, expected = m(codes, labels, pkeep=0.7, class_dropout=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_graph_capture_leaves_no_trace_of_its_warm_up(small_cfg, monkeypatch):
    """transformer.captured on CPU stand-ins for the CUDA calls: the warm-up step really runs
    (as on a side stream), the step inside the capture block does not (recording only; emulated
    by putting every tensor back), and replay runs the step. The tokens must be the eager loop's:
    whatever the warm-up changed is restored or overwritten by the first real step."""
    import contextlib

    m = make(small_cfg)
    eager, graphed = loop_for(m, top_k=5), loop_for(m, top_k=5)

    class Graph:
        def replay(self):
            self.step()

    @contextlib.contextmanager
    def capture(graph, capture_error_mode=None):
        tensors = [graphed.codes, graphed.logits, graphed.t, *graphed.cache.k, *graphed.cache.v]
        before = [t.clone() for t in tensors]
        yield
        for t, value in zip(tensors, before):  # recording runs nothing
            t.copy_(value)
        graph.step = graphed.step

    monkeypatch.setattr(torch.cuda, "Stream", lambda: types.SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    draws = {}
    for name, loop in (("eager", eager), ("graphed", graphed)):
        g = torch.Generator().manual_seed(5)
        loop.run(16, lambda loop=loop, g=g: loop.noise.exponential_(1, generator=g), cuda_graph=name == "graphed")
        draws[name] = loop.codes.clone()
    assert torch.equal(draws["eager"], draws["graphed"])


def test_a_failed_capture_samples_eagerly_with_a_warning(small_cfg):
    """Without CUDA the capture fails at once: a warning, the state untouched, and the loop runs
    the eager step, drawing the eager loop's tokens."""
    from transformer import captured

    m = make(small_cfg)
    loop = loop_for(m, top_k=5)
    before = loop.logits.clone(), loop.t.clone()
    with pytest.warns(UserWarning, match="without a CUDA graph"):
        assert captured(loop.step, [loop.logits, loop.t]) is None
    assert torch.equal(loop.logits, before[0]) and torch.equal(loop.t, before[1])
    eager, fallen_back = loop_for(m, top_k=5), loop_for(m, top_k=5)
    eager.run(16, lambda: eager.noise.exponential_(1, generator=torch.Generator().manual_seed(int(eager.t))))
    with pytest.warns(UserWarning, match="without a CUDA graph"):
        fallen_back.run(16, lambda: fallen_back.noise.exponential_(
            1, generator=torch.Generator().manual_seed(int(fallen_back.t))), cuda_graph=True)
    assert torch.equal(eager.codes, fallen_back.codes)
