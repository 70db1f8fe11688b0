"""Named baseline configurations, profile-sized evaluation with its cache, and the smoke-profile paths."""

import json

import pytest
import torch
from tiny import fresh

import mxmoe.baselines as baselines
import mxmoe.stages.routing as routing
from mxmoe.baselines import BASELINES, QuantConfig, average_bits, baseline, quantize, rtn_grid_config
from mxmoe.checkpoint import weights_sha256
from mxmoe.errors import MxMoEError
from mxmoe.profiles import get_profile
from mxmoe.quant.apply import uniform_scheme_map
from mxmoe.schemes import Scheme
from mxmoe.stages.evaluate import evaluate_config
from mxmoe.stages.sensitivity import profile_sensitivity


def test_named_baselines_match_the_paper():
    assert Scheme.parse(BASELINES["gptq*-3.25"].scheme).bits_per_weight == 3.25
    assert Scheme.parse(BASELINES["gptq*-2.25"].scheme).bits_per_weight == 2.25
    assert BASELINES["gptq*-2.25"].hadamard and BASELINES["quarot-w4a4"].hadamard
    q = Scheme.parse(BASELINES["quarot-w4a4"].scheme)
    assert (q.w_bits, q.a_bits, q.group_size, q.symmetric) == (4, 4, -1, True)
    assert baseline("w8a8", seed=3).seed == 3
    assert rtn_grid_config(5, 6).scheme == "w5a6_g-1_sym"


def test_bad_configs_are_named():
    with pytest.raises(MxMoEError, match="unknown baseline 'gptq'.*fp16"):
        baseline("gptq")
    with pytest.raises(MxMoEError, match="method must be one of"):
        QuantConfig("x", "w4a16_g128_asym", "awq")
    with pytest.raises(MxMoEError, match="calibration windows"):
        quantize(fresh(), baseline("gptq*-3.25"))


def test_average_bits_weights_blocks_by_size():
    model = fresh()
    smap = uniform_scheme_map(model, "w4a16_g128_asym")
    assert average_bits(model, smap) == (4.25, 16.0)
    # routed expert blocks are 32x64, the shared expert's 64x64: a mixed map is parameter-weighted
    smap = {k: (Scheme.parse("w8a8_g-1_sym") if isinstance(k[1], str) else Scheme.parse("w4a4_g-1_sym")) for k in smap}
    routed, shared = 2 * 8 * 3 * 32 * 64, 2 * 3 * 64 * 64
    w, a = average_bits(model, smap)
    assert w == pytest.approx((4 * routed + 8 * shared) / (routed + shared)) and a == w


def test_quantize_changes_logits_and_fp_does_not():
    x = torch.randint(3, 500, (1, 16))
    ref = fresh()(x).logits
    model = fresh()
    assert quantize(model, baseline("fp16"))["w_bits"] == 16.0
    assert torch.equal(model(x).logits, ref)
    report = quantize(model, baseline("w4a16"))
    assert report["w_bits"] == 4.25 and not torch.allclose(model(x).logits, ref, atol=1e-4)


def test_evaluate_config_caches_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    row = evaluate_config(baseline("gptq*-2.25"), smoke, progress=False)
    assert row["label"] == "gptq*-2.25" and row["w_bits"] == 2.25 and row["ppl"] > 1 and row["tasks"] == {}
    assert row["quantization"]["gptq"]["gptq_blocks"] + row["quantization"]["gptq"]["rtn_fallbacks"] > 0
    (path,) = (tmp_path / "tiny-qwen2-moe" / "eval" / "runs").glob("gptq-smoke-*.json")
    assert json.loads(path.read_text())["ppl"] == row["ppl"]
    monkeypatch.setattr(baselines, "quantize_model_gptq", lambda *a, **k: pytest.fail("cache not used"))
    assert evaluate_config(baseline("gptq*-2.25"), smoke, progress=False) == row
    renamed = evaluate_config(baseline("gptq*-2.25", label="same recipe"), smoke, progress=False)
    assert renamed == {**row, "label": "same recipe"}  # the label names a row, the recipe keys it
    other = evaluate_config(rtn_grid_config(8, 8), get_profile("smoke", eval_windows=1), zeroshot=False, progress=False)
    assert other["ppl"] != row["ppl"] and len(list(path.parent.glob("*.json"))) == 2


def test_a_run_with_a_scheme_map_records_its_digest_and_is_found_again(tmp_path, monkeypatch):
    """A row keeps the scheme map's digest (the allocation file holds the map) and is keyed by the map itself."""
    from mxmoe.quant.apply import scheme_map_to_rows, uniform_scheme_map
    from mxmoe.stages.evaluate import fresh_model, scheme_map_digest

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke", eval_windows=1)
    amap = uniform_scheme_map(fresh_model(smoke.model)[0], "w4a16_g128_asym")
    amap[next(iter(amap))] = "w8a8_g-1_sym"
    config = rtn_grid_config(8, 8)
    row = evaluate_config(config, smoke, scheme_map=amap, zeroshot=False, progress=False)
    digest = row["params"]["scheme_map"]
    assert digest == scheme_map_digest(scheme_map_to_rows(amap))
    assert digest["blocks"] == len(amap) and digest["blocks_per_scheme"]["w8a8_g-1_sym"] == 1
    monkeypatch.setattr(baselines, "apply_schemes", lambda *a, **k: pytest.fail("cache not used"))
    assert evaluate_config(config, smoke, scheme_map=amap, zeroshot=False, progress=False) == row
    amap[next(iter(amap))] = "w4a16_g128_asym"  # another map: another row
    monkeypatch.undo()
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    other = evaluate_config(config, smoke, scheme_map=amap, zeroshot=False, progress=False)
    assert other["params"]["scheme_map"]["sha256"] != digest["sha256"]
    assert scheme_map_digest(None) is None


def test_profiles_reject_unknown_names_and_fields():
    assert get_profile("quick", eval_windows=None).eval_windows == 4
    with pytest.raises(MxMoEError, match="unknown profile 'fast'"):
        get_profile("fast")
    with pytest.raises(MxMoEError, match="unknown profile field"):
        get_profile("quick", windows=3)


def test_smoke_profile_runs_on_random_ids_and_reuses_routing(tmp_path, monkeypatch):
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    result, path = profile_sensitivity("rtn", smoke, "w4a16_g128_asym,w8a8_g-1_sym", progress=False)
    assert "random-n2-s64-seed0" in path.name and set(result["layers"]) == {"0", "1"}
    reports = routing.profile_corpora(smoke.model, n=2, seqlen=32, allow_random=True)
    assert list(reports) == ["random"] and sum(reports["random"]["counts"][0]) == 2 * 32 * 2
    monkeypatch.setattr(routing, "routing_report", lambda *a, **k: pytest.fail("routing file not reused"))
    assert routing.profile_corpora(smoke.model, n=2, seqlen=32, allow_random=True) == reports


def test_new_weights_under_the_same_name_are_measured_again(tmp_path, monkeypatch):
    """A model rebuilt under its old name (smollm2-moe once the healed files land) gets new sensitivity, routing and
    evaluation rows: every cache is keyed by the weights' id (their sha256 outside the smollm2 builds), not the name
    alone."""
    from mxmoe.models.zoo import tiny_model
    from mxmoe.stages import evaluate
    from mxmoe.stages import sensitivity as sens_stage

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    smoke = get_profile("smoke")
    first = tiny_model(smoke.model)
    other = tiny_model(smoke.model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # [V, H] the same architecture, other weights
    for model in (first, other):
        monkeypatch.setattr(sens_stage, "load_model", lambda name, m=model: (m, None))
        monkeypatch.setattr(routing, "load_model", lambda name, m=model: (m, None))
        monkeypatch.setattr(evaluate, "load_model", lambda name, m=model: (m, None))
        evaluate._PRISTINE.clear()
        result, _ = profile_sensitivity("rtn", smoke, "w4a16_g128_asym", progress=False)
        report = routing.profile_corpora(smoke.model, n=2, seqlen=32, allow_random=True)["random"]
        row = evaluate_config(rtn_grid_config(8, 8), smoke, zeroshot=False, progress=False)
        assert (
            result["params"]["weights_id"]
            == report["params"]["weights_id"]
            == row["params"]["profile"]["weights_id"]
            == weights_sha256(model)
        )
    assert len(list((tmp_path / smoke.model / "eval" / "runs").glob("*.json"))) == 2
    evaluate._PRISTINE.clear()
