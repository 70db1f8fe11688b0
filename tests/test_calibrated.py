"""The calibrated-Δ extension: Δ rescaled per (layer, scheme) to the proxy check's whole-model damage."""

import numpy as np
import pytest

from mxmoe.allocate import LayerProblem, solve_model
from mxmoe.errors import MxMoEError
from mxmoe.schemes import Scheme
from mxmoe.stages.calibrated import NLL_FLOOR, additive_damage, calibrate

SCHEMES = ["w4a16_g128_asym", "w3a16_g-1_asym", "w2a16_g-1_asym", "w8a16_g-1_sym"]


def problem(layer: int, experts: int = 4, seed: int = 0) -> LayerProblem:
    rng = np.random.default_rng(seed)
    schemes = [Scheme.parse(s) for s in SCHEMES]
    loss = rng.uniform(1, 2, (experts, 3, 1)) * np.array([1.0, 4.0, 16.0, 0.01])  # [E, 3, S]
    return LayerProblem(
        model="m",
        layer=layer,
        experts=list(range(experts)),
        schemes=schemes,
        loss=loss,
        time=np.ones((experts, 3, len(schemes))),
        bits=np.array([s.bits_per_weight for s in schemes]),
        size=np.full(experts, 64.0),
        rows=np.full(experts, 8),
        gemms=[(8, 4, 4, 4)] * experts,
        time_source="measured",
        params={"gpu": "nvidia_h100"},
    )


def check(nll: dict) -> dict:
    pairs = {f"{l}/{s}": {"layer": l, "scheme": s, "nll_increase": v, "proxy": 1.0} for (l, s), v in nll.items()}
    params = {"schemes": SCHEMES[:3], "windows": [2, 64], "source": "test", "quantizer": "rtn"}
    return {"pairs": pairs, "params": params}


def test_each_layer_and_scheme_sums_to_its_measured_damage():
    p = problem(0)
    nll = {(0, "w4a16_g128_asym"): -0.002, (0, "w3a16_g-1_asym"): 0.05, (0, "w2a16_g-1_asym"): 0.8}
    (c,) = calibrate([p], check(nll))
    assert [str(s) for s in c.schemes] == SCHEMES[:3]  # w8 was not measured: not offered
    assert c.loss.shape == (4, 3, 3) and c.time.shape == (4, 3, 3) and list(c.bits) == list(p.bits[:3])
    np.testing.assert_allclose(c.loss.sum(axis=(0, 1)), [NLL_FLOOR, 0.05, 0.8])  # a negative increase: the floor
    # which blocks carry the damage still follows Δ
    np.testing.assert_allclose(c.loss[:, :, 2] / c.loss[:, :, 2].sum(), p.loss[:, :, 2] / p.loss[:, :, 2].sum())
    assert c.params["calibrated_by"]["quantizer"] == "rtn"


def test_bits_move_to_the_layer_the_model_feels():
    """Two layers with the same Δ; the model loses 10x more when layer 0 goes to 2 bits: one budget over both
    gives layer 0 more bits, where the paper's Δ alone splits them evenly."""
    layers = [problem(0, seed=1), problem(1, seed=1)]
    nll = {}
    for layer, w2 in ((0, 1.0), (1, 0.1)):
        nll.update(
            {(layer, "w4a16_g128_asym"): 0.001, (layer, "w3a16_g-1_asym"): w2 / 8, (layer, "w2a16_g-1_asym"): w2}
        )
    cal = calibrate(layers, check(nll))

    def layer_bits(problems):
        choices, _ = solve_model([(p.loss, p.time, p.bits, p.size) for p in problems], problems[0].bits, 3.0, 1.0)
        return [float(p.bits[c].mean()) for p, c in zip(problems, choices)]

    plain = layer_bits(layers)
    assert plain[0] == pytest.approx(plain[1], abs=0.5)
    bits = layer_bits(cal)
    assert bits[0] > bits[1] + 0.5


def test_a_layer_with_no_measured_scheme_is_refused():
    with pytest.raises(MxMoEError, match="proxy check measured none"):
        calibrate([problem(3)], check({(0, "w2a16_g-1_asym"): 0.5}))


def test_the_uniform_prediction_sums_each_layers_damage_with_the_floor():
    nll = {(0, "w2a16_g-1_asym"): 0.5, (1, "w2a16_g-1_asym"): -0.01, (0, "w3a16_g-1_asym"): 0.1}
    assert additive_damage(check(nll), "w2a16_g-1_asym") == pytest.approx(0.5 + NLL_FLOOR)
    with pytest.raises(MxMoEError, match="measured no layer with w4a16_g128_asym"):
        additive_damage(check(nll), "w4a16_g128_asym")
