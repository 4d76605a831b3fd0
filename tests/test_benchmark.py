"""benchmark.py runs each subcommand on tiny CPU configurations and reports its figures (the
figures themselves are measurements, not test results)."""
import json

from benchmark import main, parse_args

TINY_VQGAN = ["--preset", "tiny", "--image-size", "32", "--ch-mult", "1", "2", "--attn-resolutions", "16",
              "--num-codebook-vectors", "64", "--device", "cpu", "--steps", "1", "--warmup", "1"]


def test_stage1_benchmark_with_comparison(tmp_path):
    out = tmp_path / "stage1.json"
    result = main(parse_args(["stage1", *TINY_VQGAN, "--batch-size", "2", "--compare", "--json", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["image_size"] == 32 and result["n_embed"] == 64 and result["batch_size"] == 2
    assert result["images_per_s"] > 0 and result["reference_images_per_s"] > 0 and result["speedup"] > 0
    assert result["peak_memory_gib"] is None  # measured on CUDA only


def test_gpt_and_sample_benchmarks():
    gpt = main(parse_args(["gpt", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "2",
                           "--compare"]))
    assert gpt["tokens_per_sequence"] == 16 * 16 and gpt["n_layer"] == 1 and gpt["tokens_per_s"] > 0
    sample = main(parse_args(["sample", *TINY_VQGAN, "--gpt-preset", "tiny", "--n-layer", "1", "--batch-size", "2",
                              "--top-k", "5"]))
    assert sample["cached_images_per_s"] > 0 and sample["uncached_images_per_s"] > 0 and sample["decode_s"] > 0
