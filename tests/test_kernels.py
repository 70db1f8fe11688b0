"""mxmoe.kernels: packing, reference, input checks here; the Triton kernel under the interpreter.

The kernel runs in a child process with TRITON_INTERPRET=1 (tests/kernel_interp_cases.py), so
the interpreter switch never leaks into other test modules.
"""

import importlib
import itertools
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from interp import run_interpreted

from mxmoe.bench import runs
from mxmoe.env import COST_TABLES
from mxmoe.kernels import ExpertGroup, group_gemm, pack, reference_group_gemm
from mxmoe.kernels.configs import TileConfig, launch_warps
from mxmoe.kernels.pack import fragment_order, paired_scales, storage_bytes
from mxmoe.quant import quantize_weight, quantize_weight_int
from mxmoe.quant.rtn import IntWeight
from mxmoe.schemes import HOPPER_SCHEMES, Scheme

gg_module = sys.modules["mxmoe.kernels.group_gemm"]  # the module; the package exports the function
ROOT = Path(__file__).resolve().parents[1]
H100_CUDAGRAPH_RUN = next(n for n in runs.COUNTED if n.endswith("_cudagraph.json"))  # smollm2-moe shapes, graph-timed
QUANTIZED = [s for s in HOPPER_SCHEMES if not s.is_full_precision]
W4A8_FP8 = ["w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8"]
INTERP_CASES = [str(s) for s in HOPPER_SCHEMES] + [
    "w8a16_g128_asym",
    "w4a16_g128_sym",
    *W4A8_FP8,
    "w3a8_g128_sym_fp8",
    "mixed_w4a8_fp8",
    "mixed_w4a8_fp8_unified_kernel",
    "k32_w4a8_fp8",
    "intweight_w4a8_fp8",
    "mixed_fp32",
    "mixed_fp16",
    "mixed_per_scheme_launches",
    "mixed_unified_kernel",
    "mixed_given_x_q",
    "unswapped_mixed",
    "tall_swapped_grouped",
    "swapped_mixed_fp8_weight_only",
    "bf16_tma",
    "bf16_tma_misaligned_transposed_x",
    "k32_mixed",
    "w4a16_ragged_n",
    "w4a16_ragged_n_unswapped",
    "intweight",
    "moe_experts_forward",
    "hf_qwen2moe_bf16_vs_eager",
    "hf_qwen2moe_mixed_vs_reference",
]
# fp16 output rounding; fp16 group scales vs fp32 IntWeight; the MoE forward re-quantizes the SiLU output,
# whose last bits differ between the two paths, so an activation code may round the other way: one flipped
# 4-bit code moved its token's row by 6.5e-3 (whole output 1.4e-3) in one draw, where a wrong layout, scale or
# routing weight moves rows by O(1)
TOL = {"mixed_fp16": 1e-3, "intweight": 3e-3, "moe_experts_forward": 5e-3, "hf_qwen2moe_mixed_vs_reference": 1e-3}


@pytest.fixture(scope="module")
def interp_results():
    return json.loads(run_interpreted([str(ROOT / "tests" / "kernel_interp_cases.py")]))


@pytest.mark.parametrize("case", INTERP_CASES)
def test_kernel_matches_reference(interp_results, case):
    r = interp_results["cases"][case]
    tol = TOL.get(case, 1e-5)  # float32 math on both sides
    assert r["finite"], f"{case}: non-finite output (seed {interp_results['seed']})"
    assert r["rel"] < tol and r["row_rel"] < 3 * tol, f"{case}: {r} (seed {interp_results['seed']})"
    if "vs_eager" in r:  # a mixed allocation must actually change the model
        assert r["vs_eager"] > 1e-3, f"{case}: quantized experts did not run: {r}"


@pytest.mark.parametrize("s", QUANTIZED + [Scheme.parse(t) for t in W4A8_FP8], ids=str)
def test_pack_round_trip(s):
    w = torch.randn(40, 320) * torch.rand(40, 1)
    iw = quantize_weight_int(w, s)
    pw = pack(w, s)
    back = pw.int_weight()
    assert torch.equal(back.q, iw.q.float() if s.fp8_weight else iw.q)
    ref = quantize_weight(w, s)
    assert ((pw.dequantize() - ref).norm() / ref.norm()) < (2e-3 if s.group_size > 0 else 1e-6)
    rows = 48 if fragment_order(s) else 40  # fragment order pads N to 16 rows
    assert pw.data.numel() == rows * 384 * s.w_bits // 8 == storage_bytes(s, 40, 320)  # K padded to 384


def test_fragment_order_puts_a_threads_codes_together():
    """4-bit weight-only codes: the 32 codes a wgmma thread holds for one 64-long half of a K block (rows
    n, n + 8; K pairs 2e, 2e + 1 of every 8) are 16 contiguous bytes, position t of a word at nibble
    4 (t % 2) + t // 2."""
    s = Scheme.parse("w4a16_g-1_asym")
    assert fragment_order(s) and not fragment_order(Scheme.parse("w4a8_g-1_sym"))
    u = torch.randint(0, 16, (32, 256), dtype=torch.int32)
    pw = pack(IntWeight(u.float(), torch.ones(32, 1), torch.zeros(32, 1), s))
    assert torch.equal(pw.codes(), u)
    data = pw.data.view(2, 8, 256).transpose(0, 1).reshape(8, 512).to(torch.int64)  # [N16 / 4, 2 K_pad]
    for a, b, d, e, c in [(0, 0, 0, 0, 0), (1, 2, 1, 3, 1), (1, 3, 0, 1, 2)]:
        start = 128 * c + 64 * d + 16 * e  # byte of position 256 c + 128 d + 32 e in byte row 4 a + b
        chunk = data[4 * a + b, start : start + 16].view(4, 4)
        words = (chunk << torch.tensor([0, 8, 16, 24])).sum(1).tolist()  # [4] little-endian 32-bit words
        for i in range(32):  # position 8 w + t = 4 f + 2 g + h
            f, g, h = i // 4, (i // 2) % 2, i % 2
            nibble = (words[i // 8] >> (4 * (4 * (i % 8 % 2) + i % 8 // 2))) & 15
            assert nibble == int(u[16 * a + 8 * g + 2 * b + d, 64 * c + 8 * f + 2 * e + h])


@pytest.mark.parametrize("bits", [2, 3])
def test_fragment_order_of_2_and_3_bit_codes(bits):
    """2-/3-bit weight-only codes: a wgmma thread's 64 codes of a K block (rows n, n + 8; K pairs 2e, 2e + 1
    of every 8) are one 16-byte run of the 2-bit plane, position t of a word in field 8 (t % 2) + t // 2;
    a 3-bit code's top bit follows in a 1-bit plane, bit t // 2 of byte 2 word + t % 2."""
    s = Scheme.parse(f"w{bits}a16_g-1_asym")
    assert fragment_order(s)
    u = torch.randint(0, 1 << bits, (32, 256), dtype=torch.int32)
    pw = pack(IntWeight(u.float(), torch.ones(32, 1), torch.zeros(32, 1), s))
    assert torch.equal(pw.codes(), u)
    lo = pw.data[: 2 * 8 * 128].view(2, 8, 128).to(torch.int64)  # [K block, N16 / 4 byte rows, 128]
    hi = pw.data[2 * 8 * 128 :].view(2, 8, 64).to(torch.int64) if bits == 3 else None
    assert pw.data.numel() == 2 * 8 * (128 if bits == 2 else 192)
    for kb, a, b, d, e in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 3), (1, 1, 3, 0, 1)]:
        run = lo[kb, 4 * a + b, 16 * (4 * d + e) : 16 * (4 * d + e) + 16].view(4, 4)  # words 2c + fh
        words = (run << torch.tensor([0, 8, 16, 24])).sum(1).tolist()
        for c, fh, fl, g, h in itertools.product(range(2), range(2), range(4), range(2), range(2)):
            w, t = 4 * (4 * d + e) + 2 * c + fh, 4 * fl + 2 * g + h  # word of the byte row, position
            code = (words[2 * c + fh] >> (2 * (8 * (t % 2) + t // 2))) & 3
            if hi is not None:
                code |= ((int(hi[kb, 4 * a + b, 2 * w + t % 2]) >> (t // 2)) & 1) << 2
            row, k = 16 * a + 8 * g + 2 * b + d, 128 * kb + 64 * c + 32 * fh + 8 * fl + 2 * e + h
            assert code == int(u[row, k])


def test_e4m3_fragment_order_puts_a_registers_codes_in_one_word():
    """4-bit codes of fp8 schemes: the 8 codes of one word are the two registers (rows n and n + 8, four
    consecutive K) a thread of the fp8 warpgroup MMA holds, code (g, j) as sign and magnitude: |q| at bits
    8 j + 4 g, the sign at bit 8 j + 7 (g = 0) or 8 ((j + 1) % 4) + 3 (g = 1); -8 has no place there."""
    from mxmoe.kernels.pack import e4m3_fragment_order

    s = Scheme.parse("w4a8_g-1_sym_fp8")
    assert fragment_order(s) and e4m3_fragment_order(s) and not e4m3_fragment_order(Scheme.parse("w8a8_g-1_sym_fp8"))
    u = torch.randint(1, 16, (32, 256), dtype=torch.int32)
    pw = pack(IntWeight(u.float() - 8, torch.ones(32, 1), None, s))
    assert torch.equal(pw.codes(), u) and pw.data.numel() == 2 * 8 * 256
    byte = pw.data.view(2, 8, 256).to(torch.int64)  # [K block, byte row, 256]
    for kb, a, b, c, d, e, sl, p in [(0, 0, 0, 0, 0, 0, 0, 0), (1, 1, 3, 1, 1, 2, 1, 1), (0, 1, 2, 1, 0, 3, 1, 0)]:
        w = 32 * c + 16 * d + 4 * e + 2 * sl + p
        word = int((byte[kb, 4 * a + b, 4 * w : 4 * w + 4] << torch.tensor([0, 8, 16, 24])).sum())
        for g, j in itertools.product(range(2), range(4)):
            mag = (word >> (8 * j + 4 * g)) & 7
            negative = (word >> (8 * j + 7 if g == 0 else 8 * ((j + 1) % 4) + 3)) & 1
            q = -mag if negative else mag
            assert q == int(u[16 * a + 8 * g + 2 * b + d, 128 * kb + 64 * c + 32 * sl + 16 * p + 4 * e + j]) - 8
    u[3, 5] = 0
    with pytest.raises(ValueError, match="has the code -8"):
        pack(IntWeight(u.float() - 8, torch.ones(32, 1), None, s))


def test_grouped_asymmetric_4bit_stores_scale_zero_pairs():
    """w4a16 g128 asym: each group's float16 scale and zero point side by side (one 32-bit word per row and
    group) and no separate zero tensor; other schemes keep their scale and zero apart."""
    w = torch.randn(40, 320) * torch.rand(40, 1)
    s = Scheme.parse("w4a16_g128_asym")
    iw = quantize_weight_int(w, s)
    pw = pack(iw)
    assert paired_scales(s) and pw.zero is None
    assert pw.scale.shape == (3, 40, 2) and pw.scale.dtype == torch.float16 and pw.scale.is_contiguous()
    assert torch.equal(pw.scale[..., 0], iw.scale.t().half()) and torch.equal(pw.scale[..., 1], iw.zero.t().half())
    back = pw.int_weight()
    assert torch.equal(back.scale, iw.scale.half().float()) and torch.equal(back.zero, iw.zero.half().float())
    assert pw.nbytes == 48 * 384 // 2 + 3 * 40 * 4  # 4 bits per code, 16 + 16 bits per group
    for other in ("w4a16_g128_sym", "w4a16_g-1_asym", "w3a16_g128_sym", "w4a8_g128_sym"):
        assert not paired_scales(Scheme.parse(other)) and pack(w, other).scale.dim() == 2
    for narrower in ("w3a16_g128_asym", "w2a16_g128_asym"):
        assert paired_scales(Scheme.parse(narrower)) and pack(w, narrower).scale.shape == (3, 40, 2)
    pw.zero = torch.zeros(3, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not match scheme"):
        ExpertGroup([pw])


def test_pack_stores_8bit_sym_as_int8():
    """8-bit symmetric codes are stored as the int8 dot operand itself (two's complement q)."""
    w = torch.randn(16, 128)
    iw = quantize_weight_int(w, "w8a8_g-1_sym")
    pw = pack(iw)
    assert torch.equal(pw.data.view(torch.int8).view(16, 128).to(torch.int32), iw.q)


def test_launch_warps():
    assert launch_warps([TileConfig(64, 128, 128, 3, True), TileConfig(32, 128, 128, 4)]) == 4
    assert launch_warps([TileConfig(64, 128, 128, 3, True), TileConfig(128, 256, 128, 4)]) == 8
    assert launch_warps([TileConfig(128, 128, 128, 3, True, warps=4)]) == 4  # a tile written for one warpgroup
    assert launch_warps([TileConfig(128, 128, 128, 3, True, warps=4), TileConfig(128, 256, 128, 4)]) == 8


def test_pack_intweight_and_bf16():
    w = torch.randn(16, 128)
    iw = quantize_weight_int(w, "w4a16_g128_asym")
    iw.q = torch.randint(0, 16, iw.q.shape, dtype=torch.int32)  # any codes on the grid, e.g. GPTQ's
    assert torch.equal(pack(iw).int_weight().q, iw.q)
    with pytest.raises(ValueError, match="cannot pack it as"):
        pack(iw, "w4a16_g-1_asym")
    pw = pack(w, "bf16")
    assert pw.data.dtype == torch.bfloat16 and torch.equal(pw.dequantize(), w.bfloat16().float())


@pytest.mark.parametrize("bad", ["w4a16_g64_asym", "w8a8_g-1_asym", "w4a4_g256_sym", "w4a8_g64_sym_fp8"])
def test_pack_rejects_schemes_the_kernel_cannot_run(bad):
    with pytest.raises(ValueError, match="kernel"):
        pack(torch.randn(8, 256), bad)


def test_reference_is_plain_matmul_for_bf16():
    ws = [torch.randn(24, 64) for _ in range(3)]
    x = torch.randn(7, 64)
    off = torch.tensor([0, 2, 2, 7])
    y = reference_group_gemm(x, off, [pack(w, "bf16") for w in ws])
    want = torch.cat([x[:2] @ ws[0].bfloat16().float().t(), x[2:] @ ws[2].bfloat16().float().t()])
    assert torch.allclose(y, want, atol=1e-5)


def _experts(n=32, k=128, count=2, scheme="w4a16_g128_asym"):
    return [pack(torch.randn(n, k), scheme) for _ in range(count)]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: (torch.randn(4, 128), torch.tensor([0, 4, 4]), _experts() + _experts(k=256, count=1)),
            "share N and K",
        ),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 4, 4]), _experts() + _experts(n=16, count=1)), "share N and K"),
        (lambda: (torch.randn(4, 96), torch.tensor([0, 4, 4]), _experts()), r"\[T, K=128\]"),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 4]), _experts()), "E\\+1 = 3"),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 3, 3]), _experts()), "rise from 0 to the 4 rows"),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 3, 2, 4]), _experts(count=3)), "rise from 0"),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 4, 4]), [torch.randn(32, 128)] * 2), "PackedWeight"),
        (lambda: (torch.randn(4, 128), torch.tensor([0, 4]), []), "at least one expert"),
    ],
)
def test_bad_inputs_fail_before_launch(make, match):
    x, off, packed = make()
    with pytest.raises(ValueError, match=match):
        group_gemm(x, off, packed)


def test_unknown_mode_is_rejected_before_launch():
    with pytest.raises(ValueError, match="mode must be"):
        group_gemm(torch.randn(4, 128), torch.tensor([0, 1, 4]), _experts(), mode="split")


def test_tampered_storage_is_rejected():
    pw = _experts(count=1)[0]
    pw.data = pw.data[: pw.data.numel() // 2]
    with pytest.raises(ValueError, match="does not match scheme"):
        ExpertGroup([pw])


@pytest.mark.skipif(
    torch.cuda.is_available() or gg_module.INTERPRET, reason="needs a machine without GPU or interpreter"
)
def test_no_gpu_no_interpreter_is_a_clear_error():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_gemm(torch.randn(4, 128), torch.tensor([0, 1, 4]), _experts())


@pytest.mark.parametrize("scheme", ["w8a8_g-1_sym_fp8", *W4A8_FP8])
def test_fp8_needs_sm89(monkeypatch, scheme):
    monkeypatch.setattr(gg_module, "INTERPRET", False)
    fp8 = [Scheme.parse(scheme)]
    with pytest.raises(RuntimeError, match="sm_89"):
        gg_module.check_device(True, (8, 0), fp8)
    gg_module.check_device(True, (9, 0), fp8)


def test_w4a8_fp8_packs_integer_codes_and_takes_the_fp8_path():
    """4-bit codes are the integer scheme's (u = q + 8), stored in the fp8 MMA's fragment order, and run on
    the fp8 dot (WA_FP8), grouped on transposed 64-token tiles (128 x 128 ones in a launch of 8 warps)."""
    from mxmoe.kernels import triton_kernel as tk
    from mxmoe.kernels.configs import default_config, kind_of

    w = torch.randn(16, 256)
    fp8, int8 = pack(w, "w4a8_g128_sym_fp8"), pack(w, "w4a8_g128_sym")
    assert torch.equal(fp8.codes(), int8.codes()) and torch.equal(fp8.scale, int8.scale) and fp8.zero is None
    assert not torch.equal(fp8.data, int8.data)  # same codes, another order
    assert fp8.data.numel() == 16 * 256 // 2 and fp8.scale.dtype == torch.float16  # 4 bits + fp16 scale per group
    assert kind_of(fp8.scheme) == tk.WA_FP8 and kind_of(int8.scheme) == tk.WA_INT
    assert default_config(fp8.scheme, 1000) == TileConfig(64, 128, 128, 3, swap_ab=True)
    assert default_config(fp8.scheme, 1000, warps=8).bm == 128 and default_config(int8.scheme, 1000).bm == 256


def test_cost_table_tiles_and_device_check(tmp_path):
    from mxmoe.bench.cases import expert_loads
    from mxmoe.bench.cost_table import build_table, launch_tiles

    assert launch_tiles([0, 1, 17], 200, {"bm": 16, "bn": 128}) == 0 + 1 * 2 + 2 * 2
    prov = {"device": "GPU A", "multiprocessors": 2, "git_commit": "abc", "date_utc": "2026-01-01T00:00:00+00:00"}
    row = {
        "variant": "ours_w4a16_g-1",
        "tokens": 16,
        "experts": 60,
        "model": "qwen1.5-moe",
        "gemm": "down",
        "N": 2048,
        "K": 1408,
        "ms": 0.1,
        "tiles": {"w4a16_g-1_asym": {"bm": 16, "bn": 128}},
    }
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"provenance": prov, "roofline": {}, "results": [row]}))
    table = build_table([a])
    (point,) = table["cost_points"]
    loads = expert_loads(16, 60, 4)  # rows <= 16: one 16-row tile per active expert, 16 column tiles
    assert point["tiles"] == 16 * sum(1 for r in loads if r) and point["tiles_per_sm"] == point["tiles"] / 2
    b.write_text(json.dumps({"provenance": dict(prov, device="GPU B"), "roofline": {}, "results": []}))
    with pytest.raises(ValueError, match="several devices"):
        build_table([a, b])


def test_benchmark_run_writes_its_cost_table_under_the_gpu_key(tmp_path):
    """``bench --table-dir`` writes kernels/<gpu>.json from the run: the committed H100 run -> nvidia_h100.json."""
    from mxmoe.bench.cost_table import write_table

    run = ROOT / "results" / "kernels" / H100_CUDAGRAPH_RUN
    out = write_table([run], tmp_path / "kernels")
    assert out.name == "nvidia_h100.json" and not list(out.parent.glob("*.tmp"))
    table, doc = json.loads(out.read_text()), json.loads(run.read_text())
    assert (
        table["device"] == "NVIDIA H100 80GB HBM3"
        and table["provenance"][0]["git_commit"] == doc["provenance"]["git_commit"]
    )
    timed = {r["model"] for r in doc["results"] if "ms" in r}
    assert {p["model"] for p in table["cost_points"]} == timed >= {"smollm2-moe", "smollm2-moe-shared"}


@pytest.mark.parametrize("rows", [1, 20, 50, 500])
def test_default_tiles_are_valid_for_every_scheme(rows):
    from mxmoe.kernels.configs import check_config, default_config

    for s in HOPPER_SCHEMES + tuple(Scheme.parse(t) for t in W4A8_FP8):
        for interpret in (False, True):
            check_config(s, default_config(s, rows, interpret))
        check_config(s, gg_module.unified_config(rows))


def test_roofline_crossover_balances_memory_and_compute():
    from mxmoe.plots.kernels import crossover_tokens

    peak, bw, n, k = 700.0, 3000.0, 2816, 2048  # TFLOP/s, GB/s
    for w_bits, a_bits in ((16, 16), (4, 16), (8, 8)):
        m = crossover_tokens(peak, bw, w_bits, a_bits, n, k)
        compute = 2 * m * n * k / (peak * 1e12)
        memory = (n * k * w_bits / 8 + m * k * a_bits / 8 + 2 * m * n) / (bw * 1e9)
        assert compute == pytest.approx(memory, rel=1e-9)
    assert crossover_tokens(peak, bw, 4, 16, n, k) < crossover_tokens(peak, bw, 16, 16, n, k)


def test_kernel_tables_from_committed_h100_runs():
    """The notebook-03 tables build from the committed benchmark files: every paper shape in Figure 2,
    Table 6 rows with all three launch modes, one row per kernel target."""
    from mxmoe.plots import kernels as kp

    docs = [runs.load_bench(ROOT / "results" / "kernels" / f) for f in runs.COUNTED]
    df = runs.case_rows(docs)
    assert not df.duplicated(["model", "gemm", "tokens", "variant"]).any()  # each case from one file
    blocks = runs.block_times(df, kp.FIG2_VARIANTS)
    assert set(runs.PAPER) <= set(blocks.model)
    assert (blocks[blocks.variant == "torch_grouped_bf16"].speedup_vs_torch_grouped == 1).all()
    t6 = kp.table6(df)
    assert len(t6) and t6[["fused_us", "unified_us", "per_scheme_us"]].notna().all().all()
    targets = kp.targets_table(df)
    assert len(targets) == 11 and targets.status.notna().all()
    tiles = kp.fused_tiles(df, "qwen1.5-moe")
    assert set(tiles.num_warps) <= {4, 8} and tiles.groupby(["mix", "tokens"]).num_warps.nunique().max() == 1


def test_timer_comparison_pairs_the_event_and_graph_runs_of_one_gpu():
    """Notebook 03's timer table: the committed H100 runs pair at the decode size of three paper models (both GEMMs)
    and at every larger size of Qwen1.5-MoE the graph run timed; one call after an L2 flush takes longer than a
    graph replay at the decode size, and our call's host part (its Python) is longer than torch's."""
    from mxmoe.plots import kernels as kp

    t = kp.timer_comparison(runs.bench_docs(ROOT / "results" / "kernels"))
    graph = json.loads((ROOT / "results" / "kernels" / runs.COUNTED[2]).read_text())
    larger = {(r["gemm"], r["tokens"]) for r in graph["results"] if r["model"] == "qwen1.5-moe" and r["tokens"] > 16}
    assert set(t.gpu) == {"nvidia_h100"} and len(t) == 3 * 2 + len(larger)
    assert set(t.tokens) == {16} | {tokens for _, tokens in larger}
    decode = t[t.tokens == 16]
    assert (decode["ours events / graph"] > 1).all() and (decode["torch events / graph"] > 1).all()
    assert (t["ours host µs"] > t["torch host µs"]).all()


def test_a_group_prepares_each_launch_once(monkeypatch):
    """The launch of a call (plan, schedule, grid, compile-time arguments) is prepared once per row count and
    mode and kept for the most recent ``LAUNCH_CACHE``; given tile configs are prepared afresh."""
    gg = importlib.import_module("mxmoe.kernels.group_gemm")
    monkeypatch.setattr(gg, "INTERPRET", True)
    group = ExpertGroup([pack(torch.randn(64, 128), s) for s in ("w4a16_g128_asym", "w8a8_g-1_sym")])
    (first,) = group.launches(40, "fused", None, None, None)
    assert (
        group.launches(40, "fused", None, None, None) == [first]
        and group.launches(40, "fused", None, None, None)[0] is first
    )
    assert group.launches(41, "fused", None, None, None)[0] is not first
    assert len(group.launches(40, "per_scheme", None, None, None)) == 2
    given = {"w4a16_g128_asym": TileConfig(32, 32, 128, 1, swap_ab=True)}
    assert group.launches(40, "fused", given, None, None)[0] is not group.launches(40, "fused", given, None, None)[0]
    for rows in range(100, 100 + gg.LAUNCH_CACHE + 5):
        group.launches(rows, "fused", None, None, None)
    assert len(group._launches) == gg.LAUNCH_CACHE and (40, "fused", None, None) not in group._launches


def test_a_plain_list_of_experts_builds_its_group_once():
    from mxmoe.kernels.group_gemm import expert_group

    experts = _experts(count=3)
    first = expert_group(experts)
    assert expert_group(experts) is first  # the convenient call reuses the launch metadata
    assert expert_group(list(experts)) is first  # the same experts in a new list
    other = _experts(count=3)
    assert expert_group(other) is not first and expert_group(other).packed == other
    assert expert_group(first) is first


def test_tma_launches_keep_an_allocator_the_caller_set(monkeypatch):
    """A caller's own Triton allocator is seen (and so kept); with none set, or a Triton that moved the private
    context variable, a TMA launch sets ours."""
    import triton
    from triton.runtime import _allocation

    gg = importlib.import_module("mxmoe.kernels.group_gemm")  # the module (the package re-exports the function)
    token = _allocation._allocator.set(_allocation.NullAllocator())
    try:
        assert not gg._caller_set_allocator()
        triton.set_allocator(gg._descriptor_scratch)
        assert gg._caller_set_allocator()
    finally:
        _allocation._allocator.reset(token)
    monkeypatch.setattr(gg, "_allocation", type("MovedAllocation", (), {"NullAllocator": _allocation.NullAllocator}))
    assert not gg._caller_set_allocator()


def test_a_cost_table_from_another_kernel_is_flagged_where_it_is_loaded(tmp_path):
    """The table carries its runs' kernel fingerprint; loading one measured on another kernel says so."""
    from mxmoe.bench.cost_table import write_table
    from mxmoe.kernels.version import kernel_fingerprint
    from mxmoe.perfmodel import read_table

    run = json.loads((ROOT / "results" / "kernels" / H100_CUDAGRAPH_RUN).read_text())
    del run["provenance"]["kernel"]  # a run from before kernels were fingerprinted
    old = read_table(write_table([_write(tmp_path / "old.json", run)], tmp_path / "a"))
    commit = run["provenance"]["git_commit"]
    assert old.kernel is None and commit in old.kernel_note and "fingerprinted" in old.kernel_note
    run["provenance"]["kernel"] = kernel_fingerprint()
    now = read_table(write_table([_write(tmp_path / "now.json", run)], tmp_path / "b"))
    assert now.kernel == kernel_fingerprint() and now.kernel_note is None
    run["provenance"]["kernel"] = "0123456789ab"
    other = read_table(write_table([_write(tmp_path / "other.json", run)], tmp_path / "c"))
    assert "kernel 0123456789ab" in other.kernel_note and kernel_fingerprint() in other.kernel_note


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_kernel_fingerprint_counts_code_not_comments_or_docs():
    from mxmoe.kernels.version import _code

    src = 'def f(x):\n    """Doc."""\n    return x + 1  # note\n'
    assert _code(src) == _code("def f(x):\n    return x + 1\n")
    assert _code(src) != _code("def f(x):\n    return x + 2\n")
    assert _code(src) == "deff(x):returnx+1"  # the text itself: the same on every Python version


# shipped cost tables measured on an earlier kernel than this checkout's (each flagged where it is loaded;
# results/kernels/NOTES.md says what changed since): the H200's, by its W4A8, launch-plan and bf16 paths
STALE_TABLES = {"nvidia_h200"}


@pytest.mark.parametrize("gpu", sorted(p.stem for p in COST_TABLES.glob("*.json")))
def test_committed_tables_are_the_installed_kernels_but_the_known_stale(gpu):
    """Every shipped cost table was measured on the kernel this checkout runs (a kernel change needs new runs), but
    those of ``STALE_TABLES``, which are all flagged: a new stale table fails, and so does a re-measured one still listed."""
    from mxmoe.perfmodel import load_table

    table = load_table(gpu)
    assert (table.kernel_note is not None) == (gpu in STALE_TABLES), table.kernel_note


# (variant, tokens) of committed benchmark rows whose output is wrong: the per-channel W4A8 tile of 256 tokens
# (transposed, 8 warps; in the H200's runs, of the earlier kernel) is wrong on the GPU and right under the
# interpreter (results/kernels/NOTES.md)
KNOWN_WRONG = {("ours_w4a8_fp8_g-1", 8192)}


def test_committed_runs_match_the_reference_but_the_known_wrong_rows():
    """Every committed benchmark row of our kernel is within ``WRONG_OUTPUT`` of ``reference_group_gemm``, but the
    rows of ``KNOWN_WRONG``, which are all still wrong: a new wrong row fails, and so does a fixed one still listed."""
    from mxmoe.paths import kernel_results_dir

    rows = [r for d in runs.bench_docs(kernel_results_dir()) for r in d["results"]]
    checked = [r for r in rows if r.get("rel_err_vs_reference") is not None]
    assert len(checked) > 1000 and {(r["variant"], r["tokens"]) for r in rows if runs.wrong_output(r)} == KNOWN_WRONG


@pytest.fixture
def fake_gpu_bench(monkeypatch):
    """``mxmoe.bench.gemm`` on the CPU: ceilings, provenance (kernel ``gpu["kernel"]``) and the edge check faked."""
    from mxmoe.bench import gemm

    gpu = {"device": "fake gpu", "kernel": "k1"}
    monkeypatch.setattr(gemm, "DEV", "cpu")
    monkeypatch.setattr(gemm, "measure_roofline", lambda: {"copy_GBps": 1.0})
    monkeypatch.setattr(gemm, "provenance", lambda: dict(gpu))
    monkeypatch.setattr(gemm, "edge_check", lambda: {"rel_err": 2e-3})
    gpu["compiled"] = []  # the groups handed to precompile, run after by nothing but the edge check
    monkeypatch.setattr(
        gemm, "precompile", lambda groups, workers, meanwhile: gpu["compiled"].extend(groups) or meanwhile()
    )
    return gemm, gpu


def test_benchmark_times_nothing_when_the_kernel_disagrees_with_the_reference(fake_gpu_bench, monkeypatch, tmp_path):
    """A failed edge check (a wrong or NaN result against reference_group_gemm) stops the run before any timing,
    so a wrong kernel's timings never reach a cost table."""
    gemm, _ = fake_gpu_bench
    monkeypatch.setattr(
        gemm, "edge_check", lambda: {"rel_err": 2e-3, "w3a16_g128_asym": 0.9, "w2a16_g128_asym": float("nan")}
    )
    monkeypatch.setattr(gemm, "run_case", lambda *a, **k: pytest.fail("timed a wrong kernel"))
    with pytest.raises(SystemExit, match=r"w3a16_g128_asym \(0.9\), w2a16_g128_asym \(nan\); nothing was timed"):
        gemm.main(["--out", str(tmp_path), "--models", "qwen1.5-moe"])
    assert not list(tmp_path.iterdir())
    assert gemm.failed_edges({"rel_err": 2e-3}) == {}


def test_a_benchmark_run_cut_short_is_continued_by_the_same_command(fake_gpu_bench, monkeypatch, tmp_path):
    """A second run of the same kernel, GPU and timer keeps the cases already in the output file and times only
    the missing ones; --fresh, another kernel or another timer times everything again."""
    gemm, gpu = fake_gpu_bench
    timed = []

    def fake_case(model, g, n, k, tokens, *a, **kw):
        timed.append((model, g, tokens))
        return [{"model": model, "gemm": g, "tokens": tokens, "variant": "ours_bf16", "ms": 1.0}]

    monkeypatch.setattr(gemm, "_packs_for", lambda w: None)
    monkeypatch.setattr(gemm, "_print_case", lambda rows: None)
    monkeypatch.setattr(gemm, "targets", lambda rows: {})
    monkeypatch.setattr(gemm, "run_case", fake_case)
    base = ["--out", str(tmp_path), "--tokens", "16", "512", "--table6-models", "--ablation-models"]

    def run(*extra):
        timed.clear()
        gemm.main([*base, *extra])
        return sorted(timed), json.loads((tmp_path / "bench_fake_gpu.json").read_text())

    first, doc = run("--models", "smollm2-moe")
    assert len(first) == 4 and len(doc["results"]) == 4
    gpu["compiled"].clear()
    second, doc = run("--models", "smollm2-moe", "smollm2-moe-shared")
    assert {m for m, _, _ in second} == {"smollm2-moe-shared"} and len(second) == 4
    # only the cases still to time are compiled ahead: (model, gemm, n, k, tokens, table6, ablation)
    assert [(m, g, t) for m, g, _, _, t, _, _ in gpu["compiled"]] == [
        ("smollm2-moe-shared", "gate_up", [16, 512]),
        ("smollm2-moe-shared", "down", [16, 512]),
    ]
    assert len(doc["results"]) == 8 and doc["continues"][0]["models"] == ["smollm2-moe"]
    assert len(run("--models", "smollm2-moe", "--fresh")[0]) == 4
    assert len(run("--models", "smollm2-moe", "--rep-ms", "7")[0]) == 4  # other timing settings
    assert len(run("--models", "smollm2-moe", "--rep-ms", "7", "--rounds", "2")[0]) == 4  # other rounds
    gpu["kernel"] = "k2"
    assert len(run("--models", "smollm2-moe", "--rep-ms", "7")[0]) == 4  # another kernel


def test_precompile_runs_the_checks_meanwhile_and_reports_what_a_worker_could_not_compile(capsys):
    """The workers are spawned processes (the GPU's CUDA context cannot be forked); one that fails is reported
    and leaves its compiling to the timed run."""
    from mxmoe.bench import gemm

    bad = ("smollm2-moe", "down", 576, 32, [16], False, False)
    assert gemm.precompile([bad], 1, lambda: "checked", budget_bytes=1e9) == "checked"
    assert "precompile: smollm2-moe down: " in capsys.readouterr().out  # no GPU in the worker


def test_precompile_keeps_the_workers_gpu_memory_within_its_budget(monkeypatch):
    """Largest GEMMs first, as many at once as the budget holds (one alone when it holds none); all of them run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mxmoe.bench import gemm
    from mxmoe.bench.cases import gemms

    groups = [
        (m, g, n, k, [512], False, False) for m in ("qwen1.5-moe", "mixtral-8x7b", "olmoe") for g, n, k in gemms(m)
    ]
    sizes = {g[:2]: gemm.compile_bytes(*g) for g in groups}
    budget = sizes[("mixtral-8x7b", "gate_up")] + sizes[("olmoe", "down")]  # the largest fits with a small one
    lock, live, peak, order = threading.Lock(), [], [0], []

    def fake_compile(model, name, *_):
        with lock:
            live.append(sizes[(model, name)])
            order.append((model, name))
            peak[0] = max(peak[0], sum(live))
        time.sleep(0.05)
        with lock:
            live.remove(sizes[(model, name)])

    monkeypatch.setattr(gemm, "compile_gemm", fake_compile)
    monkeypatch.setattr(gemm, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))
    assert gemm.precompile(groups, 4, lambda: "checked", budget_bytes=budget) == "checked"
    assert sorted(order) == sorted(g[:2] for g in groups) and order[0] == ("mixtral-8x7b", "gate_up")
    assert peak[0] <= budget
    order.clear()
    peak[0] = 0
    gemm.precompile(groups, 4, lambda: None, budget_bytes=1.0)  # nothing fits: one at a time
    assert peak[0] == max(sizes.values()) and len(order) == len(groups)


STALLED_CASE = """
import json
from mxmoe.bench import gemm

gemm.DEV = "cpu"
seen = []  # the functions timed, in order; the fifth timing of the case is slowed 4x (a stall of the machine)


def fake_ms(fn):
    seen.append(fn)
    return 4.0 if len(seen) == 5 else 1.0


gemm._ms = fake_ms
gemm.host_ms = lambda fn: 0.01
e, n, k = 8, 64, 128
w = gemm.torch.randn(e, n, k, dtype=gemm.torch.bfloat16) * 0.02
rows = gemm.run_case("smollm2-moe", "down", n, k, 16, 2, w, gemm._packs_for(w), {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0},
                     count=False, table6=False, ablation=False)
per_round = len(seen) // 3
print(json.dumps({"rows": rows, "reversed": seen[per_round:2 * per_round] == seen[:per_round][::-1],
                  "timings": len(seen)}))
"""


def test_a_stall_during_one_timing_moves_one_round_not_the_result():
    """Every variant of a case is timed in three rounds, the second in reverse order, and keeps the median: a
    variant slowed 4x in one round (events-timed rows 1.4-4x slow on a busy machine) reports its usual time, and
    its derived rates (TFLOP/s, bandwidth fractions, ratios to the peers) use that median."""
    out = json.loads(run_interpreted(["-c", STALLED_CASE], timeout=900))
    timed = [r for r in out["rows"] if "ms" in r]
    assert out["reversed"] and out["timings"] == 3 * sum(
        sum(k in r for k in ("ms", "ms_with_act_quant", "ms_act_quant")) for r in timed
    )
    assert len(timed) >= 12 and all(r["ms"] == 1.0 and len(r["ms_rounds"]) == 3 for r in timed)
    assert all(r["host_ms"] == 0.01 for r in timed)  # the host's part of a call, apart from the GPU time
    assert sum(4.0 in r[k] for r in timed for k in r if k.endswith("_rounds")) == 1
    fp8 = next(r for r in out["rows"] if r["variant"] == "torch_scaled_grouped_fp8")
    assert "error" in fp8 and "ms" not in fp8  # no fp8 grouped GEMM on the CPU: an error row, never timed
    bf16 = next(r for r in timed if r["variant"] == "ours_bf16")
    flops = 2 * bf16["rows"] * bf16["N"] * bf16["K"]
    assert bf16["speedup_vs_torch_bf16"] == 1.0 and bf16["TFLOPs"] == pytest.approx(flops / 1e9)  # 1 ms a call
    assert bf16["moved_bw_frac"] > 0 and bf16["roofline_frac"] > 0


def test_grouped_w4a8_tile_follows_the_launch_warps(monkeypatch):
    """Grouped fp8 W4A8 codes take 64-token transposed tiles of one warpgroup at prefill, and the 128 x 128 tile
    where another slot makes the launch two warpgroups (over 8 warps the small tile is 1.8x slower, H100)."""
    gg = importlib.import_module("mxmoe.kernels.group_gemm")  # the module (mxmoe.kernels.group_gemm is the function)
    monkeypatch.setattr(gg, "INTERPRET", False)  # the GPU's tiles, planned on the CPU
    alone = ExpertGroup([pack(torch.randn(256, 256), "w4a8_g128_sym_fp8") for _ in range(2)])
    mixed = ExpertGroup([pack(torch.randn(256, 256), s) for s in ("w4a8_g128_sym_fp8", "bf16")])
    w4a8 = Scheme.parse("w4a8_g128_sym_fp8")
    ((s, c),) = gg.launch_plan(alone, rows=2 * 546)
    assert (s, c) == (w4a8, TileConfig(64, 128, 128, 3, swap_ab=True)) and launch_warps([c]) == 4
    plan = dict(gg.launch_plan(mixed, rows=2 * 546))
    assert plan[w4a8] == TileConfig(128, 128, 128, 3) and launch_warps(list(plan.values())) == 8
    assert dict(gg.launch_plan(mixed, rows=2 * 34))[w4a8] == TileConfig(64, 128, 128, 3, swap_ab=True)  # 512 tokens
    channel = ExpertGroup([pack(torch.randn(256, 256), "w4a8_g-1_sym_fp8") for _ in range(2)])
    ((_, c),) = gg.launch_plan(channel, rows=2 * 546)  # per channel: no promotion, 128 tokens fit one warpgroup
    assert c == TileConfig(128, 128, 128, 3, swap_ab=True, warps=4) and launch_warps([c]) == 4
    ((_, c),) = gg.launch_plan(channel, rows=2 * 34)
    assert c == TileConfig(64, 128, 128, 3, swap_ab=True)


def test_one_warpgroup_tile_keeps_its_launch_where_the_other_slots_can_follow(monkeypatch):
    """Per-channel W4A8's 128-token tile is written for one warpgroup: beside w8a8 fp8 (the Hopper 4.25-bit mix)
    the 8-bit slot takes its one-warpgroup 128 x 128 tile instead of pulling both onto 8 warps; beside bf16, which
    has no such tile, the launch still takes 8 warps and every slot its 8-warp tile."""
    gg = importlib.import_module("mxmoe.kernels.group_gemm")
    monkeypatch.setattr(gg, "INTERPRET", False)
    w4a8, w8a8 = Scheme.parse("w4a8_g-1_sym_fp8"), Scheme.parse("w8a8_g-1_sym_fp8")
    alone = ExpertGroup([pack(torch.randn(256, 256), w8a8) for _ in range(2)])
    ((_, c),) = gg.launch_plan(alone, rows=2 * 546)
    assert c == TileConfig(128, 256, 128, 4) and launch_warps([c]) == 8  # alone: two warpgroups, deep prefetch
    mix = ExpertGroup([pack(torch.randn(256, 256), s) for s in (w8a8, w4a8, w4a8)])
    plan = dict(gg.launch_plan(mix, rows=3 * 546))
    assert plan[w8a8] == TileConfig(128, 128, 128, 3, warps=4)
    assert plan[w4a8] == TileConfig(128, 128, 128, 3, swap_ab=True, warps=4)
    assert launch_warps(list(plan.values())) == 4
    with_bf16 = ExpertGroup([pack(torch.randn(256, 256), s) for s in ("bf16", w4a8)])
    plan = dict(gg.launch_plan(with_bf16, rows=2 * 546))
    assert plan[w4a8] == TileConfig(128, 128, 128, 3) and launch_warps(list(plan.values())) == 8


def test_bf16_prefill_tiles_load_by_tma_where_rows_are_whole_16_byte_units(monkeypatch):
    """bf16's 128-row tiles load x and the weight through tensor descriptors (TMA); smaller ones keep pointer
    loads (as fast there, H100); a K that is not a multiple of 8 has rows TMA cannot address; no other path
    takes the option."""
    gg = importlib.import_module("mxmoe.kernels.group_gemm")
    from mxmoe.kernels.configs import check_config, default_config

    monkeypatch.setattr(gg, "INTERPRET", False)
    bf16 = Scheme.parse("bf16")
    assert default_config(bf16, 546).tma and not default_config(bf16, 34).tma
    ((_, c),) = gg.launch_plan(ExpertGroup([pack(torch.randn(64, 256), bf16) for _ in range(2)]), rows=2 * 546)
    assert c == TileConfig(128, 256, 64, 4, tma=True)
    ((_, c),) = gg.launch_plan(ExpertGroup([pack(torch.randn(64, 260), bf16) for _ in range(2)]), rows=2 * 546)
    assert c == TileConfig(128, 256, 64, 4, tma=False)
    with pytest.raises(ValueError, match="tma is a path of bf16"):
        check_config(Scheme.parse("w4a16_g128_asym"), TileConfig(64, 128, 128, 3, swap_ab=True, tma=True))
