"""End-to-end helpers on the smoke profile: r sweep from one front per layer, predicted MoE-block throughput."""

import pytest

from mxmoe.profiles import get_profile
from mxmoe.stages.allocation import r_sweep_allocations
from mxmoe.stages.endtoend import predicted_throughput
from mxmoe.stages.evaluate import table1_row
from mxmoe.stages.routing import profile_corpora
from mxmoe.stages.sensitivity import profile_sensitivity


@pytest.fixture
def smoke_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    profile_sensitivity("rtn", smoke, "w5a5", progress=False)
    profile_corpora(smoke.model, n=2, seqlen=64, allow_random=True)
    return smoke.model


def test_r_sweep_trades_loss_for_time_within_budget(smoke_results):
    sweep = r_sweep_allocations(smoke_results, [0.0, 1.0], budget_bits=5.0, method="rtn")
    (_, map0, doc0), (_, map1, doc1) = sweep[0.0], sweep[1.0]
    assert doc0["predicted"]["bits"] <= 5.0 + 1e-9 and doc1["predicted"]["bits"] <= 5.0 + 1e-9
    assert doc1["predicted"]["L"] <= doc0["predicted"]["L"] and doc0["predicted"]["T_ms"] <= doc1["predicted"]["T_ms"]
    assert set(map0) == set(map1) and all(k[2] in ("gate", "up", "down") for k in map0)
    assert all(map0[(layer, e, "gate")] == map0[(layer, e, "up")] for layer, e, _ in map0)  # gate and up tied


def test_predicted_throughput(smoke_results):
    fast = predicted_throughput(smoke_results, 8192, scheme="w8a8_g-1_sym")
    slow = predicted_throughput(smoke_results, 8192, scheme="bf16")
    assert fast["T_ms"] > 0 and slow["tokens_per_s"] == pytest.approx(8192 / slow["T_ms"] * 1e3)
    with pytest.raises(ValueError, match="exactly one"):
        predicted_throughput(smoke_results, 512)


def test_table1_row_keeps_the_schema():
    row = {
        "label": "x",
        "w_bits": 3.25,
        "a_bits": 16.0,
        "ppl": 9.0,
        "tasks": {},
        "profile": "quick",
        "device": "cpu",
        "seconds": 1.0,
        "params": {},
    }
    assert table1_row(row) == {
        "w_bits": 3.25,
        "a_bits": 16.0,
        "ppl": 9.0,
        "tasks": {},
        "profile": "quick",
        "device": "cpu",
    }


def test_alloc_bench_settings_read_allocation_files(smoke_results):
    from mxmoe.bench.alloc import UNIFORM, settings

    r_sweep_allocations(smoke_results, [1.0], budget_bits=5.0, method="rtn")
    found = settings(smoke_results)
    assert set(UNIFORM) <= set(found) and "w5a5-b5-r1" in found
    assert all(k[2] in ("gate", "up", "down") for k in found["w5a5-b5-r1"])


def test_paper_model_throughput_from_committed_benchmarks():
    from mxmoe.bench.runs import COUNTED, PAPER, PAPER_FIG5_VARIANTS, paper_model_throughput
    from mxmoe.env import REPO_ROOT

    df = paper_model_throughput([REPO_ROOT / "results" / "kernels" / f for f in COUNTED])
    assert set(df.model) == set(PAPER) and set(df.batch) == {512, 8192}
    assert set(df.setting) <= set(PAPER_FIG5_VARIANTS) and "fp16" in set(df.setting)
    assert (df[df.setting == "fp16"].speedup_vs_fp16 == 1.0).all()
    assert not df.duplicated(["model", "batch", "setting"]).any()
    assert (df.tokens_per_s > 0).all()
