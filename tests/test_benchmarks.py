"""benchmarks/vs_diffusers.py: the analytic counts, parameters by role, and a tiny end-to-end run.

Timings are never asserted (see benchmarks/README.md); only that both sides compute on the same
shapes and that the result JSON carries what the protocol asks for.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "vs_diffusers.py")

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _load():
    spec = importlib.util.spec_from_file_location("vs_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vs = _load()


def test_peer_flops_match_benchmarks_md():
    cfg = vs.PEER
    assert vs.tokens_per_sample(cfg) == 1024
    f = vs.peer_forward_flops_per_sample(cfg, *vs.patch_dims(cfg, "diffusers"))
    B = cfg["batch"]
    # BENCHMARKS.md: forward 118.8 GFLOP (91.4 linear, 27.4 attention) at batch 2.
    assert B * f["total"] / 1e9 == pytest.approx(118.8, abs=0.5)
    assert B * f["linear"] / 1e9 == pytest.approx(91.4, abs=0.5)
    assert B * f["attention"] / 1e9 == pytest.approx(27.4, abs=0.1)
    from pixeldance.models import dit as dit_lib
    p_in, p_out = vs.patch_dims(cfg, "ours")
    assert (p_in, p_out) == (4 * 33, 4 * 16)
    ours = dit_lib.dit_flops_per_sample(num_tokens=1024, text_len=64, width=512, depth=6, mlp_ratio=4,
                                        patch_dim_in=p_in, patch_dim_out=p_out)
    assert ours == vs.peer_forward_flops_per_sample(cfg, p_in, p_out)["total"]


def test_param_roles_at_peer_shape():
    cfg = vs.PEER
    wan, ours = vs.wan_param_roles(cfg), vs.ours_param_roles(cfg)
    assert wan["total"] == 27_805_248  # BENCHMARKS.md
    from pixeldance.models import dit as dit_lib
    assert ours["total"] == dit_lib.count_params(width=512, depth=6, num_heads=8, mlp_ratio=4, text_width=512)
    for roles in (wan, ours):
        assert sum(v for k, v in roles.items() if k != "total") == roles["total"]
    # The same per-token matmuls; the known differences: our input has 2C+1 channels, Wan's text
    # embedding has a second 512 x 512 layer.
    assert ours["per_token_blocks"] == wan["per_token_blocks"]
    assert ours["output_projection"] == wan["output_projection"]
    assert ours["input_projection"] - wan["input_projection"] == 4 * (16 + 1) * 512
    assert wan["per_text_token"] - ours["per_text_token"] == 512 * 512 + 512


def test_tiny_run_end_to_end(tmp_path):
    output = tmp_path / "vs_diffusers.jsonl"
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    from pixeldance import xla_flags
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--rounds=2", "--steps=1", "--warmup=0", "--peak_n=128",
         f"--cpu={cpus}", "--parallel_start", "--jax_flags=" + " ".join(xla_flags.FAST_COMPILE),
         f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(output.read_text().strip().splitlines()[-1]) == result
    assert result["benchmark"] == "vs_diffusers" and result["size"] == "tiny"

    cfg = result["config"]
    B, T, H, W, C = (cfg[k] for k in ("batch", "frames", "height", "width", "channels"))
    shapes = result["shapes"]
    assert shapes["tokens_per_sample"]["ours"] == shapes["tokens_per_sample"]["diffusers"] == \
        vs.tokens_per_sample(cfg)
    assert shapes["ours"]["output"] == [B, T, H, W, C]
    assert shapes["diffusers"]["output"] == [B, C, T, H, W]

    params = result["params"]
    assert params["per_token_blocks_equal"]
    assert params["input_projection_difference"] == params["input_projection_difference_expected"] \
        == 4 * (C + 1) * vs.model_width(cfg)
    assert params["ours"] == result["ours"]["info"]["params"]

    flops = result["flops"]
    assert flops["cross_check"]["rel_diff_vs_formula"] == 0.0
    for side in ("ours", "diffusers"):
        assert flops[side]["train_step"] == 3 * flops[side]["forward_step"] > 0
        assert flops[side]["counted_forward_step"] > 0
    # XLA counts elementwise and per-sample ops too; PyTorch's counter its matmuls and convolutions.
    assert 1.0 <= flops["cross_check"]["ours_xla_unrolled_over_analytic"] < 1.5
    assert 0.9 < flops["cross_check"]["diffusers_torch_counter_over_analytic_linear"] < 1.2

    for side in ("ours", "diffusers"):
        s = result[side]
        assert s["peak_flops_max"] > 0
        assert s["info"]["thread_env"] == vs.THREAD_ENV
        assert s["info"]["xla_flags"].startswith(vs.BASE_XLA_FLAGS)
        for mode in ("train", "sample"):
            assert len(s[mode]["times_s"]) == 2 and s[mode]["min_s"] > 0
            assert s[mode]["fraction_of_peak"] > 0
    assert result["diffusers"]["info"]["versions"]["num_threads"] == 1
    assert result["ours"]["info"]["versions"]["backend"] == "cpu"
    for mode in ("train", "sample"):
        c = result["comparison"][mode]
        assert c["ratio_median"] == pytest.approx(result["diffusers"][mode]["median_s"]
                                                  / result["ours"][mode]["median_s"])
        assert c["target"] == 1.5 and len(c["ratio_per_round"]) == 2
    protocol = result["protocol"]
    assert protocol["cpu_pinned"] == cpus and protocol["rounds"] == 2 and protocol["steps"] == 1
