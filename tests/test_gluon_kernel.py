"""The Gluon prototype (mxmoe.kernels.gluon_kernel) on a CPU: it imports, refuses what it does not run, and
compiles for sm_90a; its benchmark (mxmoe.bench.gluon) parses its command line, shapes its rows and refuses to
run without a GPU. Gluon kernels cannot run on a CPU (no interpreter): their results are checked on a GPU by
``mxmoe bench gluon``."""

import pytest
import torch

from mxmoe import cli
from mxmoe.bench import gluon as bench
from mxmoe.bench import sass
from mxmoe.kernels import ExpertGroup, pack, version
from mxmoe.kernels import gluon_kernel as gk
from mxmoe.kernels import triton_kernel as tk
from mxmoe.schemes import Scheme

needs_gluon = pytest.mark.skipif(gk.GLUON_ERROR is not None, reason=f"no Gluon in this Triton: {gk.GLUON_ERROR}")


def _group(scheme: str, experts: int = 2, n: int = 64, k: int = 256) -> ExpertGroup:
    return ExpertGroup([pack(torch.randn(n, k), scheme) for _ in range(experts)])


@pytest.mark.parametrize("scheme", ["w4a16_g128_sym", "w8a16_g-1_sym", "w2a16_g128_asym", "bf16", "w4a8_g128_sym_fp8"])
def test_rejects_schemes_it_does_not_run(scheme):
    group = _group(scheme)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gluon_group_gemm runs"):
        gk.gluon_group_gemm(x, torch.tensor([0, 1, 3], dtype=torch.int32), group)


def test_rejects_a_mix_of_schemes():
    group = ExpertGroup([pack(torch.randn(64, 256), s) for s in ("w4a16_g128_asym", "w4a16_g-1_asym")])
    with pytest.raises(ValueError, match="one scheme"):
        gk.gluon_group_gemm(torch.randn(3, 256, dtype=torch.bfloat16), torch.tensor([0, 1, 3]), group)


@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w4a16_g256_asym", "w4a16_g-1_asym", "w4a16_g-1_sym"])
def test_accepts_its_schemes_and_needs_a_hopper_gpu(scheme):
    gk.check_scheme(Scheme.parse(scheme))
    group = _group(scheme)
    with pytest.raises(RuntimeError):  # a CPU tensor: no Gluon launch here
        gk.gluon_group_gemm(torch.randn(3, 256, dtype=torch.bfloat16), torch.tensor([0, 1, 3]), group)


def test_same_unpacking_asm_as_the_triton_kernel_and_not_part_of_its_fingerprint():
    assert gk.NIBBLE_ASM_TEXT == tk.NIBBLE_ASM.value
    assert "gluon_kernel.py" not in version.SOURCES


def test_ring_fits_two_ctas_per_sm():
    for bm in (16, 32, 64):
        stages = gk.default_stages(bm)
        assert stages >= 3 and stages * gk.stage_bytes(bm) <= gk.SMEM_PER_CTA


def test_shared_operand_rings_and_registers_fit_one_cta_per_sm():
    for bm in (16, 32, 64):
        ring, wring = gk.shared_stages(bm)
        assert ring >= 3 and wring >= 2
        assert ring * gk.stage_bytes(bm) + wring * gk.W_STAGE_BYTES <= gk.SMEM_ONE_CTA - 1024
    assert gk.SHARED_MAXNREG * 4 * 128 <= 65536  # MMA, two converters, producer: four warpgroups of one CTA
    # what setmaxnreg leaves the MMA warpgroup: the 128 x 64 fp32 tile and more
    for cregs in gk.CONVERTER_REGS.values():
        assert 128 <= 4 * gk.SHARED_MAXNREG - 2 * cregs - gk.PRODUCER_REGS <= 256


def test_rejects_an_unknown_operand_or_tile():
    group = _group("w4a16_g128_asym")
    x, off = torch.randn(3, 256, dtype=torch.bfloat16), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="operand"):
        gk.gluon_group_gemm(x, off, group, operand="tmem")
    with pytest.raises(ValueError, match="split"):
        gk.gluon_group_gemm(x, off, group, operand="shared", split="columns")
    with pytest.raises(ValueError, match="bm must be"):
        gk.gluon_group_gemm(x, off, group, bm=128)


@needs_gluon
@pytest.mark.skipif(not (sass.TOOLS / "ptxas").exists(), reason="this Triton wheel has no ptxas")
def test_compiles_for_sm90a_as_a_warp_specialised_pipeline():
    f = sass.gluon_facts(32)
    assert f["shared_bytes"] <= gk.SMEM_PER_CTA
    assert f["wgmma"] == 16 and not f["serialized_wgmma"]  # 8 K steps x 2 halves of the 128 weight rows
    assert f["cp_async_mbarrier_arrive"] == 1 and f["mbarrier_arrive"] == 1  # full: per producer thread; empty: one
    assert f["registers"] <= gk.MAXNREG  # two CTAs of 256 threads per SM


@needs_gluon
@pytest.mark.skipif(not (sass.TOOLS / "ptxas").exists(), reason="this Triton wheel has no ptxas")
@pytest.mark.parametrize("bm,split", [(16, "rows"), (64, "rows"), (64, "uses")])
def test_shared_operand_kernel_compiles_with_one_wgmma_group_in_flight(bm, split):
    f = sass.gluon_facts(bm, operand="shared", split=split)
    assert f["shared_bytes"] <= gk.SMEM_ONE_CTA
    assert f["wgmma"] == 16 and f["wait_depths"] == [0, 1] and not f["serialized_wgmma"]
    assert f["spill_bytes"] == 0 and f["registers"] <= gk.SHARED_MAXNREG
    assert ("dec", "64") in f["setmaxnreg"] and ("inc", str(gk.CONVERTER_REGS[split])) in f["setmaxnreg"]
    # arrivals: the MMA releases both rings in and after its K loop (4), each converter once per ring and use (2 x 2)
    assert f["mbarrier_arrive"] == 8


@needs_gluon
@pytest.mark.skipif(not (sass.TOOLS / "ptxas").exists(), reason="this Triton wheel has no ptxas")
@pytest.mark.parametrize("bm", [16, 64])
def test_depth_2_keeps_a_wgmma_in_flight_without_spilling(bm):
    f = sass.gluon_facts(bm, depth=2)
    assert f["wgmma"] == 16 and f["wait_depths"] == [0, 1]  # 2 K halves x 4 K steps x 2 halves of the weight rows
    assert not f["serialized_wgmma"]
    assert (
        f["spill_bytes"] == sass.gluon_facts(bm)["spill_bytes"]
    )  # none with Triton 3.6; 3.7 spills 88 B at BM 64, any depth


def test_bench_refuses_to_run_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "gluon", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mxmoe bench gluon: error: needs a CUDA GPU (Hopper, sm_90a); none is visible"]


def test_bench_command_line():
    a = bench.parse_args([])
    assert (a.quick, a.budget, a.out, a.tag) == (False, 225.0, None, "")
    a = bench.parse_args(["--quick", "--budget", "60", "--out", "o", "--tag", "t"])
    assert (a.quick, a.budget, a.out, a.tag) == (True, 60.0, "o", "t")
    with pytest.raises(SystemExit):
        bench.parse_args(["--budget", "0"])
    assert bench.parse_args(["--launch", "qwen1.5 gate_up:512"]).launch == (bench.SHAPES[0], 512)
    for bad in ("qwen1.5 gate_up", "qwen9 up:512", "qwen1.5 gate_up:0"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--launch", bad])


def test_bench_variants_time_depth_2_at_16_and_512_tokens_and_the_shared_operand_everywhere():
    assert bench.gluon_variants(64 * 4 / 60, quick=True) == {
        "gluon": {},
        "gluon_d1": {"depth": 1},
        "gluon_sh": {"operand": "shared"},
        "gluon_shu": {"operand": "shared", "split": "uses"},
        "gluon_d2": {"depth": 2},
    }
    prefill = bench.gluon_variants(512 * 4 / 60, quick=False)
    assert prefill["gluon_d2"] == {"depth": 2} and prefill["gluon_bm32"] == {"bm": 32} and "gluon_nf" in prefill
    assert prefill["gluon_sh_bm32"] == {"operand": "shared", "bm": 32}
    big = bench.gluon_variants(8192 * 4 / 60, quick=False)
    assert "gluon_d2" not in big and big["gluon_shu"] == {"operand": "shared", "split": "uses"}


def test_bench_row_schema():
    us = {"triton": 100.0, "gluon": 80.0, "gluon_d1": 50.0, "torch_bf16": 200.0}
    errs = {"triton": 3e-3, "gluon": 3e-3, "gluon_d1": 3e-3, "gluon_d2": "RuntimeError: x", "torch_bf16": 1e-3}
    row = bench.case_row(("s", 3, 256, 512, 2), 4, [5, 0, 3], us, errs, 0.0, 10**6, 2 * 10**6, 1000.0)
    assert row["rows"] == 8 and row["rows_per_expert"] == [5, 0, 3] and row["rel_err"] is errs
    assert row["best_gluon"] == "gluon_d1" and row["triton_over_best_gluon"] == 2.0
    assert row["weight_bw_pct"]["gluon_d1"] == pytest.approx(2.0)  # 1 MB in 50 µs = 20 GB/s of 1000
    assert row["moved_bw_pct"]["triton"] == pytest.approx(2.0)
    assert set(row) >= {"shape", "experts", "N", "K", "top_k", "tokens", "us", "gluon_vs_triton", "weight_bytes"}
    bench.print_table([row])  # no kernel missing a cell raises
    assert bench.case_row(("s", 1, 8, 8, 1), 1, [1], {}, {}, None, 1, 1, 1.0)["best_gluon"] is None


def test_bench_edge_verdict():
    ok = {"gluon": {"bm16/d0": 3e-3, "bm64/d2": 2e-3}, "triton": 3e-3}
    assert bench.edges_ok([ok, {"skipped": "pack: x", "gluon": {}}])
    assert not bench.edges_ok([ok, {"gluon": {"bm64/d2": "RuntimeError: y"}}])
    assert not bench.edges_ok([{"gluon": {"bm64/d1": 0.5}}])
