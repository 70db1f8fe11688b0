"""The proxy check: whole-model NLL per layer quantized, against the layer's summed Δ."""

import json

import pytest
import torch
from tiny import fresh

from mxmoe import plan
from mxmoe.errors import MxMoEError
from mxmoe.models import moe_blocks
from mxmoe.profiles import get_profile
from mxmoe.sensitivity import compute_sensitivity, sensitivity_array
from mxmoe.stages import proxy

SCHEMES = ["w2a16_g-1_asym", "w8a16_g-1_sym"]


@pytest.fixture(scope="module")
def setup():
    model = fresh("tiny-qwen2-moe")
    windows = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))  # [n, seqlen]
    sens = compute_sensitivity(model, windows, SCHEMES, "rtn", progress=False)
    return model, windows, sens


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    """The smoke profile, its results written under ``tmp_path``."""
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    return get_profile("smoke")


def test_spearman():
    assert proxy.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert proxy.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert proxy.spearman([1, 2], [1, 2]) is None


def test_layer_swap_measures_every_layer_and_scheme(setup):
    model, windows, sens = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = proxy.layer_swap(model, windows, sens, SCHEMES)
    layers = [b.layer for b in moe_blocks(model)]
    assert sorted(out["pairs"]) == sorted(f"{ly}/{s}" for ly in layers for s in SCHEMES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model stays unquantized
    for ly in layers:
        two, eight = out["pairs"][f"{ly}/w2a16_g-1_asym"], out["pairs"][f"{ly}/w8a16_g-1_sym"]
        assert abs(two["nll_increase"]) > abs(eight["nll_increase"])  # 2-bit moves the loss more than 8-bit
        delta, _ = sensitivity_array(sens, ly)  # [E, 3, S]
        assert two["proxy"] == pytest.approx(float(delta[:, :, 0].sum()))
    assert out["base_nll"] == pytest.approx(proxy.mean_nll(model, windows))


def test_layer_swap_keeps_pairs_done(setup):
    model, windows, sens = setup
    first = proxy.layer_swap(model, windows, sens, SCHEMES[:1])
    again = proxy.layer_swap(
        model, windows, sens, SCHEMES[:1], lambda *a: pytest.fail("a pair measured before ran again"), first["pairs"]
    )
    assert again["pairs"] == first["pairs"]


def test_proxy_check_writes_and_resumes(setup, smoke, tmp_path, monkeypatch):
    model, _, sens = setup
    profile = smoke
    calls = []
    real = proxy.apply_schemes

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a run killed after its first pair
        return real(*a, **k)

    monkeypatch.setattr(proxy, "apply_schemes", counting)
    with pytest.raises(KeyboardInterrupt):
        proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES)
    path = tmp_path / profile.model / "eval" / "proxy_check.json"
    assert len(json.loads(path.read_text())["pairs"]) == 1
    monkeypatch.setattr(proxy, "apply_schemes", real)
    doc = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES)
    assert len(doc["pairs"]) == len(moe_blocks(model)) * len(SCHEMES)
    assert set(doc["agreement"]["per scheme"]) == set(SCHEMES)
    assert doc["params"]["windows"] == [plan.PROXY_WINDOWS["smoke"], profile.eval_seqlen]
    assert json.loads(path.read_text())["agreement"] == doc["agreement"]


def test_complete_proxy_check_on_another_machine_measures_nothing(setup, smoke, tmp_path, monkeypatch):
    """A finished check re-read on another machine keeps its base NLL and device: its pairs were measured there."""
    model, _, sens = setup
    first = proxy.proxy_check(smoke, model, None, sens, schemes=SCHEMES[:1])
    path = tmp_path / smoke.model / "eval" / "proxy_check.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "device": "the GPU that measured it"}))
    monkeypatch.setattr(proxy, "mean_nll", lambda *a: pytest.fail("the check measured its model again"))
    again = proxy.proxy_check(smoke, model, None, sens, schemes=SCHEMES[:1])
    assert again["base_nll"] == first["base_nll"] and again["pairs"] == first["pairs"]
    assert json.loads(path.read_text())["device"] == "the GPU that measured it"


def test_proxy_check_with_another_scheme_measures_only_its_pairs(setup, smoke, monkeypatch):
    model, _, sens = setup
    profile = smoke
    first = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES[:1])
    calls = []
    real = proxy.apply_schemes
    monkeypatch.setattr(proxy, "apply_schemes", lambda *a, **k: calls.append(1) or real(*a, **k))
    doc = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES)
    layers = len(moe_blocks(model))
    assert len(calls) == layers  # only the added scheme's pairs
    assert len(doc["pairs"]) == layers * len(SCHEMES)
    assert all(doc["pairs"][k] == v for k, v in first["pairs"].items())
    dropped = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES[1:])  # a scheme no longer asked for
    assert len(calls) == layers and {r["scheme"] for r in dropped["pairs"].values()} == {SCHEMES[1]}


def test_proxy_check_with_gptq_quantizes_as_table1(setup, smoke, tmp_path, monkeypatch):
    """The GPTQ check quantizes each layer with Table 1's MxMoE recipe, into its own file beside the RTN one."""
    model, _, sens = setup
    profile = smoke
    recipes = []
    real = proxy.quantize

    def recording(m, config, calib, scheme_map, **k):
        recipes.append((config, calib.shape, {key[0] for key in scheme_map}))
        return real(m, config, calib, scheme_map, **k)

    monkeypatch.setattr(proxy, "quantize", recording)
    rtn = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES[:1])
    gptq = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES[:1], quantizer="gptq", seed=3)
    layers = [b.layer for b in moe_blocks(model)]
    assert [layer for *_, (layer,) in recipes] == layers  # one GPTQ per pair, of that layer's blocks only
    config, shape, _ = recipes[0]
    assert (config.method, config.hadamard, config.seed) == ("gptq", True, 3)
    assert list(shape) == [profile.calib_windows, profile.calib_seqlen]
    assert gptq["params"]["quantizer"] == "gptq" and gptq["params"]["recipe"]["seed"] == 3
    assert (tmp_path / profile.model / "eval" / "proxy_check_gptq.json").exists()
    assert rtn["params"]["quantizer"] == "rtn" and "recipe" not in rtn["params"]
    assert gptq["base_nll"] == pytest.approx(rtn["base_nll"])
    assert gptq["pairs"] != rtn["pairs"]
    with pytest.raises(MxMoEError, match="quantizer must be one of"):
        proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES[:1], quantizer="awq")


def test_another_sensitivity_keeps_the_measured_pairs_and_recomputes_their_proxy(setup, smoke, monkeypatch):
    """The NLL of a quantized layer does not depend on Δ: a check against another sensitivity result re-reads it."""
    model, windows, sens = setup
    profile = smoke
    first = proxy.proxy_check(profile, model, None, sens, schemes=SCHEMES)
    other = compute_sensitivity(model, windows, SCHEMES, "gptq", progress=False)
    monkeypatch.setattr(proxy, "apply_schemes", lambda *a, **k: pytest.fail("a measured pair ran again"))
    again = proxy.proxy_check(profile, model, None, other, schemes=SCHEMES)
    assert again["params"]["sensitivity"] == other.get("params")
    for key, row in again["pairs"].items():
        assert row["nll_increase"] == first["pairs"][key]["nll_increase"]
        assert row["proxy"] == pytest.approx(proxy.layer_proxy(other, row["layer"], row["scheme"]))
    assert any(again["pairs"][k]["proxy"] != first["pairs"][k]["proxy"] for k in again["pairs"])


def test_scheme_prices_compare_exchange_rates_on_layers_measured_with_every_scheme():
    from mxmoe.plots.accuracy import proxy_scale_table

    def pair(layer, scheme, nll, delta):
        return {"layer": layer, "scheme": scheme, "nll_increase": nll, "proxy": delta}

    pairs = [pair(0, "a", 1.0, 10.0), pair(0, "b", 3.0, 12.0), pair(1, "a", 1.0, 10.0), pair(1, "b", 1.0, 8.0)]
    pairs.append(pair(2, "a", 50.0, 1.0))  # layer 2 has no pair of b: left out of both sums
    pairs = {f"{p['layer']}/{p['scheme']}": p for p in pairs}
    prices = proxy.scheme_prices(pairs, "a")
    assert prices["layers"] == 2 and prices["schemes"]["a"] == {"damage": 1.0, "delta": 1.0}
    assert prices["schemes"]["b"] == pytest.approx({"damage": 2.0, "delta": 1.0})  # Δ says equal, the model 2x
    t = proxy_scale_table({"pairs": pairs}, "a")
    assert t.index.name == "2 layers" and t.loc["b"].tolist() == pytest.approx([2.0, 1.0, 2.0])
    with pytest.raises(MxMoEError, match="no pairs of c"):
        proxy.scheme_prices(pairs, "c")
