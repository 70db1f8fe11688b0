"""``mxmoe bench occupancy``, ``route``, ``ncu`` and ``counted``: what they switch reaches the call and goes away
after it; bad input and a machine without a GPU exit 2; ``ncu`` reads Nsight Compute's report; ``counted``
continues its runs across calls."""

from __future__ import annotations

import json

import pytest
import torch

from mxmoe.bench import occupancy
from mxmoe.kernels import triton_kernel as tk


def test_register_cap_adds_maxnreg_inside_the_block_only(monkeypatch):
    calls = []
    monkeypatch.setattr(tk.group_gemm_kernel, "run", lambda *a, **kw: calls.append(kw))
    with occupancy.register_cap(128):
        tk.group_gemm_kernel.run(grid=(1,))
    with occupancy.register_cap(None):
        tk.group_gemm_kernel.run(grid=(2,))
    tk.group_gemm_kernel.run(grid=(3,))
    assert calls == [{"grid": (1,), "maxnreg": 128}, {"grid": (2,)}, {"grid": (3,)}]


def test_variants_are_valid_tiles():
    from mxmoe.kernels.configs import TileConfig, check_config
    from mxmoe.schemes import Scheme

    for variants in occupancy.VARIANTS.values():
        assert "default" in variants
        for per_sm, cap, tile in variants.values():
            assert per_sm >= 1 and (cap is None or 24 <= cap <= 255)
            for s in occupancy.SCHEMES:
                if tile is not None:
                    check_config(Scheme.parse(s), TileConfig(tile[0], 128, 128, tile[1], swap_ab=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_exit_2(capsys):
    assert occupancy.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_route_benchmark_switches_the_path_for_the_call_only():
    from mxmoe.bench import route
    from mxmoe.kernels import moe

    ids = torch.tensor([[3, 1], [1, 0], [3, 3]])
    before = moe.ROUTE_ONE_PROGRAM_CELLS
    for limit in (0, 1 << 30):
        order, inv, offsets = route.timed_route(limit)(ids, 4)
        assert order.tolist() == [3, 1, 2, 0, 4, 5] and offsets.tolist() == [0, 1, 3, 3, 6]
        assert torch.equal(order[inv], torch.arange(6))
        assert moe.ROUTE_ONE_PROGRAM_CELLS == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_route_benchmark_without_a_gpu_exit_2(capsys):
    from mxmoe.bench import route

    assert route.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_ncu_cases_are_parsed_and_bad_ones_named():
    from mxmoe.bench import ncu

    assert ncu.parse_case("qwen1.5-moe:8192") == ("qwen1.5-moe", ["gate_up", "down"], 8192)
    assert ncu.parse_case("olmoe:down:16") == ("olmoe", ["down"], 16)
    for bad in ("qwen1.5-moe", "qwen1.5-moe:up:16", "nomodel:16", "olmoe:down:0", "olmoe:down:many"):
        with pytest.raises(ValueError):
            ncu.parse_case(bad)


def test_ncu_bad_input_exits_2_before_any_gpu_work(capsys, tmp_path):
    from mxmoe.bench import ncu

    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for argv in (
        ["qwen1.5-moe:up:8192"],
        ["olmoe:16", "--schemes", "w5a16"],
        [],
        ["--summarize", str(tmp_path / "no.csv")],
        ["--summarize", str(tmp_path / "other.csv")],
    ):
        with pytest.raises(SystemExit) as exit_:
            ncu.main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "GEMM must be one of gate_up, down" in err and "is not an `ncu --csv --page details` report" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_ncu_without_a_gpu_exit_2(capsys):
    from mxmoe.bench import ncu

    assert ncu.main(["qwen1.5-moe:down:16", "--peers"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


NCU_REPORT = """==PROF== Connected to process 1
"ID","Process ID","thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description"
"0","1","7  ""<default domain>:down/ours/bf16:none:none:none:none:none:none"" ","group_gemm_kernel","SpeedOfLight","Duration","ns","444,096","","",""
"0","1","7  ""<default domain>:down/ours/bf16:none:none:none:none:none:none"" ","group_gemm_kernel","SpeedOfLight","DRAM Throughput","%","40.57","","",""
"0","1","7  ""<default domain>:down/ours/bf16:none:none:none:none:none:none"" ","group_gemm_kernel","ComputeWorkloadAnalysis","","","","HighPipeUtilization","OPT","Tensor is the highest-utilized pipeline (62.4%) based on elapsed cycles"
"1","1","7  ""<default domain>:down/torch_grouped_bf16:none:none:none:none:none:none"" ","void cutlass::device_kernel<x>","SpeedOfLight","Duration","ns","396,608","","",""
==PROF== Disconnected from process 1
"""


def test_ncu_summary_has_one_row_per_kernel_with_its_variant(tmp_path):
    from mxmoe.bench import ncu

    path = tmp_path / "ncu.csv"
    path.write_text(NCU_REPORT)
    ours, torch_row = ncu.summarize(path)
    assert ours == {
        "variant": "down/ours/bf16",
        "kernel": "group_gemm_kernel",
        "us": pytest.approx(444.096),
        "dram%": 40.57,
        "busiest pipe": "Tensor 62.4%",
    }
    assert torch_row["variant"] == "down/torch_grouped_bf16" and torch_row["us"] == pytest.approx(396.608)


def test_counted_runs_continue_where_the_deadline_stopped_them_and_end_in_a_cost_table(monkeypatch, tmp_path):
    """Three gemm runs in their order, each with what is left of the command's deadline; a run its deadline cut is
    continued by the next call, a complete one is not run again; the table is built from `all` and `cudagraph`."""
    from mxmoe import perfmodel
    from mxmoe.bench import cost_table, counted, gemm, roofline, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(roofline, "provenance", lambda: {"device": "Fake GPU"})
    calls, cut = [], {"all"}

    def fake_gemm(argv):
        tag, deadline = argv[argv.index("--tag") + 1], float(argv[argv.index("--deadline-seconds") + 1])
        calls.append((tag, deadline))
        skipped = ["olmoe down T=8192: deadline"] if tag.split("_")[-1] in cut else []
        (tmp_path / f"bench_Fake_GPU_{tag}.json").write_text(json.dumps({"skipped": skipped}))

    tables = []
    monkeypatch.setattr(gemm, "main", fake_gemm)
    monkeypatch.setattr(cost_table, "write_table", lambda paths, d: tables.append([p.name for p in paths]) or d / "t")
    monkeypatch.setattr(perfmodel, "read_table", lambda path: None)
    monkeypatch.setattr(
        validate, "validate", lambda *a, **k: {"n_mixed": 2, "mixed_median_abs_err": 0.05, "mixed_max_abs_err": 0.1}
    )
    argv = ["--tag", "abc", "--out", str(tmp_path), "--table-dir", str(tmp_path)]
    assert counted.main(argv) == 3 and not tables
    assert [t for t, _ in calls] == ["abc_graph16", "abc_all", "abc_cudagraph"] and all(d <= 500 for _, d in calls)
    calls.clear()
    cut.clear()
    assert counted.main(argv) == 0
    assert [t for t, _ in calls] == ["abc_all"]
    assert tables == [["bench_Fake_GPU_abc_all.json", "bench_Fake_GPU_abc_cudagraph.json"]]
    calls.clear()
    assert counted.main(["--tag", "new", *argv[2:], "--table-only"]) == 0  # a new tag: nothing complete yet
    assert [t for t, _ in calls] == ["new_all", "new_cudagraph"] and len(tables) == 2


def test_counted_runs_bad_tag_exits_2():
    from mxmoe.bench import counted

    with pytest.raises(SystemExit) as exit_:
        counted.main(["--tag", "a/b"])
    assert exit_.value.code == 2
