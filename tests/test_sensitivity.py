import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import fresh

import mxmoe.sensitivity as sens
from mxmoe.errors import MxMoEError
from mxmoe.models import moe_blocks
from mxmoe.quant.apply import UnsupportedScheme, apply_schemes
from mxmoe.quant.layerwise import LayerwiseRunner

torch.set_num_threads(1)  # tiny tensors: a second thread only spins on the shared 2-core machine

SCHEMES = ["bf16", "w3a16_g16_asym", "w4a4_g-1_sym"]
WINDOWS = torch.randint(3, 500, (3, 32), generator=torch.Generator().manual_seed(1))


def test_local_delta_equals_full_block_recomputation():
    model = fresh()
    b = moe_blocks(model)[1]
    runner = LayerwiseRunner(model, WINDOWS)
    runner.advance()
    x = runner.block_inputs(b.module)  # [N, H] full-precision inputs of layer 1's MoE block
    res = sens.layer_sensitivity(b, x, [sens.check_scheme(s) for s in SCHEMES], "rtn")
    assert res["experts"][-1] == "shared0" and sum(res["tokens"][:-1]) == x.shape[0] * b.top_k
    with torch.no_grad():
        ref = b.module(x[None])[0]
    cases = [
        (3, "gate", 2),
        (3, "up", 2),
        (3, "down", 2),
        (5, "down", 1),
        ("shared0", "gate", 2),
        ("shared0", "down", 1),
    ]
    for expert, block, k in cases:
        i, j = res["experts"].index(expert), ("gate", "up", "down").index(block)
        q = fresh()
        apply_schemes(q, {(b.layer, expert, block): SCHEMES[k]})
        with torch.no_grad():
            full = torch.linalg.norm(moe_blocks(q)[1].module(x[None])[0] - ref).item()
        assert full > 0 and res["delta"][i][j][k] == pytest.approx(full, rel=1e-3), (expert, block, SCHEMES[k])
    assert all(d[j][0] == 0.0 for d in res["delta"] if d[0][0] is not None for j in range(3))  # bf16


def test_gptq_beats_rtn_in_aggregate_and_had_runs():
    model = fresh()
    schemes = ["w3a16_g-1_asym"]
    rtn = sens.compute_sensitivity(model, WINDOWS, schemes, "rtn", progress=False)
    gptq = sens.compute_sensitivity(model, WINDOWS, schemes, "gptq", min_tokens=4, progress=False)
    had = sens.compute_sensitivity(model, WINDOWS, schemes, "gptq-had", min_tokens=4, progress=False)
    total = {
        k: sum(np.nansum(sens.sensitivity_array(r, layer, fill="nan")[0]) for layer in (0, 1))
        for k, r in (("rtn", rtn), ("gptq", gptq), ("had", had))
    }
    assert total["gptq"] < 0.9 * total["rtn"]
    assert np.isfinite(total["had"]) and total["had"] > 0
    assert had["params"]["rotation"]["seed"] == 0


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bf16_model_takes_float32_calibration_inputs(method):
    """A model held in bf16 (as on a GPU) routes float32 calibration inputs in its own dtype."""
    model = fresh().to(torch.bfloat16)
    b = moe_blocks(model)[0]
    x = torch.randn(64, b.hidden_size, generator=torch.Generator().manual_seed(0))  # [N, H] float32
    res = sens.layer_sensitivity(b, x, [sens.check_scheme("w4a16_g16_asym")], method)
    assert sum(res["tokens"][: b.num_experts]) == x.shape[0] * b.top_k
    assert res["tokens"] and all(np.isfinite(d) for row in res["delta"] if row[0][0] is not None for d in row[0])
    weights, idx = b.route(x)
    assert torch.equal(idx, b.route(x.to(torch.bfloat16))[1]) and weights.dtype == torch.float32


def test_experts_without_tokens_are_null_and_filled():
    b = moe_blocks(fresh())[0]
    x = torch.randn(2, b.hidden_size)  # 2 tokens x top-2: at most 4 of 8 experts see a token
    with pytest.warns(UserWarning, match="no calibration token"):
        res = sens.layer_sensitivity(b, x, [sens.check_scheme("w4a16_g-1_asym")], "gptq", min_tokens=16)
    assert len(res["no_tokens"]) >= 4 and all(
        res["delta"][res["experts"].index(e)][0][0] is None for e in res["no_tokens"]
    )
    assert len(res["rtn_fallbacks"]) == 3 * (len(res["experts"]) - len(res["no_tokens"]))  # 2 tokens < 16
    arr, ids = sens.sensitivity_array({"layers": {"0": res}}, 0)
    measured = [i for i, e in enumerate(ids) if e not in res["no_tokens"]]
    assert np.isfinite(arr).all() and arr[ids.index(res["no_tokens"][0]), 0, 0] == arr[measured, 0, 0].max()


@pytest.mark.parametrize("method", ["rtn", "gptq-had"])
def test_resume_after_a_killed_run(tmp_path, monkeypatch, method):
    path = tmp_path / "s.json"
    full = sens.compute_sensitivity(fresh(), WINDOWS, SCHEMES, method, path=tmp_path / "ref.json", progress=False)
    real, calls = sens.layer_sensitivity, []

    def dies_after_one(block, *a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(block.layer)
        return real(block, *a, **k)

    monkeypatch.setattr(sens, "layer_sensitivity", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        sens.compute_sensitivity(fresh(), WINDOWS, SCHEMES, method, path=path, progress=False)
    assert list(json.loads(path.read_text())["layers"]) == ["0"]
    calls.clear()
    monkeypatch.setattr(
        sens, "layer_sensitivity", lambda block, *a, **k: calls.append(block.layer) or real(block, *a, **k)
    )
    resumed = sens.compute_sensitivity(fresh(), WINDOWS, SCHEMES, method, path=path, progress=False)
    assert calls == [1]
    timeless = lambda r: {k: {f: v for f, v in lay.items() if f != "seconds"} for k, lay in r["layers"].items()}  # noqa: E731
    assert timeless(resumed) == timeless(full)
    # a complete file is read without copying or rotating the model
    model = fresh()
    monkeypatch.setattr(sens.copy, "deepcopy", lambda m: pytest.fail("copied the model for a complete file"))
    monkeypatch.setattr(sens, "rotate_model", lambda *a, **k: pytest.fail("rotated the model for a complete file"))
    again = sens.compute_sensitivity(model, WINDOWS, SCHEMES, method, path=path, progress=False)
    assert timeless(again) == timeless(full)


def test_bad_input():
    model = fresh()
    b = moe_blocks(model)[0]
    with pytest.raises(MxMoEError, match="unknown sensitivity method"):
        sens.compute_sensitivity(model, WINDOWS, SCHEMES, "awq")
    with pytest.raises(UnsupportedScheme):
        sens.compute_sensitivity(model, WINDOWS, ["w1a16_g-1_sym"], "rtn")
    with pytest.raises(MxMoEError, match="no schemes"):
        sens.compute_sensitivity(model, WINDOWS, [], "rtn")
    with pytest.raises(MxMoEError, match="no calibration tokens"):
        sens.layer_sensitivity(b, torch.zeros(0, b.hidden_size), [sens.check_scheme("w4a16_g-1_asym")])
    with pytest.raises(MxMoEError, match="layer 5"):
        sens.sensitivity_array({"layers": {"0": {}}}, 5)


def test_cli_bad_input_exits_2(capsys):
    from mxmoe.cli import main

    assert main(["sensitivity", "tiny-mixtral", "--schemes", "w4a16_g-1_asym"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["sensitivity", "tiny-mixtral", "--schemes", "w1a16_g-1_sym"]) == 2
    assert "at least 2 bits" in capsys.readouterr().err


def _split_calls(monkeypatch, key):
    """Make sensitivity quantize its batches in sub-batches grouped by ``key(element, scheme)``
    (one call per element, or per scheme as before mixed batches); returns the batch sizes seen."""
    import mxmoe.quant.experts as experts

    sizes = []
    real = experts.quantize_blocks

    def split(w, schemes, hessians, *a, **k):
        sizes.append(len(hessians))
        out, groups = [None] * len(hessians), {}
        for i, s in enumerate(schemes):
            groups.setdefault(key(i, s), []).append(i)
        for idx in groups.values():
            for i, q in zip(idx, real(w[idx], [schemes[i] for i in idx], [hessians[i] for i in idx], *a, **k)):
                out[i] = q
        return out

    monkeypatch.setattr(sens, "quantize_blocks", split)
    return sizes


@pytest.mark.parametrize("method,rotate", [("gptq", False), ("gptq", True), ("rtn", False)])
def test_batched_layer_equals_expert_by_expert(monkeypatch, method, rotate):
    import time

    import mxmoe.quant.experts as experts

    model = fresh()
    b = moe_blocks(model)[1]
    runner = LayerwiseRunner(model, WINDOWS)
    runner.advance()
    x = runner.block_inputs(b.module)  # [N, H]
    schemes = [sens.check_scheme(s) for s in SCHEMES + ["w8a8_g-1_sym_fp8", "w4a16_g16_sym"]]
    split = experts.split_by_expert(b, x)
    min_tokens = sorted(int(t.x.shape[0]) for t in split)[len(split) // 2]  # about half the experts fall back
    batch_sizes = []
    real = experts.gptq_quantize_batched
    monkeypatch.setattr(
        experts, "gptq_quantize_batched", lambda w, *a, **k: batch_sizes.append(w.shape[0]) or real(w, *a, **k)
    )
    t0 = time.perf_counter()
    res = sens.layer_sensitivity(b, x, schemes, method, rotate_down=rotate, min_tokens=min_tokens)
    t1 = time.perf_counter()
    first_run = sorted(batch_sizes)
    _split_calls(monkeypatch, lambda i, s: str(s))  # one GPTQ per (shape, block, scheme), as before mixed batches
    per_scheme = sens.layer_sensitivity(b, x, schemes, method, rotate_down=rotate, min_tokens=min_tokens)
    t2 = time.perf_counter()
    monkeypatch.setattr(experts, "gptq_quantize_batched", real)
    print(f"\nsensitivity {method} of one tiny layer: mixed batches {t1 - t0:.2f} s, per scheme {t2 - t1:.2f} s")
    assert res == per_scheme

    _split_calls(monkeypatch, lambda i, s: i)  # the reference: every block of every expert alone
    ref = {"experts": [], "tokens": [], "delta": [], "no_tokens": [], "rtn_fallbacks": []}
    for tokens in split:
        ref["experts"].append(tokens.expert)
        ref["tokens"].append(int(tokens.x.shape[0]))
        deltas, fallbacks = sens.expert_deltas(b, tokens, schemes, method, rotate_down=rotate, min_tokens=min_tokens)
        ref["delta"].append(deltas)
        ref["rtn_fallbacks"] += [[tokens.expert, *f] for f in fallbacks]
    assert res == ref  # exact, Δ included
    shapes = {tuple(experts.block_weight(b, e, "gate").shape) for e in res["experts"]}
    if method == "gptq":
        assert len(shapes) == 2 and res["rtn_fallbacks"]  # routed and shared experts differ in shape
        assert len(res["rtn_fallbacks"]) < 3 * (len(schemes) - 1) * len(res["experts"])  # and some ran GPTQ
        # one mixed-scheme GPTQ per (expert shape, weight shape): every quantized scheme of gate and up
        # together, down apart (the shared expert's down has their shape too: one call)
        q, routed = len(schemes) - 1, len(res["experts"]) - 1
        assert first_run == sorted([2 * q * routed, q * routed, 3 * q])
    else:
        assert batch_sizes == []


def test_batches_over_the_memory_limit_run_in_parts(monkeypatch):
    """A batch larger than ``gptq_batch_limit`` (half a GPU's free memory) is quantized in parts, same result."""
    import mxmoe.quant.experts as experts

    model = fresh()
    b = moe_blocks(model)[1]
    runner = LayerwiseRunner(model, WINDOWS)
    runner.advance()
    x = runner.block_inputs(b.module)  # [N, H]
    schemes = [sens.check_scheme(s) for s in SCHEMES]
    whole = sens.layer_sensitivity(b, x, schemes, "gptq", min_tokens=1)
    assert experts.gptq_batch_limit(torch.zeros(5, 2, 3)) == 5  # on the CPU: all at once
    mixtral = SimpleNamespace(device=torch.device("cuda", 0), shape=(64, 14336, 4096))  # one layer's batch
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    assert experts.gptq_batch_limit(mixtral) == 17  # 30 GiB over 8 float32 copies of 14336 x 4096
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 80 * 2**30))
    assert experts.gptq_batch_limit(mixtral) == 1  # never less than one
    sizes, real = [], experts.gptq_quantize_batched
    monkeypatch.setattr(experts, "gptq_batch_limit", lambda w: 3)
    monkeypatch.setattr(
        experts, "gptq_quantize_batched", lambda w, *a, **k: sizes.append(w.shape[0]) or real(w, *a, **k)
    )
    assert sens.layer_sensitivity(b, x, schemes, "gptq", min_tokens=1) == whole
    assert max(sizes) == 3 and len(sizes) > 3  # unlimited: one call per weight shape (3)


def test_an_added_scheme_is_measured_alone_and_merged(tmp_path, monkeypatch):
    """Asking for a scheme set that adds schemes to one already measured (same weights and windows) measures only
    the added schemes and gives the Δ of measuring the whole set at once; a set not containing the old one, or
    other windows, starts afresh."""
    from mxmoe.profiles import get_profile
    from mxmoe.stages import sensitivity as stage
    from mxmoe.stages.allocation import sensitivity_with

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    old, old_path = stage.profile_sensitivity("rtn", smoke, "w4a16_g128_asym,w8a8_g-1_sym", progress=False)
    asked = []
    real = stage.compute_sensitivity
    monkeypatch.setattr(
        stage, "compute_sensitivity", lambda m, w, s, *a, **k: asked.append(s) or real(m, w, s, *a, **k)
    )
    wanted = "w4a8_g-1_sym_fp8,w4a16_g128_asym,w8a8_g-1_sym"
    merged, path = stage.profile_sensitivity("rtn", smoke, wanted, progress=False)
    assert [[str(s) for s in a] for a in asked] == [["w4a8_g-1_sym_fp8"]]
    assert merged["schemes"] == wanted.split(",") and [len(p["schemes"]) for p in merged["merged_from"]] == [2, 1]
    assert sorted(f.name for f in path.parent.iterdir()) == sorted([old_path.name, path.name])  # the part is gone
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path / "whole"))
    whole = stage.profile_sensitivity("rtn", smoke, wanted, progress=False)[0]
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    for key, lay in whole["layers"].items():
        assert np.allclose(np.array(merged["layers"][key]["delta"], float), np.array(lay["delta"], float), rtol=1e-5)
    assert old["layers"]["0"]["delta"][0][0] == merged["layers"]["0"]["delta"][0][0][1:]
    asked.clear()
    mtime = path.stat().st_mtime_ns
    assert stage.profile_sensitivity("rtn", smoke, wanted, progress=False)[0] == json.loads(path.read_text())
    assert path.stat().st_mtime_ns == mtime  # resumed whole: nothing measured or written
    os.utime(old_path)  # the subset's file is now the newest: the allocation still reads the one with its schemes
    assert sensitivity_with(smoke.model, "rtn", "w4a8_g-1_sym_fp8,w8a8_g-1_sym")["schemes"] == merged["schemes"]
    stage.profile_sensitivity("rtn", smoke, "w4a8_g-1_sym_fp8,w4a16_g128_asym", progress=False)  # not a superset
    stage.run_sensitivity(smoke.model, "rtn", wanted, n=3, seqlen=64, allow_random=True, progress=False)  # 3 windows
    assert [len(a) for a in asked] == [3, 2, 3]  # the resume, then two whole sets


def test_a_subset_routed_otherwise_is_measured_anew(tmp_path, monkeypatch):
    """Where the file to extend saw other tokens per expert than the added schemes' pass (a routing near-tie that
    a rotation on another machine decided otherwise), the added schemes' pass stops at that layer and the whole set
    is measured again: Δ of one set is never made of two routings."""
    from mxmoe.profiles import get_profile
    from mxmoe.stages import sensitivity as stage

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    _, old_path = stage.profile_sensitivity("rtn", smoke, "w4a16_g128_asym", progress=False)
    old = json.loads(old_path.read_text())
    tokens = old["layers"]["0"]["tokens"]
    tokens[0], tokens[1] = tokens[0] + 1, tokens[1] - 1  # one token routed to another expert
    old_path.write_text(json.dumps(old))
    asked, measured = [], []  # measured: (layer, number of schemes) of each Δ measurement
    real, real_deltas = stage.compute_sensitivity, sens.group_deltas
    monkeypatch.setattr(
        stage, "compute_sensitivity", lambda m, w, s, *a, **k: asked.append(s) or real(m, w, s, *a, **k)
    )
    monkeypatch.setattr(
        sens,
        "group_deltas",
        lambda b, e, s, *a, **k: measured.append((b.layer, len(s))) or real_deltas(b, e, s, *a, **k),
    )
    result, path = stage.profile_sensitivity("rtn", smoke, "w4a16_g128_asym,w8a8_g-1_sym", progress=False)
    assert [len(a) for a in asked] == [1, 2] and "merged_from" not in result
    layers = sorted(int(k) for k in old["layers"])
    # the added scheme's pass stopped at the first layer before measuring it; the whole set measured every layer
    assert len(layers) > 1 and sorted({layer for layer, _ in measured}) == layers and {n for _, n in measured} == {2}
    assert result["layers"]["0"]["tokens"] != tokens and len(list(path.parent.iterdir())) == 2
