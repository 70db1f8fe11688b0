"""Allocation ILP: optimality against brute force, the front, bad inputs, and the alloc file round trip."""

import itertools
import json

import numpy as np
import pytest

from mxmoe.allocate import (
    InfeasibleBudget,
    allocation_doc,
    block_groups,
    layer_problem,
    objective,
    pareto_front,
    scheme_map,
    solve_layer,
    solve_model,
    solve_point,
)
from mxmoe.perfmodel import load_table
from mxmoe.stages.allocation import load_allocation, write_allocation


def _instance(seed, experts=3, schemes=3):
    rng = np.random.default_rng(seed)
    bits = np.array([8.0, 4.25, 2.25, 4.0, 16.0][:schemes])  # [S]
    loss = rng.uniform(0.0, 1.0, (experts, 3, schemes)) * 2.0 ** (-bits)[None, None] * 100  # [E, 3, S]
    time_ = rng.uniform(0.5, 1.5, (experts, 3, schemes)) * (0.2 + bits / 8)[None, None]  # [E, 3, S]
    size = rng.integers(1, 4, experts).astype(float)  # [E]
    return loss, time_, bits, size


def _brute(loss, time_, bits, size, budget, r, tie, granularity):
    """Best objective over every assignment (ties: T then L), by enumeration."""
    e, _, s = loss.shape
    groups = block_groups(tie, granularity)
    best = None
    for picks in itertools.product(range(s), repeat=e * len(groups)):
        c = np.zeros((e, 3), dtype=int)
        for i in range(e):
            for g, blocks in enumerate(groups):
                c[i, blocks] = picks[i * len(groups) + g]
        if (size[:, None] * bits[c]).sum() > budget * 3 * size.sum() + 1e-9:
            continue
        at = (np.arange(e)[:, None], np.arange(3)[None], c)
        L, T = loss[at].sum(), time_[at].sum()
        key = (objective(L, T, r), T, L)
        if best is None or key < best[0]:
            best = (key, c)
    return best


@pytest.mark.parametrize(
    "seed,r,tie,granularity",
    [
        (0, 1.0, True, "block"),
        (1, 0.0, True, "block"),
        (2, 0.5, True, "block"),
        (3, 0.75, False, "block"),
        (4, 0.25, False, "block"),
        (5, 0.75, True, "expert"),
        (6, 0.5, True, "expert"),
    ],
)
def test_solve_layer_matches_brute_force(seed, r, tie, granularity):
    loss, time_, bits, size = _instance(seed, experts=3 if granularity == "block" and tie else 2)
    if granularity == "expert":
        loss, time_, bits, size = _instance(seed, experts=4)
    budget = 5.0
    (key, _) = _brute(loss, time_, bits, size, budget, r, tie, granularity)
    p = solve_point(loss, time_, bits, size, budget, r, tie_gate_up=tie, granularity=granularity)
    assert objective(p.L, p.T, r) == pytest.approx(key[0], rel=1e-7, abs=1e-9)
    c = solve_layer(loss, time_, bits, size, budget, r, tie_gate_up=tie, granularity=granularity)
    assert c.shape == (len(size), 3)
    assert (size[:, None] * bits[c]).sum() <= budget * 3 * size.sum() + 1e-6
    if tie:
        assert (c[:, 0] == c[:, 1]).all()
    if granularity == "expert":
        assert (c == c[:, :1]).all()


def test_one_front_serves_every_r_and_epsilon_front_agrees():
    loss, time_, bits, size = _instance(7)
    fronts = [pareto_front(loss, time_, bits, size, 5.0, method=m) for m in ("supported",)]
    full = pareto_front(loss, time_, bits, size, 5.0, method="epsilon")
    every = {(round(p.L, 9), round(p.T, 9)) for p in full.points}
    assert all({(round(p.L, 9), round(p.T, 9)) for p in f.points} <= every for f in fronts)
    Ls, Ts = [p.L for p in full.points], [p.T for p in full.points]
    assert Ls == sorted(Ls) and Ts == sorted(Ts, reverse=True)  # a Pareto front
    for r in (0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0):
        key, _ = _brute(loss, time_, bits, size, 5.0, r, True, "block")
        for f in (*fronts, full):
            assert objective(f.pick(r).L, f.pick(r).T, r) == pytest.approx(key[0], rel=1e-7, abs=1e-9)


def test_global_budget_moves_bits_between_layers():
    a, b = _instance(8), _instance(9)
    b = (b[0] * 50, *b[1:])  # layer b far more sensitive: a global budget gives it more bits
    choices, p = solve_model([a, b], a[2], 5.0, 1.0)
    per_layer = [solve_point(*x, 5.0, 1.0) for x in (a, b)]
    assert p.L <= sum(q.L for q in per_layer) + 1e-9
    assert [c.shape for c in choices] == [(3, 3), (3, 3)]


@pytest.mark.parametrize("seed,r", [(10, 0.75), (11, 0.5), (12, 0.25), (13, 0.0), (14, 1.0)])
def test_solves_with_a_gap_stay_within_it(seed, r):
    """A relative optimality gap per solve (as for one budget over a model) keeps the answer within that gap."""
    gap = 0.02
    loss, time_, bits, size = _instance(seed, experts=4)
    key, _ = _brute(loss, time_, bits, size, 5.0, r, True, "block")
    p = solve_point(loss, time_, bits, size, 5.0, r, gap_rel=gap)
    assert key[0] - 1e-9 <= objective(p.L, p.T, r) <= key[0] - np.log1p(-gap) + 1e-9  # L^r T^(1-r) ≤ opt / (1-gap)
    assert (size[:, None] * bits[p.choice]).sum() <= 5.0 * 3 * size.sum() + 1e-6


def test_infeasible_budget_names_smallest():
    loss, time_, bits, size = _instance(0)
    with pytest.raises(InfeasibleBudget, match="smallest achievable budget .* is 2.25") as err:
        solve_layer(loss, time_, bits, size, 2.0, 1.0)
    assert err.value.smallest == pytest.approx(2.25)
    assert isinstance(err.value, ValueError)
    assert (solve_layer(loss, time_, bits, size, 2.25, 1.0) == 2).all()  # exactly the smallest is feasible


@pytest.mark.parametrize("which,value", [("loss", np.nan), ("time", -1.0), ("loss", np.inf)])
def test_bad_inputs_name_the_block(which, value):
    loss, time_, bits, size = _instance(0)
    (loss if which == "loss" else time_)[1, 2, 0] = value
    with pytest.raises(ValueError, match=f"{which} of layer 5 expert 1, block down, scheme index 0"):
        solve_layer(loss, time_, bits, size, 5.0, 0.5, labels=[f"layer 5 expert {i}" for i in range(3)])


def test_bad_r_and_granularity():
    loss, time_, bits, size = _instance(0)
    with pytest.raises(ValueError, match="r must be in"):
        solve_layer(loss, time_, bits, size, 5.0, 1.5)
    with pytest.raises(ValueError, match="granularity must be"):
        solve_layer(loss, time_, bits, size, 5.0, 0.5, granularity="layer")


def _tiny_problem(tmp_path, monkeypatch):
    """A layer problem of the tiny Qwen2-MoE from fake sensitivity and routing (no files from other stages)."""
    from tiny import fresh

    from mxmoe.allocate import model_dims
    from mxmoe.models.blocks import moe_blocks
    from mxmoe.schemes import scheme_set

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    model = fresh()
    blocks = moe_blocks(model)
    schemes = [str(s) for s in scheme_set("w5a5")]
    rng = np.random.default_rng(0)
    b0 = blocks[0]
    experts = list(range(b0.num_experts)) + ["shared0"]
    sens = {
        "schemes": schemes,
        "params": {"fake": True},
        "layers": {
            str(b.layer): {"experts": experts, "delta": rng.uniform(0, 1, (len(experts), 3, 3)).tolist()}
            for b in blocks
        },
    }
    counts = rng.integers(1, 50, (len(blocks), b0.num_experts))
    rout = {"layers": [b.layer for b in blocks], "top_k": b0.top_k, "counts": counts.tolist(), "params": {"fake": True}}
    table = load_table("nvidia_h100")
    problems = [layer_problem(sens, rout, model_dims(model), b.layer, table, "w5a5", 64, model="tiny") for b in blocks]
    return model, problems


def test_alloc_file_round_trip_applies_to_tiny_model(tmp_path, monkeypatch):
    from mxmoe.quant.apply import apply_schemes

    model, problems = _tiny_problem(tmp_path, monkeypatch)
    p = problems[0]
    assert p.loss.shape == (9, 3, 3) and p.time.shape == (9, 3, 3) and (p.time > 0).all()
    assert p.size[-1] == 2 * p.size[0]  # the shared expert is twice as wide
    choices = [solve_layer(q.loss, q.time, q.bits, q.size, 5.0, 0.75, labels=q.labels) for q in problems]
    doc = allocation_doc(problems, choices, "test-w5a5", 0.75, 5.0, profile="test")
    path = write_allocation(doc)
    assert path == tmp_path / "tiny" / "alloc" / "test-w5a5.json"
    saved = json.loads(path.read_text())
    assert saved["predicted"]["bits"] <= 5.0 + 1e-9 and saved["r"] == 0.75 and saved["batch_tokens"] == 64
    loaded = load_allocation("tiny", "test-w5a5")
    assert loaded == scheme_map(problems, choices)
    assert ((problems[0].layer, "shared0", "down") in loaded) and len(loaded) == 2 * 9 * 3
    report = apply_schemes(model, loaded)
    assert sum(report.blocks_per_scheme.values()) == len(loaded)
    from mxmoe.plots.allocation import allocation_map

    _, table7 = allocation_map(saved, problems[0].layer)
    assert list(table7) == [str(e) for e in problems[0].experts] and all(len(v) == 3 for v in table7.values())


def test_missing_schemes_in_sensitivity(tmp_path, monkeypatch):
    from mxmoe.errors import MxMoEError

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    sens = {"schemes": ["w8a8_g-1_sym"], "layers": {}}
    with pytest.raises(MxMoEError, match="have no sensitivity"):
        layer_problem(sens, {"layers": [0]}, {}, 0, load_table("nvidia_h100"), "w5a5", 64, model="tiny")


def test_tie_break_cut_short_keeps_the_first_criterion_optimal(monkeypatch):
    """With the tie-break stage stopped at once (node limit 1), r = 1 still returns a least-L allocation."""
    from mxmoe import allocate

    rng = np.random.default_rng(0)
    bits = np.array([8.0, 4.25, 2.25, 4.0, 16.0])  # [S]
    loss = np.broadcast_to(np.round(100 * 2.0**-bits), (12, 3, 5)).copy()  # every expert alike: many L ties
    time_ = rng.uniform(0.5, 1.5, (12, 3, 5)) * (0.2 + bits / 8)  # [E, 3, S]
    size = rng.integers(1, 4, 12).astype(float)  # [E]
    exact = solve_point(loss, time_, bits, size, 4.0, 1.0)
    models = []
    monkeypatch.setattr(allocate, "TIE_BREAK_NODES", 1)
    monkeypatch.setattr(
        allocate._ILP, "_build", lambda self, build=allocate._ILP._build: (models.append(self), build(self))[1]
    )
    cut = solve_point(loss, time_, bits, size, 4.0, 1.0)
    assert models[0].unproven == 1  # the node limit was hit ...
    assert cut.L == pytest.approx(exact.L, rel=1e-9)  # ... and the allocation is still least-loss
    assert cut.T >= exact.T - 1e-12  # never better than the proven tie-break
