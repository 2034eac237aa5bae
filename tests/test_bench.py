"""bench.py end to end at a tiny size, and the pieces its figures rest on.

No timing is asserted anywhere: speed is measured by `python bench.py`, never by a test.
"""
import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import bench
from attention import Attention, MultiWindowAttention, window_sizes

TINY = bench.BenchConfig(
    attn_batch=2, tokens=50, dim=48, heads=6, train_batch=1,
    model_overrides=dict(depth=1, decoder_depth=1, decoder_dim=48),
    embed_models=("mwmae-tiny",), embed_seconds=1.0, long_seconds=2.0, frontend_seconds=1.0,
    store_clips=4, store_batches=2, repeats=1, warmup=1)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_prints_the_table_and_writes_json(tmp_path, monkeypatch, keep_threads):
    monkeypatch.setattr(bench, "QUICK", TINY)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench.main, ["--quick", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())

    attention = report["attention"]
    assert set(attention["rows"]) == {"MHA (SDPA)", "MW-MHA reshape", "MW-MHA per-head loop"}
    assert attention["max_abs_diff_vs_reshape"]["MW-MHA per-head loop"] < 1e-5
    train = report["train"]
    assert set(train["rows"]) == {"mae-tiny", "mwmae-tiny"}
    for row in train["rows"].values():
        assert row["gflop_per_step"] > row["gemm_gflop"] > 0  # attention FLOPs are not GEMMs
        assert row["fraction_of_gemm_rate"] > 0
    assert train["mw_over_mae"] > 0
    assert report["embed"]["rows"]["mwmae-tiny"]["real_time_factor"] > 0
    assert report["embed"]["long_clip"]["peak_rss_mb"] >= report["embed"]["long_clip"]["rss_before_mb"] > 0
    assert report["data"]["store"]["crops_over_samples"] > 0
    assert report["machine"]["threads"] == 1
    assert {t["target"] for t in report["targets"]} >= {"MW-MAE step / MAE step <= 1.00"}
    for heading in ("[1] attention", "[2] pretraining step", "[3] embeddings", "[4] data", "Targets"):
        assert heading in result.output


def test_per_head_loop_is_the_same_function():
    torch.manual_seed(0)
    mw = MultiWindowAttention(48, [250, 2, 10, 2, 250, 5], 250)
    for table in mw.rel_pos.values():
        torch.nn.init.normal_(table)
    x = torch.randn(2, 250, 48)
    assert (bench.PerHeadLoopAttention(mw)(x) - mw(x)).abs().max() < 1e-5


def test_gemm_replay_counts_every_linear_product():
    """Forward and backward of a Linear on T tokens: three products of 2 T in out FLOPs."""
    linear = torch.nn.Linear(16, 24)
    x = torch.randn(10, 16, requires_grad=True)
    with bench.GemmRecorder() as recorder:
        linear(x).sum().backward()
    replay, flops = bench.gemm_replay(recorder.calls, torch.device("cpu"))
    replay()
    assert flops == 3 * 2 * 10 * 16 * 24


def test_flop_count_includes_cpu_attention_kernel():
    B, H, n, d = 2, 4, 50, 8
    attn = Attention(H * d, H)
    x = torch.randn(B, n, H * d, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=bench.ATTENTION_FLOPS) as counter:
        attn(x).sum().backward()
    linear = 3 * 2 * B * n * (H * d) * (3 * H * d + H * d)
    attention = 3 * 4 * B * H * n * n * d  # forward: q k^T and p v; backward twice that
    assert counter.get_total_flops() == pytest.approx(linear + attention, rel=0.05)


def test_attention_variants_need_a_matching_window_rule():
    with pytest.raises(ValueError, match="window heads"):
        bench.attention_variants(bench.BenchConfig(tokens=100, heads=8), torch.device("cpu"))
    assert len(window_sizes(250)) == bench.FULL.heads
