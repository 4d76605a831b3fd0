"""benchmark.py on tiny CPU configurations: what each timed phase really runs (counted calls), the
documented JSON keys and their relations. The figures themselves are measurements, not test
results."""
import json
from collections import Counter

import pytest
import torch

import benchmark
from errors import UserError
from benchmark import main, parse_args
from discriminator import NLayerDiscriminator
from lpips import LPIPS
from mingpt import GPT
from vqgan import VQGAN

TINY_VQGAN = ["--preset", "tiny", "--image-size", "32", "--ch-mult", "1", "2", "--attn-resolutions", "16",
              "--num-codebook-vectors", "64", "--device", "cpu"]


@pytest.fixture
def phases(monkeypatch):
    """Counts forward calls of the networks per timed phase: a list with one Counter per call of
    benchmark.measure, in order (each of warmup + steps calls of the phase's function)."""
    calls, per_phase = Counter(), []

    def counting(cls, name):
        forward = cls.forward

        def wrapped(self, *args, **kwargs):
            calls[name] += 1
            if name == "gpt":  # how many tokens this call fed, and whether the fused attention kernel is allowed
                calls["gpt_tokens"] += args[0].shape[1]
                calls["gpt_flash_allowed"] += int(torch.backends.cuda.flash_sdp_enabled())
            return forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", wrapped)

    for cls, name in ((VQGAN, "vqgan"), (NLayerDiscriminator, "disc"), (LPIPS, "lpips"), (GPT, "gpt")):
        counting(cls, name)
    decode_step = GPT.decode_step

    def counted_step(self, *args, **kwargs):
        calls["gpt_step"] += 1
        return decode_step(self, *args, **kwargs)
    monkeypatch.setattr(GPT, "decode_step", counted_step)
    measure = benchmark.measure

    def counted_measure(fn, device, steps, warmup):
        before = Counter(calls)
        result = measure(fn, device, steps, warmup)
        per_phase.append(calls - before)
        return result
    monkeypatch.setattr(benchmark, "measure", counted_measure)
    return per_phase


def check_rates(result, per_step, unit):
    """Documented relations: rate = per_step * 1000 / ms, and speedup = reference_ms / ms."""
    assert result[f"{unit}_per_s"] == pytest.approx(per_step * 1000 / result["step_ms"], rel=1e-12)
    if "reference_step_ms" in result:
        assert result[f"reference_{unit}_per_s"] == pytest.approx(per_step * 1000 / result["reference_step_ms"],
                                                                  rel=1e-12)
        assert result["speedup"] == pytest.approx(result["reference_step_ms"] / result["step_ms"], rel=1e-12)


def test_stage1_compare_times_the_reference_step(tmp_path, phases):
    """Per step, our training step runs the VQGAN and LPIPS once and the discriminator three times
    (scoring the reconstructions, then real and fake in its own step); the reference's step, as
    its trainer runs it, runs the VQGAN and LPIPS twice (its discriminator step recomputes them)
    and the discriminator three times as well."""
    out = tmp_path / "stage1.json"
    result = main(parse_args(["stage1", *TINY_VQGAN, "--batch-size", "2", "--steps", "1", "--warmup", "1",
                              "--compare", "--json", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ("command", "preset", "batch_size", "image_size", "n_embed", "parameters_m", "step_ms", "images_per_s",
                "peak_memory_gib", "reference_step_ms", "reference_images_per_s", "reference_peak_memory_gib",
                "speedup", "device", "precision", "compile", "torch"):
        assert key in result, key
    assert result["image_size"] == 32 and result["n_embed"] == 64 and result["batch_size"] == 2
    assert result["peak_memory_gib"] is None  # measured on CUDA only
    check_rates(result, 2, "images")
    ours, reference = phases
    n = 2  # warmup + steps
    assert (ours["vqgan"], ours["lpips"], ours["disc"]) == (n, n, 3 * n)
    assert (reference["vqgan"], reference["lpips"], reference["disc"]) == (2 * n, 2 * n, 3 * n)


def test_stage1_joint_discriminator_batch_makes_one_pass_per_step(phases):
    main(parse_args(["stage1", *TINY_VQGAN, "--batch-size", "2", "--steps", "1", "--warmup", "1", "--disc-joint-batch"]))
    ours, = phases
    assert (ours["vqgan"], ours["disc"]) == (2, 4)  # per step: fakes with reals for the generator, then both


def test_gpt_compare_times_attention_by_the_explicit_formula(phases):
    result = main(parse_args(["gpt", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "2",
                              "--steps", "2", "--warmup", "1", "--compare"]))
    assert result["tokens_per_sequence"] == 16 * 16 and result["n_layer"] == 1
    check_rates(result, 2 * 256, "tokens")
    ours, reference = phases
    assert ours["gpt"] == reference["gpt"] == 3
    assert ours["gpt_flash_allowed"] == 3 and reference["gpt_flash_allowed"] == 0  # only the math kernel


def test_sample_times_the_cache_against_full_forwards(phases):
    result = main(parse_args(["sample", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "2",
                              "--top-k", "5", "--steps", "1", "--warmup", "0"]))
    for key in ("cached_s", "cached_images_per_s", "uncached_s", "uncached_images_per_s", "decode_s"):
        assert result[key] > 0, key
    assert result["cached_images_per_s"] == pytest.approx(2 / result["cached_s"], rel=1e-12)
    cached, uncached, decode = phases
    n = 16 * 16  # tokens per image
    assert cached["gpt"] == 1 and cached["gpt_tokens"] == 1  # the prefill: the start token
    assert cached["gpt_step"] == n - 1  # then one fixed-shape step per code but the last
    assert uncached["gpt"] == n and uncached["gpt_step"] == 0
    assert uncached["gpt_tokens"] == n * (n + 1) // 2  # the whole sequence so far, every call
    assert decode["gpt"] == decode["gpt_step"] == 0


def test_sample_on_cuda_adds_the_captured_loop_only_there():
    """On the CPU there is no graph to capture: the rows are cached (eager) and uncached."""
    result = main(parse_args(["sample", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "1",
                              "--top-k", "5", "--steps", "1", "--warmup", "0", "--ch-mult", "1", "2", "2"]))
    assert "captured_s" not in result and result["cached_s"] > 0


def test_sample_compile_adds_the_compiled_token_step(monkeypatch):
    """--compile times sampling with the token step compiled (captured too on CUDA) next to the
    others; "aot_eager" keeps the test fast (the same graph, no code generation)."""
    import transformer

    monkeypatch.setattr(transformer, "STEP_COMPILE_OPTIONS", dict(backend="aot_eager", fullgraph=True, dynamic=False))
    monkeypatch.setattr(transformer, "_compiled_step", None)
    result = main(parse_args(["sample", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "2",
                              "--top-k", "5", "--steps", "1", "--warmup", "1", "--ch-mult", "1", "2", "2", "--compile"]))
    assert result["compiled_s"] > 0 and result["cached_s"] > 0 and "captured_s" not in result
    assert result["compiled_images_per_s"] == pytest.approx(2 / result["compiled_s"], rel=1e-12)


@pytest.mark.slow
def test_the_suite_writes_one_line_per_row_and_survives_a_failing_row(tmp_path, monkeypatch):
    """The suite on a tiny CPU configuration: each chosen row one JSON line, written as it is
    measured; the real trainer's logged rate; a profile of a timed row; a row that fails is
    written with its error and the others still run."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")
    monkeypatch.setattr(benchmark, "bench_gpt", broken)
    out = tmp_path / "suite.jsonl"
    result = main(parse_args(["suite", "--out", str(out), *TINY_VQGAN, "--ch-mult", "1", "2", "2", "--gpt-preset", "tiny",
                              "--n-layer", "1", "--batch-size", "2", "--large-batch", "3", "--steps", "1",
                              "--warmup", "0", "--top-k", "5", "--rows", "stage1", "gpt", "trainer",
                              "--no-trainer-compile", "--trainer-steps", "3", "--profile"]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == result["rows"] == ["stage1", "gpt", "trainer"]  # sampling: the test above
    stage1, gpt, trainer = rows
    for flag in ("--compile", "--json"):  # the rows set their own; the lines go to --out
        with pytest.raises(UserError, match="drop --json and --compile"):
            main(parse_args(["suite", "--out", str(out), flag, *(["x.json"] if flag == "--json" else [])]))
    assert stage1["batch_size"] == 2 and stage1["images_per_s"] > 0
    assert stage1["profile"]["top"] and stage1["profile"]["gpu_idle_share"] is None  # CPU: operators, no GPU
    profile = stage1["profile"]
    assert profile["launches_per_call"] >= len(profile["top"]) and profile["busy_ms_per_call"] >= sum(
        t["ms_per_call"] for t in profile["top"]) > 0
    assert gpt["error"] == "RuntimeError: out of memory (injected)"
    assert trainer["steps"] == 3 and trainer["images_per_s"] > 0 and trainer["compile"] is False


def test_each_suite_row_compiles_with_the_static_shapes_of_a_fresh_process(tmp_path, monkeypatch):
    """The compiled GPT rows at two batch sizes, one after the other: the second compiles its own
    graph for its batch size (a fixed number, as training at that size would), not the first
    row's graph recompiled with a symbolic batch size. A profile that fails costs the row only
    its profile."""
    import training_transformer

    def broken(*args, **kwargs):
        raise RuntimeError("profiler unavailable (injected)")
    monkeypatch.setattr(benchmark, "profile_row", broken)

    seen = []

    def recording(gm, example_inputs):  # a torch.compile backend that runs the graph as traced
        shapes = [t.shape for t in example_inputs if isinstance(t, torch.Tensor)]
        seen.append(any(not isinstance(d, int) for shape in shapes for d in shape)
                    or any(isinstance(t, torch.SymInt) for t in example_inputs))
        return gm.forward
    monkeypatch.setattr(training_transformer, "COMPILE_OPTIONS", dict(backend=recording, fullgraph=True))
    out = tmp_path / "suite.jsonl"
    main(parse_args(["suite", "--out", str(out), *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1",
                     "--batch-size", "2", "--large-batch", "3", "--steps", "1", "--warmup", "0",
                     "--rows", "gpt-compiled", "gpt-large-compiled", "--profile"]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["batch_size"]) for r in rows] == [("gpt-compiled", 2), ("gpt-large-compiled", 3)]
    assert all(r["tokens_per_s"] > 0 and r["profile"] == {"error": "RuntimeError: profiler unavailable (injected)"}
               for r in rows)
    assert len(seen) == 2 and not any(seen), seen  # one graph per row, every shape a number


def test_host_syncs_counts_the_warnings_of_cuda_sync_debug_mode_by_line(monkeypatch):
    """--profile on CUDA: one call under torch.cuda.set_sync_debug_mode("warn"), whose warnings
    are counted per line; other warnings are not, and the mode is reset even when the call fails.
    The CUDA calls are stand-ins here: this checks what is done with what the mode reports."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def step():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")  # one line, twice
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    line = step.__code__.co_firstlineno + 2
    assert benchmark.host_syncs(step, torch.device("cpu")) is None and modes == []
    assert benchmark.host_syncs(step, torch.device("cuda")) == {f"test_benchmark.py:{line}": 2,
                                                                 f"test_benchmark.py:{line + 1}": 1}
    assert modes == ["warn", "default"]

    def failing():
        raise RuntimeError("injected")
    with pytest.raises(RuntimeError, match="injected"):
        benchmark.host_syncs(failing, torch.device("cuda"))
    assert modes[-1] == "default"
