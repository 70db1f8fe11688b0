"""The paper's models at full size: config table, random builder, sync-free routing, allocations, result schema.

CPU tests use tiny configs and paper configs cut to a few layers; the CUDA test (skipped without a
GPU) checks that one MoE layer's packed experts forward runs under ``set_sync_debug_mode("error")``.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from interp import run_interpreted

from mxmoe.bench import paper_models as pm
from mxmoe.kernels.moe import route, route_with_inverse
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.paper import PAPER_CONFIGS, PAPER_MODELS, paper_config
from mxmoe.models.random_init import build_random, calibrate_bias, target_profile
from mxmoe.models.zoo import PAPER_MODELS as ZOO_PAPER_MODELS
from mxmoe.models.zoo import MoEShape
from mxmoe.stages.routing import embedded_profile


def _bincount_route(top_k_index, num_experts):
    """The host-synchronising route this package used before (torch.bincount): the reference."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0)
    return order, offsets


@pytest.mark.parametrize("experts,tokens,k", [(8, 5, 2), (60, 33, 4), (16, 0, 2), (64, 3, 6), (4, 7, 4)])
def test_route_equals_bincount_route(experts, tokens, k):
    g = torch.Generator().manual_seed(experts * 100 + tokens)
    idx = (
        torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    order, offsets = route(idx, experts)
    ref_order, ref_offsets = _bincount_route(idx, experts)
    assert torch.equal(order, ref_order) and torch.equal(offsets, ref_offsets)
    if tokens and experts > tokens * k:  # some experts got no token: equal offsets in a row
        assert (offsets[1:] == offsets[:-1]).any()
    _, inv, _ = route_with_inverse(idx, experts)
    assert torch.equal(order[inv], torch.arange(tokens * k))


ONE_PROGRAM_ROUTE = """
import json, sys, torch
from mxmoe.kernels import moe
assert moe._triton_ok(torch.zeros(1))  # the interpreter runs the Triton kernels on the CPU
out = {}
for experts, pairs, seed in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (pairs,), generator=g) ** 2 % experts  # skewed, some experts empty
    order, inv, offsets = moe.route_with_inverse(ids.reshape(-1, 1), experts)
    ref = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts).cumsum(0)
    out[f"{experts}x{pairs}"] = bool(
        torch.equal(order, ref) and torch.equal(inv, torch.argsort(ref)) and offsets[0] == 0
        and torch.equal(offsets[1:].long(), counts) and order.dtype == inv.dtype == torch.int64
        and offsets.dtype == torch.int32
    )
print("ROUTE" + json.dumps(out))
"""


def test_one_program_route_equals_a_stable_sort_under_the_interpreter():
    """Decode-size routing in one Triton program (``_route_kernel``) is the stable sort, its inverse and the
    cumulated counts, for expert counts below and above the one-hot chunk's width and at the size limit."""
    from mxmoe.kernels.moe import ROUTE_ONE_PROGRAM_CELLS, _expert_pad

    at_limit = ROUTE_ONE_PROGRAM_CELLS // _expert_pad(64)  # the most pairs of 64 experts it takes
    cases = [(4, 28, 0), (60, 132, 1), (128, 128, 2), (64, at_limit, 3), (8, 1, 4)]
    stdout = run_interpreted(["-c", ONE_PROGRAM_ROUTE, json.dumps(cases)])
    assert all(p * _expert_pad(e) <= ROUTE_ONE_PROGRAM_CELLS for e, p, _ in cases)  # each takes the one program
    got = json.loads(stdout.split("ROUTE")[-1])
    assert got == {f"{e}x{p}": True for e, p, _ in cases}


def test_paper_table_is_one_and_reexported():
    assert ZOO_PAPER_MODELS is PAPER_MODELS and set(PAPER_CONFIGS) == set(PAPER_MODELS)
    assert isinstance(PAPER_MODELS["qwen1.5-moe"][1], MoEShape)
    for name, (_, shape) in PAPER_MODELS.items():
        d = pm.model_dims(paper_config(name))
        assert (d["num_experts"], d["hidden"], d["expert_width"], d["top_k"]) == (
            shape.num_experts,
            shape.hidden,
            shape.expert_width,
            shape.top_k,
        ), name
        assert sum(d["shared_widths"]) == shape.shared_width, name
        assert len(pm.moe_layer_ids(paper_config(name))) == shape.moe_layers, name
    with pytest.raises(ValueError, match="unknown paper model"):
        paper_config("qwen9")


def test_full_size_parameter_counts_on_meta():
    from transformers import AutoModelForCausalLM

    want = {"qwen1.5-moe": 14.3, "deepseek-v2-lite": 15.7, "qwen3-30b": 30.5, "mixtral-8x7b": 46.7}
    for name, billions in want.items():
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(paper_config(name), dtype=torch.bfloat16)
        assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(billions, abs=0.06), name


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-mixtral", "tiny-deepseek-v2", "tiny-olmoe", "tiny-qwen3-moe"])
def test_build_random_tiny(name):
    measured = embedded_profile()
    m1, r1 = build_random(name, device="cpu", dtype=torch.float32, seed=3, measured=measured, calib_shape=(2, 64))
    m2, _ = build_random(name, device="cpu", dtype=torch.float32, seed=3, measured=measured, calib_shape=(2, 64))
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n  # seeded
        assert torch.isfinite(a).all() and (a.dim() < 2 or a.std() > 0), n
    assert r1["kind"] == "measured" and r1["shares"].shape[0] == len(moe_blocks(m1))
    assert all(hasattr(b.router, "mxmoe_bias") for b in moe_blocks(m1))
    out = m1(torch.randint(0, 512, (1, 8))).logits
    assert torch.isfinite(out).all()


def test_build_random_scaled_paper_config_and_skew():
    m, r = build_random(
        "deepseek-v2-lite",
        device="cpu",
        dtype=torch.float32,
        num_hidden_layers=2,
        vocab_size=256,
        hidden_size=256,
        moe_intermediate_size=64,
        intermediate_size=128,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        calib_shape=(4, 128),
        measured=embedded_profile(),
    )
    blocks = moe_blocks(m)
    assert len(blocks) == 1 and blocks[0].num_experts == 64 and blocks[0].top_k == 6  # first layer stays dense
    assert len(r["max_over_min"]) == 1 and r["max_over_min"][0] > 1.5


def test_calibrated_bias_reaches_target_shares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g) + torch.randn(64, generator=g)  # inputs with a common direction
    w = torch.randn(16, 64, generator=g) * 0.1
    shares = torch.linspace(1.0, 8.0, 16)
    shares = shares / shares.sum()
    bias = calibrate_bias(shares, 2, x, w)
    idx = torch.topk(x @ w.t() + bias, 2).indices
    reached = torch.bincount(idx.reshape(-1), minlength=16).float()
    assert np.corrcoef(reached.numpy(), shares.numpy())[0, 1] > 0.97
    assert 4.0 < float(reached.max() / reached.min()) < 16.0  # target max/min is 8


def test_target_profiles():
    p = target_profile(60, 24, measured=embedded_profile(), seed=0)
    assert p["shares"].shape == (60, 24)[::-1] and np.allclose(p["shares"].sum(1), 1)
    z = target_profile(10, 3, ratio=20.0)
    assert z["max_over_min"] == pytest.approx([20.0] * 3, rel=1e-3)
    with pytest.raises(ValueError, match=">= 1"):
        target_profile(10, 3, ratio=0.5)
    with pytest.raises(ValueError, match="measured routing profile"):
        target_profile(10, 3)


def test_allocation_inputs_and_one_layer_solve():
    from mxmoe.allocate import layer_problem, solve_point
    from mxmoe.perfmodel import load_table
    from mxmoe.routing import batch_workload
    from mxmoe.schemes import scheme_set

    config = paper_config("qwen1.5-moe")
    dims, layers = pm.model_dims(config), pm.moe_layer_ids(config)
    prof = target_profile(dims["num_experts"], len(layers), measured=embedded_profile())
    rows = batch_workload(prof["shares"] * 1e6, 512, dims["top_k"])
    sens = pm.stand_in_sensitivity(layers, rows, 512, 1, [str(s) for s in scheme_set(pm.WEIGHT_ONLY_SET)])
    routing = {"layers": layers, "top_k": dims["top_k"], "counts": (prof["shares"] * 1e6).tolist(), "params": {}}
    p = layer_problem(sens, routing, dims, 0, load_table("nvidia_h200"), pm.WEIGHT_ONLY_SET, 512, "qwen1.5-moe")
    assert p.loss.shape == (61, 3, 4) and (p.loss[:, :, 0] > p.loss[:, :, 2]).all()  # 2 bits cost more than 4
    pt = solve_point(p.loss, p.time, p.bits, p.size, 3.25, pm.ALLOC_R)
    assert pt.bits <= 3.25 + 1e-9


def _fake_doc():
    settings = []
    for i, name in enumerate(pm.SETTINGS):
        ms = {"ms": 1.0 + 0.1 * i}
        settings.append(
            {
                "setting": name,
                "impl": pm.SETTINGS[name]["impl"],
                "expert_bytes": 100 - i,
                "expert_bytes_vs_bf16": (100 - i) / 100,
                "block": {str(t): {"eager": ms, "graph": ms} for t in pm.FULL_SIZES["block_tokens"]},
                "prefill": {
                    f"{b}x{n}": {"eager": {"ms": 10.0}, "graph": {"ms": 9.0 + i}} for b, n in pm.FULL_SIZES["prefill"]
                },
                "decode": {str(b): {"graph": {"ms": 5.0}} for b in pm.FULL_SIZES["decode"]},
                "syncs": {"experts_forward": 0},
                "peak_gib": 1.0,
            }
        )
    return {
        "schema": pm.SCHEMA_VERSION,
        "model": "qwen1.5-moe",
        "hf_id": "Qwen/Qwen1.5-MoE-A2.7B",
        "provenance": {"device": "cpu", "torch": "x", "triton": "x", "transformers": "x", "git_commit": "x"},
        "sizes": pm.FULL_SIZES,
        "build": {"moe_layers": 24},
        "routing": {"kind": "measured", "reached_max_over_min": [2.0]},
        "allocation": {},
        "correctness": {"skipped": True},
        "settings": settings,
        "summary": {},
        "wall_s": 1.0,
    }


def test_result_schema_and_summary():
    doc = _fake_doc()
    doc["summary"] = pm.summarize(doc)
    pm.validate_doc(doc)
    s = doc["summary"]["mxmoe 4.25 (w-only)"]
    i = list(pm.SETTINGS).index("mxmoe 4.25 (w-only)")
    assert s["block_512_graph_speedup"] == pytest.approx(1.0 / (1.0 + 0.1 * i))
    f = s["prefill_1x512_moe_share"]
    assert f == pytest.approx(min(1.0, 24 * 1.0 / 9.0))
    assert "mxmoe 4.25" in pm.table(doc)
    targets = {t["measure"]: t for t in pm.target_rows(doc)}
    assert targets["host syncs per experts forward (max over mxmoe settings)"]["met"] is True
    assert targets["MoE block 512 tok captured: 4.25-bit vs bf16"]["met"] is False  # 1.0 ms vs 1.7 ms in the fake doc
    for broken, match in (
        (lambda d: d.pop("routing"), "lacks"),
        (lambda d: d["settings"][0].pop("decode"), "lacks"),
        (lambda d: d["routing"].pop("kind"), "skew"),
    ):
        bad = copy.deepcopy(doc)
        broken(bad)
        with pytest.raises(ValueError, match=match):
            pm.validate_doc(bad)


def test_committed_results_validate():
    from mxmoe.paths import REPO_ROOT

    files = pm.run_files(REPO_ROOT / "results" / "paper-models")
    assert files
    for f in files:
        doc = json.loads(f.read_text())
        pm.validate_doc(doc)
        gpu = pm.allocation_table_of(doc)
        for setting in doc["allocation"]:  # notebook 07 shows the allocations the run used
            assert pm.alloc_file(doc["model"], setting, gpu).exists(), (f.name, setting, gpu)


def test_allocations_default_to_the_gpu_they_run_on(monkeypatch):
    assert pm.allocation_gpu(on_cpu=True) == "nvidia_h200"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert pm.allocation_gpu(on_cpu=False) == "nvidia_h100"
    assert pm.allocation_gpu(on_cpu=True) == "nvidia_h200"  # --allocate-only and --smoke name theirs
    with pytest.raises(ValueError, match="several cost tables"):
        pm.allocation_table_of({"model": "m", "allocation": {"a": {"gpu": "nvidia_h100"}, "b": {"gpu": "nvidia_h200"}}})
    assert pm.allocation_table_of({"model": "m", "allocation": {}}) is None


DRY_RUN = """
import json, sys
from pathlib import Path
from mxmoe.bench import paper_models as pm
sizes = {"prefill": [[1, 8]], "decode": [1], "context": 4, "block_tokens": [8]}
partial = Path(sys.argv[1]) / "tiny-qwen2-moe_cpu.json.partial"
seen, validate = {}, pm.validate_doc
def spy(doc):  # just before the final write: the interim file holds every setting measured
    seen["partial"] = len(json.loads(partial.read_text())["settings"]) if partial.exists() else None
    return validate(doc)
pm.validate_doc = spy
doc = pm.run("tiny-qwen2-moe", sys.argv[1], settings=["bf16 grouped_mm", "mxmoe w4a16 g128"], reps=1,
             device="cpu", sizes=sizes)
print("DOC" + json.dumps({"passed": doc["correctness"]["passed"], "n": len(doc["settings"]), **seen}))
"""


def test_benchmark_dry_run_on_cpu(tmp_path):
    """The benchmark's whole code path on a tiny config on the CPU (kernels under the interpreter)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", DRY_RUN, str(tmp_path)], env=env, cwd=root, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("DOC")[-1])
    assert got == {"passed": True, "n": 2, "partial": 2}
    assert not (tmp_path / "tiny-qwen2-moe_cpu.json.partial").exists()  # removed once the result is written
    doc = json.loads((tmp_path / "tiny-qwen2-moe_cpu.json").read_text())
    pm.validate_doc(doc)
    packed = {r["setting"]: r for r in doc["settings"]}["mxmoe w4a16 g128"]
    assert packed["expert_bytes_vs_bf16"] < 1 and "1x8" in packed["prefill"] and "1" in packed["decode"]
    assert "error" not in packed["decode"]["1"], packed["decode"]
    for call in ("prefill_1x8", "decode_1"):  # where the time went, by kernel kind (CPU operators here)
        b = packed["breakdown"][call]
        assert b["total_us"] > 0 and b["top"] and abs(sum(b["by_kind"].values()) - b["total_us"]) < 1e-6 * b["total_us"]
    assert {r["call"] for r in pm.breakdown_rows([doc])} == {"prefill_1x8", "decode_1"}
    assert 0 < doc["summary"]["bf16 grouped_mm"]["decode_1_experts_gemm_share"] < 1  # aten::_grouped_mm
    case = doc["correctness"]["cases"]["mxmoe w4a16 g128"]
    assert case["rel"] < 1e-4 and case["block_rel"] < 1e-4  # same fp32 weights, same codes
    assert case["rounding_floor"] is None and case["tolerance"] == "weight-only"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_experts_forward_has_no_host_sync_cuda():
    """No synchronisation in the experts forward, its first call included (nothing uploaded lazily), and a
    whole first forward synchronises no more than transformers' own grouped_mm does (its mask code)."""
    model, _ = build_random("qwen1.5-moe", device="cuda", skew=0, num_hidden_layers=3, calib_shape=(2, 256))
    blocks = moe_blocks(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
    forward = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    pm.apply_setting(model, blocks, pm.BASELINE, None)
    baseline = pm.count_syncs(forward)
    for setting in ("mxmoe w4a16 g128", "mxmoe w8a8 fp8"):
        pm.apply_setting(model, blocks, setting, None)
        x = torch.randn(512, blocks[0].hidden_size, device="cuda", dtype=torch.bfloat16)
        w, idx = blocks[0].router(x)[1:]
        assert pm.count_syncs(lambda: blocks[0].experts(x, idx, w)) == 0, f"{setting}: first call"
        assert pm.count_syncs(forward) <= baseline, setting
        assert pm.raises_on_sync(lambda: blocks[0].experts(x, idx, w)) is None, setting
        assert pm.count_syncs(lambda: blocks[0].experts(x, idx, w)) == 0, setting
        assert math.isfinite(float(blocks[0].experts(x, idx, w).float().norm()))


def _fake_scaled_grouped_mm(align):
    """A CPU stand-in for torch._scaled_grouped_mm (dequantize, multiply per group); ``align`` > 0 refuses
    groups whose row count is not a multiple of it, as some builds of the real op do."""

    def mm(x_q, w_t, x_scale, w_scale, offs, out_dtype, use_fast_accum):
        x = x_q.float() * x_scale[:, None]  # [S, K]
        out = torch.zeros(x.shape[0], w_t.shape[2])
        start = 0
        for e, end in enumerate(offs.tolist()):
            if align:
                assert (end - start) % align == 0, "group not aligned"
            out[start:end] = x[start:end] @ (w_t[e].float() * w_scale[e][None])
            start = end
        return out.to(out_dtype)

    return mm


def test_fp8_baseline_padding_matches_unpadded():
    from mxmoe.kernels.moe import _fp8_grouped_aligned, fp8_grouped_mm, quantize_fp8_rows

    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(13)])  # [13, 2], some experts idle
    order, _, offsets = route_with_inverse(idx, 6)
    x = torch.randn(26, 32, generator=g).bfloat16()
    w = quantize_fp8_rows(torch.randn(6, 48, 32, generator=g))
    plain = fp8_grouped_mm(x, *w, offsets[1:], mm=_fake_scaled_grouped_mm(0))
    padded = _fp8_grouped_aligned(x, *w, offsets, idx.reshape(-1)[order], 16, mm=_fake_scaled_grouped_mm(16))
    assert torch.equal(plain, padded)
    with pytest.raises(AssertionError, match="aligned"):
        fp8_grouped_mm(x, *w, offsets[1:], mm=_fake_scaled_grouped_mm(16))


@torch.no_grad()
def test_repeated_decode_steps_stay_at_one_position():
    """Timing calls one decode step many times against a cache with little room: every call must decode at the
    same position (transformers 5's static cache advances on each update unless rewound)."""
    from mxmoe.models.zoo import tiny_model

    model = tiny_model("tiny-qwen2-moe").eval()
    ctx = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))  # [B, context]
    cache = pm.make_static_cache(model, 2, ctx.shape[1] + 1)
    model(input_ids=ctx, past_key_values=cache, cache_position=torch.arange(ctx.shape[1]), use_cache=True)
    step = pm.decode_step(model, cache, ctx[:, -1:], ctx.shape[1])
    first = step().logits
    for _ in range(5):  # more steps than the cache has free slots
        assert torch.allclose(step().logits, first)


def test_rounding_floor_grows_as_activations_get_coarser():
    x = (torch.randn(1, 256, 512, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    assert pm.rounding_floor(x, ["w4a16_g128_asym", "bf16"]) is None  # nothing quantizes activations
    a8, a4 = pm.rounding_floor(x, ["w8a8_g-1_sym"]), pm.rounding_floor(x, ["w4a4_g-1_sym"])
    assert 0 < a8 < a4 < 0.1
    assert pm.rounding_floor(x, ["w8a8_g-1_sym", "w4a4_g-1_sym"]) == a4  # the worst scheme of the plan


def test_a_smoke_run_without_out_writes_outside_the_results():
    """--smoke measures nothing: without --out it writes to a fresh temporary folder, never results/paper-models."""
    smoke = pm.output_dir(None, smoke=True)
    assert smoke.is_dir() and pm.REPO_ROOT not in smoke.parents and smoke != pm.output_dir(None, smoke=True)
    assert pm.output_dir(None, smoke=False) == pm.REPO_ROOT / "results" / "paper-models"
    assert pm.output_dir("elsewhere", smoke=True) == Path("elsewhere")


def test_labels_of_close_points_do_not_overlap():
    """Figure 5's labels: settings with almost the same memory and speed stay readable."""
    from mxmoe.plots import figure, label_points

    fig, axes = figure()
    ax = axes[0, 0]
    xs, ys = [8.5, 8.6, 7.0, 25.0], [2000.0, 1990.0, 1985.0, 1400.0]
    labels = ["mxmoe w4a16 g128", "mxmoe 4.25 (w-only)", "mxmoe 3.25 (w-only)", "bf16 grouped_mm"]
    ax.scatter(xs, ys)
    label_points(ax, xs, ys, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == labels  # one label per point, highest first
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_kernel_kinds():
    from mxmoe.bench.breakdown import kind_of

    assert kind_of("group_gemm_kernel") == "experts GEMM"
    assert kind_of("void cutlass::device_kernel<GemmUniversal<GroupProblemShape<...>>>") == "experts GEMM"
    assert kind_of("_combine_kernel") == "experts glue"
    assert kind_of("flash_fwd_kernel") == "attention"
    assert kind_of("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_TNT") == "dense GEMM"
    assert kind_of("aten::addmm") == "dense GEMM"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, ...>") == "norm and elementwise"
    assert kind_of("something_unheard_of") == "other"


def test_ceiling_rows_bound_what_faster_expert_gemms_can_buy():
    """Per profiled call: speedup over bf16 in device time, and the speedup with the experts GEMMs at zero."""
    doc = _fake_doc()
    doc["provenance"]["device"] = "NVIDIA H100 80GB HBM3"
    kinds = lambda gemm, rest: {"total_us": gemm + rest, "by_kind": {"experts GEMM": gemm, "other": rest}}  # noqa: E731
    for r in doc["settings"]:
        r["breakdown"] = {"decode_16": kinds(6000.0, 6000.0) if r["setting"] == pm.BASELINE else kinds(3000.0, 5000.0)}
    rows = {r["setting"]: r for r in pm.ceiling_rows([doc])}
    assert pm.gpu_of(doc) == "H100" and rows["mxmoe 3.25 (w-only)"]["gpu"] == "H100"
    mx = rows["mxmoe 3.25 (w-only)"]
    assert mx["device_ms"] == 8.0 and mx["experts_gemm_ms"] == 3.0
    assert mx["speedup"] == pytest.approx(12 / 8) and mx["ceiling"] == pytest.approx(12 / 5)
    assert rows[pm.BASELINE]["speedup"] == 1.0


def test_run_files_leave_out_streamed_runs(tmp_path):
    for name in ("qwen1.5-moe_NVIDIA_H200.json", "mixtral-8x7b_streamed_NVIDIA_H100_80GB_HBM3.json", "x_cpu.json"):
        (tmp_path / name).write_text("{}")
    assert [f.name for f in pm.run_files(tmp_path)] == ["qwen1.5-moe_NVIDIA_H200.json"]
