"""Scheme allocation (paper §4.3): one quantization scheme per linear block, by integer programs.

For one MoE layer with E experts (routed, then shared), blocks j = gate, up, down and S schemes:

    minimise  L^r · T^(1-r),   L = Σ loss[e, j, c[e, j]],   T = Σ time[e, j, c[e, j]]
    s.t.      Σ_e size[e] · Σ_j bits[c[e, j]]  ≤  budget_bits · 3 · Σ_e size[e]

``size[e]`` is the parameter count of one block of expert e (shared experts are larger), so the
budget is the parameter-weighted mean bits per weight, with the paper's accounting
(``Scheme.bits_per_weight``). Gate and up are tied by default (they run as one GEMM); the
``"expert"`` granularity ties all three blocks of an expert.

Exact solution without non-linear constraints: every choice is a point (L, T) and
f = r·log L + (1-r)·log T is concave, so its minimum over the finite set of points is attained at a
vertex of their convex hull, and (f increasing in L and T) at a *supported* Pareto point — one that
minimises a positive weighted sum w_L·L + w_T·T. Those points are found exactly with CBC (PuLP) by
the dichotomic search of Aneja & Nair between the two lexicographic end points (min L then T; min
T then L). ``pareto_front`` returns them, and ``Front.pick(r)`` serves every r from one front;
``pareto_front(..., method="epsilon")`` traces the complete front (supported or not) with
ε-constraint programs (min L s.t. T ≤ τ, tightening τ), slower, for checks and plots.
``solve_layer`` for a single r prunes the search: a segment whose best corner cannot beat the best
point so far is not explored.

One limit on exactness: the second stage of a lexicographic end point (least T among the least-L
allocations, or the reverse) can make CBC's branch and bound explode when many allocations tie
within its tolerances (seen on smollm2-moe's full-profile sensitivity: no proof after minutes). That
stage is warm-started from the first stage's optimum and stops after ``TIE_BREAK_NODES`` nodes; the end
point is then still optimal in its first criterion, and its tie-break is the best CBC found
(``_ILP.unproven`` counts such solves; ``Front.unproven`` reports them).

A second limit, for one budget over a whole model (``solve_model``): hundreds of experts with the same
routed rows have the same time per scheme, so CBC finds the optimum at once but cannot close the last
0.05% of its bound by branching (seen on a 30-layer model: minutes per solve at gap 0, a second at
``MODEL_GAP_REL``). Those solves stop within ``MODEL_GAP_REL`` of the optimum; each cut w_L·L + w_T·T ≥ v
then uses v scaled by (1 - gap), which stays a valid bound, so the search is still sound and its answer is
within that gap of the optimum. Per-layer solves keep gap 0.

``layer_problem`` builds the inputs of one layer from a sensitivity result, a routing profile and a
cost table; ``scheme_map`` turns the choices into the map ``mxmoe.quant.apply.apply_schemes`` takes
and ``allocation_doc`` into the JSON document that ``mxmoe.stages.allocation`` stores.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from mxmoe.errors import MxMoEError
from mxmoe.models.blocks import moe_blocks
from mxmoe.perfmodel import SOURCES, block_time, launch_time, load_table
from mxmoe.quant.apply import scheme_map_to_rows
from mxmoe.routing import batch_workload
from mxmoe.schemes import Scheme, scheme_set
from mxmoe.sensitivity import sensitivity_array

TIE_BREAK_NODES = 500  # branch-and-bound nodes for the second stage of a lexicographic minimum (module doc):
# a node limit, unlike a time limit, gives the same allocation on every machine
MODEL_GAP_REL = 1e-3  # relative optimality gap of the solves of one budget over a whole model (module doc)
BLOCK_NAMES = ("gate", "up", "down")
GRANULARITIES = ("block", "expert")
FRONT_METHODS = ("supported", "epsilon")
log = logging.getLogger(__name__)


class InfeasibleBudget(ValueError):
    """No allocation meets the bit budget; ``smallest`` is the smallest achievable budget (bits per weight)."""

    def __init__(self, budget: float, smallest: float):
        self.budget, self.smallest = budget, smallest
        super().__init__(
            f"bit budget {budget:g} bits/weight is infeasible: the smallest achievable budget with "
            f"these schemes is {smallest:g} bits/weight (every block at its fewest bits); "
            f"raise the budget to at least {smallest:g} or add lower-bit schemes"
        )


@dataclass
class Point:
    """One allocation: loss L, time T, mean bits per weight, and the scheme index per block [E, 3]."""

    L: float
    T: float
    bits: float
    choice: np.ndarray


@dataclass
class Front:
    """Pareto points (L ascending, T descending) of one problem, and how long finding them took."""

    points: list
    method: str
    seconds: float
    solves: int
    unproven: int = 0  # lexicographic tie-breaks that ended on their node limit (module doc)

    def pick(self, r: float) -> Point:
        """The point minimising r·log L + (1-r)·log T (ties: smaller T, then smaller L)."""
        _check_r(r)
        return min(self.points, key=lambda p: (objective(p.L, p.T, r), p.T, p.L))


def objective(L: float, T: float, r: float) -> float:
    """r·log L + (1-r)·log T, the log of the paper's L^r·T^(1-r); a zero-weight term is dropped."""
    with np.errstate(divide="ignore"):
        return (r * np.log(L) if r > 0 else 0.0) + ((1 - r) * np.log(T) if r < 1 else 0.0)


def _check_r(r: float) -> None:
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1] (1: accuracy only, 0: speed only), got {r}")


def check_inputs(loss, time_, bits, size, labels=None) -> tuple:
    """Validated float arrays (loss [E,3,S], time [E,3,S], bits [S], size [E]).

    ``labels``: E names of the experts (e.g. (layer, expert)) used in error messages. Raises
    ValueError naming the block and scheme index of a NaN, infinite or negative loss or time.
    """
    loss, time_ = np.asarray(loss, dtype=float), np.asarray(time_, dtype=float)
    bits, size = np.asarray(bits, dtype=float), np.asarray(size, dtype=float)
    if loss.ndim != 3 or loss.shape[1] != 3 or time_.shape != loss.shape:
        raise ValueError(f"loss and time must both be [experts, 3, schemes], got {loss.shape} and {time_.shape}")
    e, _, s = loss.shape
    if bits.shape != (s,) or size.shape != (e,):
        raise ValueError(f"bits must be [{s}] and size [{e}] for loss {loss.shape}, got {bits.shape} and {size.shape}")
    labels = list(labels) if labels is not None else [f"expert {i}" for i in range(e)]
    for name, arr in (("loss", loss), ("time", time_)):
        bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
        if len(bad):
            i, j, k = bad[0]
            raise ValueError(
                f"{name} of {labels[i]}, block {BLOCK_NAMES[j]}, scheme index {k} is {arr[i, j, k]}: "
                f"losses and times must be finite and >= 0 ({len(bad)} bad entries); "
                "check the sensitivity / cost inputs of that block"
            )
    if not np.all(np.isfinite(bits)) or np.any(bits <= 0) or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError(f"bits per weight and expert sizes must be finite and > 0, got bits {bits}, size {size}")
    return loss, time_, bits, size


def block_groups(tie_gate_up: bool = True, granularity: str = "block") -> list:
    """Blocks of one expert that share a scheme: [[0, 1], [2]] (tied gate/up), [[0], [1], [2]], or [[0, 1, 2]]."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "expert":
        return [[0, 1, 2]]
    return [[0, 1], [2]] if tie_gate_up else [[0], [1], [2]]


class _ILP:
    """One PuLP/CBC model: binaries x[e, g, s] (group g of expert e takes scheme s), one scheme per group,
    the budget, and caps on (normalised) L and T; objective and caps change between solves.
    Solves stop within ``gap_rel`` (relative) of the optimum."""

    def __init__(self, loss, time_, bits, size, budget_bits, groups, gap_rel: float = 0.0):
        e, _, s = loss.shape
        self.shape, self.groups, self.budget, self.gap_rel = (e, s), groups, budget_bits, gap_rel
        w = size / (3.0 * size.sum())  # [E] share of the layer's weights held by one block
        gl = np.stack([loss[:, g, :].sum(1) for g in groups], 1)  # [E, G, S]
        gt = np.stack([time_[:, g, :].sum(1) for g in groups], 1)  # [E, G, S]
        gb = np.stack([np.outer(w * len(g), bits) for g in groups], 1)  # [E, G, S] bits contribution
        smallest = float(gb.min(2).sum())
        if smallest > budget_bits * (1 + 1e-9) + 1e-12:
            raise InfeasibleBudget(budget_bits, round(smallest, 6))
        self.l_scale, self.t_scale = max(gl.max(2).sum(), 1e-30), max(gt.max(2).sum(), 1e-30)
        self.gl, self.gt, self.gb = gl / self.l_scale, gt / self.t_scale, gb
        self.solves = 0
        self.unproven = 0  # tie-break solves that ended on their node limit
        self._build()

    def _build(self) -> None:
        """The PuLP model: binaries, one scheme per group, the budget, and the (inactive) caps."""
        e, s = self.shape
        ng = len(self.groups)
        self.prob = pulp.LpProblem("mxmoe_alloc", pulp.LpMinimize)
        self.x = [
            [[self.prob.add_variable(f"x_{i}_{g}_{k}", 0, 1, cat="Binary") for k in range(s)] for g in range(ng)]
            for i in range(e)
        ]
        with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for 4.0; 3.3.2 is pinned
            warnings.simplefilter("ignore", DeprecationWarning)
            self.cmd = pulp.PULP_CBC_CMD(msg=False, gapRel=self.gap_rel, gapAbs=0.0)
            self.tie_cmd = pulp.PULP_CBC_CMD(
                msg=False, gapRel=self.gap_rel, gapAbs=0.0, maxNodes=TIE_BREAK_NODES, warmStart=True
            )
        flat = [(i, g, k) for i in range(e) for g in range(ng) for k in range(s)]
        for i in range(e):
            for g in range(ng):
                self.prob += pulp.lpSum(self.x[i][g]) == 1, f"one_{i}_{g}"
        self.L = pulp.lpSum(self.gl[i, g, k] * self.x[i][g][k] for i, g, k in flat)
        self.T = pulp.lpSum(self.gt[i, g, k] * self.x[i][g][k] for i, g, k in flat)
        self.prob += pulp.lpSum(self.gb[i, g, k] * self.x[i][g][k] for i, g, k in flat) <= self.budget + 1e-9, "budget"
        self.prob += self.L <= 2.0, "capL"  # normalised L and T are <= 1: caps start inactive
        self.prob += self.T <= 2.0, "capT"

    def _pick(self, wl, wt, cap_l, cap_t, tie_break: bool = False) -> "np.ndarray | None":
        """Scheme index per group [E, G] of an optimal solution, or None when infeasible.

        ``tie_break``: a node-limited solve warm-started from the last solution, which may end with
        the best solution found instead of a proven optimum (counted in ``unproven``)."""
        self.prob.get_constraint_by_name("capL").constant = -cap_l
        self.prob.get_constraint_by_name("capT").constant = -cap_t
        self.prob.setObjective(wl * self.L + wt * self.T)
        status = pulp.LpStatus[self.prob.solve(self.tie_cmd if tie_break else self.cmd)]
        if status == "Infeasible":
            return None
        if tie_break and self.prob.sol_status == pulp.LpSolutionIntegerFeasible:
            self.unproven += 1
        elif status != "Optimal" or self.prob.sol_status != pulp.LpSolutionOptimal:
            raise RuntimeError(f"CBC ended with status {status} on an allocation problem")
        return np.array(
            [
                [[self.x[i][g][k].varValue or 0.0 for k in range(self.shape[1])] for g in range(len(self.groups))]
                for i in range(self.shape[0])
            ]
        ).argmax(2)  # [E, G]

    def solve(
        self, wl: float, wt: float, cap_l: float = 2.0, cap_t: float = 2.0, tie_break: bool = False
    ) -> "Point | None":
        """Minimise wl·L + wt·T (normalised) with L ≤ cap_l, T ≤ cap_t; None when infeasible."""
        pick = self._pick(wl, wt, cap_l, cap_t, tie_break)
        self.solves += 1
        if pick is None:
            return None
        e, _ = self.shape
        choice = np.zeros((e, 3), dtype=int)
        for g, blocks in enumerate(self.groups):
            choice[:, blocks] = pick[:, [g]]
        at = (np.arange(e)[:, None], np.arange(len(self.groups))[None], pick)
        return Point(float(self.gl[at].sum()), float(self.gt[at].sum()), float(self.gb[at].sum()), choice)

    def lexmin(self, first: str) -> Point:
        """Lexicographic minimum: min L then min T s.t. L stays minimal ('L'), or the reverse ('T')."""
        if first == "L":
            p = self.solve(1.0, 0.0)
            q = self.solve(0.0, 1.0, cap_l=p.L + 1e-9, tie_break=True)
            return q if q is not None and q.T <= p.T else p
        p = self.solve(0.0, 1.0)
        q = self.solve(1.0, 0.0, cap_t=p.T + 1e-9, tie_break=True)
        return q if q is not None and q.L <= p.L else p

    def floor(self, value: float) -> float:
        """A valid lower bound of a (positive) optimum from the value a solve returned: that value less the gap."""
        return value * (1.0 - self.gap_rel)

    def real(self, p: Point) -> Point:
        """A point with L and T back in the caller's units (the model works on normalised ones)."""
        return Point(p.L * self.l_scale, p.T * self.t_scale, p.bits, p.choice)


def _weighted(m: _ILP, a: Point, b: Point, cuts: list) -> "Point | None":
    """A supported point strictly below segment a-b (a: lower L), or None when a and b are adjacent on the hull.

    The solve's optimum w_L·L + w_T·T ≥ v holds for every feasible point: it is appended to ``cuts``.
    """
    wl, wt = a.T - b.T, b.L - a.L
    if wl <= 0 or wt <= 0:
        return None
    norm = max(wl, wt)
    wl, wt = wl / norm, wt / norm
    c = m.solve(wl, wt)
    cuts.append((wl, wt, m.floor(wl * c.L + wt * c.T)))
    if wl * c.L + wt * c.T >= wl * a.L + wt * a.T - 1e-9 * (abs(wl * a.L) + abs(wt * a.T)):
        return None
    return c


def _bound(cuts: list, lo: float, hi: float, t_min: float, r: float) -> float:
    """Lower bound of the objective over points with L in [lo, hi], T ≥ t_min and every cut w_L·L + w_T·T ≥ v.

    That region's lower-left boundary T_env(L) is piecewise linear and f is concave along each piece,
    so the minimum is at a breakpoint: the ends or where two cut lines (or a cut and T = t_min) cross.
    """
    w = np.array([c for c in cuts if c[0] > 0 and c[1] > 0] or [(0.0, 1.0, t_min)])  # [C, 3]
    w = np.vstack([w, [0.0, 1.0, t_min]])  # T >= t_min as one more line
    a, b, v = w[:, 0], w[:, 1], w[:, 2]  # line k: T = (v_k - a_k L) / b_k
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (v[:, None] * b[None] - v[None] * b[:, None]) / (a[:, None] * b[None] - a[None] * b[:, None])  # [C, C]
    cand = np.concatenate([[lo, hi], cross[np.isfinite(cross) & (cross > lo) & (cross < hi)]])  # [n]
    env = ((v[None] - a[None] * cand[:, None]) / b[None]).max(1)  # [n] lowest T allowed at each L
    return min(objective(L, T, r) for L, T in zip(cand, np.maximum(env, 1e-300)))


class _Search:
    """A search on one model: the supported points found so far and the valid cuts w_L·L + w_T·T ≥ v learnt."""

    def __init__(self, m: _ILP):
        self.m = m
        a, b = m.lexmin("L"), m.lexmin("T")
        self.found = [a] if b.L <= a.L + 1e-12 else [a, b]
        self.cuts = [(1.0, 0.0, m.floor(a.L)), (0.0, 1.0, m.floor(b.T))]  # L >= L_min and T >= T_min everywhere

    def best(self, r: float) -> Point:
        """The optimum for r, exactly: descent for an incumbent, then every segment that could beat it is split."""
        best = min(self.found, key=lambda p: objective(p.L, p.T, r))
        if 0.0 < r < 1.0:
            best = _descend(self.m, best, r, self.found, self.cuts)
        self.split(r, best)
        return min(self.found, key=lambda p: (objective(p.L, p.T, r), p.T, p.L))

    def split(self, r: "float | None", best: "Point | None" = None) -> None:
        """Dichotomic search (Aneja & Nair) between found points; with r, skip segments that cannot beat ``best``."""
        pts = sorted(self.found, key=lambda p: p.L)
        stack = list(zip(pts, pts[1:]))
        while stack:
            p, q = stack.pop()
            if r is not None and _bound(self.cuts, p.L, q.L, q.T, r) >= objective(best.L, best.T, r) - 1e-12:
                continue
            c = _weighted(self.m, p, q, self.cuts)
            if c is None:
                continue
            self.found.append(c)
            if r is not None and objective(c.L, c.T, r) < objective(best.L, best.T, r):
                best = c
            stack += [(p, c), (c, q)]


def _descend(m: _ILP, p: Point, r: float, found: list, cuts: list) -> Point:
    """Incumbent by descent: minimise the objective's linearisation at p until it stops improving.

    f is concave, so a point with a smaller linearisation has a smaller f; each step is a supported point
    and its optimum is a valid cut.
    """
    while p.L > 0 and p.T > 0:
        wl, wt = r / p.L, (1 - r) / p.T
        norm = max(wl, wt)
        wl, wt = wl / norm, wt / norm
        c = m.solve(wl, wt)
        cuts.append((wl, wt, m.floor(wl * c.L + wt * c.T)))
        if objective(c.L, c.T, r) >= objective(p.L, p.T, r) - 1e-12:
            break
        found.append(c)
        p = c
    return p


def _epsilon(m: _ILP, max_points: "int | None", step: float = 1e-6) -> list:
    """The complete Pareto front: min L s.t. T ≤ τ, then min T at that L, τ just below the last T.

    ``step`` (a fraction of the largest possible T) is the front's resolution: above CBC's feasibility
    tolerance, so a point is never found twice.
    """
    p = m.lexmin("L")
    out = [p]
    while max_points is None or len(out) < max_points:
        tau = p.T - step
        q = m.solve(1.0, 0.0, cap_t=tau)
        if q is None:
            break
        p = m.solve(0.0, 1.0, cap_l=q.L + 1e-9, cap_t=tau, tie_break=True) or q
        out.append(p)
    return out


def pareto_front(
    loss,
    time_,
    bits,
    size,
    budget_bits: float,
    tie_gate_up: bool = True,
    granularity: str = "block",
    method: str = "supported",
    labels=None,
    max_points: "int | None" = None,
) -> Front:
    """The (L, T) Pareto front under the budget; ``Front.pick(r)`` gives the optimum for any r.

    ``method="supported"``: every supported point (exact for every r, see module doc);
    ``"epsilon"``: every Pareto point by ε-constraint programs (at most ``max_points``).
    """
    if method not in FRONT_METHODS:
        raise ValueError(f"method must be one of {FRONT_METHODS}, got {method!r}")
    loss, time_, bits, size = check_inputs(loss, time_, bits, size, labels)
    start = time.perf_counter()
    m = _ILP(loss, time_, bits, size, budget_bits, block_groups(tie_gate_up, granularity))
    if method == "epsilon":
        pts = _epsilon(m, max_points)
    else:
        search = _Search(m)
        search.split(None)
        pts = sorted(search.found, key=lambda p: (p.L, p.T))
    seconds = time.perf_counter() - start
    log.info("pareto front (%s): %d points, %d CBC solves, %.2f s", method, len(pts), m.solves, seconds)
    return Front([m.real(p) for p in pts], method, seconds, m.solves, m.unproven)


def solve_layer(
    loss,
    time_,
    bits,
    size,
    budget_bits: float,
    r: float,
    tie_gate_up: bool = True,
    granularity: str = "block",
    labels=None,
) -> np.ndarray:
    """Scheme index per block, int array [E, 3] (0 gate, 1 up, 2 down), minimising L^r·T^(1-r) under the budget.

    See the module doc for the problem and why the answer is exact. r = 1: least loss (ties: least
    time); r = 0: least time (ties: least loss). Raises InfeasibleBudget, or ValueError for bad inputs.
    """
    return solve_point(loss, time_, bits, size, budget_bits, r, tie_gate_up, granularity, labels).choice


def solve_point(
    loss,
    time_,
    bits,
    size,
    budget_bits: float,
    r: float,
    tie_gate_up: bool = True,
    granularity: str = "block",
    labels=None,
    gap_rel: float = 0.0,
) -> Point:
    """``solve_layer`` returning the whole optimal Point (L, T, bits, choice); ``gap_rel`` > 0: within that
    relative gap of the optimum (module doc)."""
    _check_r(r)
    loss, time_, bits, size = check_inputs(loss, time_, bits, size, labels)
    start = time.perf_counter()
    m = _ILP(loss, time_, bits, size, budget_bits, block_groups(tie_gate_up, granularity), gap_rel)
    if r in (0.0, 1.0):  # one lexicographic end point of the front
        best = m.lexmin("L" if r == 1.0 else "T")
    else:
        best = _Search(m).best(r)
    log.info(
        "solve r=%g: %d CBC solves (%d tie-breaks unproven), %.2f s",
        r,
        m.solves,
        m.unproven,
        time.perf_counter() - start,
    )
    return m.real(best)


def stack_layers(problems: list) -> tuple:
    """Concatenate per-layer (loss, time, size) along experts for one global budget; returns arrays and splits."""
    loss = np.concatenate([p[0] for p in problems])  # [sum E, 3, S]
    time_ = np.concatenate([p[1] for p in problems])  # [sum E, 3, S]
    size = np.concatenate([p[3] for p in problems])  # [sum E]
    splits = np.cumsum([len(p[3]) for p in problems])[:-1]
    return loss, time_, size, splits


def solve_model(
    problems: list,
    bits,
    budget_bits: float,
    r: float,
    tie_gate_up: bool = True,
    granularity: str = "block",
    labels=None,
) -> tuple:
    """One global budget over several layers: ``problems`` = [(loss, time, bits, size), ...] with the same schemes.

    The size-weighted budget then holds for the whole model, so bits can move between layers.
    Returns (list of [E_l, 3] choices, the Point over all layers), optimal within ``MODEL_GAP_REL`` (module doc).
    """
    loss, time_, size, splits = stack_layers(problems)
    p = solve_point(loss, time_, bits, size, budget_bits, r, tie_gate_up, granularity, labels, MODEL_GAP_REL)
    return np.split(p.choice, splits), p


# ---- one layer's inputs, and the allocation document --------------------------------------------


@dataclass
class LayerProblem:
    """The allocation inputs of one MoE layer: experts routed then shared, arrays as ``solve_layer`` takes them."""

    model: str
    layer: int
    experts: list  # expert ids: 0..E-1 then "shared0", ...
    schemes: list  # Scheme per index s
    loss: np.ndarray  # [E, 3, S] sensitivity Δ
    time: np.ndarray  # [E, 3, S] ms, additive share of the layer's grouped-GEMM launches
    bits: np.ndarray  # [S] bits per weight (paper accounting)
    size: np.ndarray  # [E] parameters of one block
    rows: np.ndarray  # [E] routed rows at the batch size (shared experts: every token)
    gemms: list  # per expert (N_gate_up, K_gate_up, N_down, K_down)
    time_source: str  # least measured perfmodel source among the blocks
    params: dict

    @property
    def labels(self) -> list:
        """'layer L expert e' per expert, for error messages."""
        return [f"layer {self.layer} expert {e}" for e in self.experts]

    def totals(self, choice: np.ndarray) -> tuple:
        """(L, T ms) of a choice [E, 3]."""
        at = (np.arange(len(self.experts))[:, None], np.arange(3)[None], choice)
        return float(self.loss[at].sum()), float(self.time[at].sum())


def model_dims(model) -> dict:
    """{'hidden', 'expert_width', 'shared_widths'} of a loaded MoE model (first MoE block)."""
    b = moe_blocks(model)[0]
    inter, hidden = b.expert_weight(0, "gate").shape
    return {
        "hidden": int(hidden),
        "expert_width": int(inter),
        "shared_widths": [int(b.shared_weight(i, "gate").shape[0]) for i in range(len(b.shared))],
    }


def layer_problem(
    sensitivity: dict,
    routing: dict,
    dims: dict,
    layer: int,
    table,
    schemes="w5a5",
    batch_tokens: int = 512,
    model: str = "",
) -> LayerProblem:
    """Loss, time, bits and sizes of one MoE layer for the allocation, from plain data.

    Loss: Δ of the ``sensitivity`` result (``mxmoe.sensitivity.compute_sensitivity``) restricted to the
    scheme set ``schemes`` (a name or list, ``mxmoe.schemes.scheme_set``). Time: ``mxmoe.perfmodel``
    shares (cost table ``table``) of the layer's launches (gate_up fused: N = 2I, split evenly between
    gate and up; down) with the tokens per expert of a ``batch_tokens`` batch routed like ``routing``
    (``mxmoe.routing.routing_report``); shared experts see every token. ``dims``: ``model_dims``.
    """
    sens, rout = sensitivity, routing
    method = sens.get("params", {}).get("method", "")
    chosen = [Scheme.parse(x) for x in (scheme_set(schemes) if isinstance(schemes, str) else schemes)]
    have = [Scheme.parse(x) for x in sens["schemes"]]
    missing = [str(x) for x in chosen if x not in have]
    if missing:
        raise MxMoEError(
            f"schemes {missing} have no sensitivity in the {method or 'given'} result (it has {sens['schemes']}); "
            "rerun the sensitivity with them or choose a subset"
        )
    delta, experts = sensitivity_array(sens, layer)  # [E, 3, S_all]
    loss = delta[:, :, [have.index(x) for x in chosen]]  # [E, 3, S]
    if layer not in rout["layers"]:
        raise MxMoEError(f"layer {layer} is not in the routing profile (layers {rout['layers']})")
    routed = batch_workload(np.asarray(rout["counts"]), batch_tokens, rout["top_k"])[rout["layers"].index(layer)]
    n_routed = len(routed)
    rows = np.array([routed[e] if isinstance(e, int) else batch_tokens for e in experts])  # [E]
    h, inter = dims["hidden"], dims["expert_width"]
    widths = [inter if isinstance(e, int) else dims["shared_widths"][int(str(e)[len("shared") :])] for e in experts]
    gemms = [(2 * w, h, h, w) for w in widths]
    mean_rows = rows.mean()
    time_ = np.zeros(loss.shape)  # [E, 3, S]
    sources = set()
    for i, (m, (n_gu, k_gu, n_d, k_d)) in enumerate(zip(rows, gemms)):
        for k, sch in enumerate(chosen):
            gu = block_time(sch, m, n_gu, k_gu, table, rows_per_expert=mean_rows)
            dn = block_time(sch, m, n_d, k_d, table, rows_per_expert=mean_rows)
            time_[i, :, k] = gu.ms / 2, gu.ms / 2, dn.ms
            sources |= {gu.source, dn.source}
    params = {
        "model": model,
        "layer": layer,
        "method": method,
        "scheme_set": schemes if isinstance(schemes, str) else ",".join(map(str, chosen)),
        "batch_tokens": batch_tokens,
        "gpu": table.gpu,
        "device": table.device,
        "routed_experts": n_routed,
        "sensitivity": sens.get("params"),
        "routing": rout.get("params"),
    }
    return LayerProblem(
        model,
        layer,
        list(experts),
        chosen,
        loss,
        time_,
        np.array([x.bits_per_weight for x in chosen]),
        np.array([w * h for w in widths], dtype=float),
        rows,
        gemms,
        max(sources, key=SOURCES.index),
        params,
    )


def scheme_map(problems: list, choices: list) -> dict:
    """{(layer, expert, block): Scheme} of per-layer choices [E, 3], as apply_schemes takes it."""
    return {
        (p.layer, e, BLOCK_NAMES[j]): p.schemes[c[i, j]]
        for p, c in zip(problems, choices)
        for i, e in enumerate(p.experts)
        for j in range(3)
    }


def allocation_doc(
    problems: list,
    choices: list,
    setting: str,
    r: float,
    budget_bits: float,
    *,
    granularity: str = "block",
    global_budget: bool = False,
    tie_gate_up: bool = True,
    profile: str = "",
    solve_seconds: "float | None" = None,
) -> dict:
    """The JSON document of one allocation: parameters, predicted L and T per layer and in all, and the rows."""
    layers, bits_num, bits_den = [], 0.0, 0.0
    for p, c in zip(problems, choices):
        L, T = p.totals(c)
        table = load_table(p.params["gpu"])
        launches = [
            launch_time([(p.schemes[c[i, 0]], m, g[0], g[1]) for i, (m, g) in enumerate(zip(p.rows, p.gemms))], table),
            launch_time([(p.schemes[c[i, 2]], m, g[2], g[3]) for i, (m, g) in enumerate(zip(p.rows, p.gemms))], table),
        ]
        bits = float((p.size[:, None] * p.bits[c]).sum() / (3 * p.size.sum()))
        bits_num, bits_den = bits_num + bits * p.size.sum(), bits_den + p.size.sum()
        counts = {str(s): int((c == k).sum()) for k, s in enumerate(p.schemes)}
        layers.append(
            {
                "layer": p.layer,
                "L": L,
                "T_ms": T,
                "T_launch_ms": sum(x.ms for x in launches),
                "bits": bits,
                "blocks_per_scheme": counts,
                "time_source": p.time_source,
            }
        )
    p0 = problems[0]
    return {
        "model": p0.model,
        "setting": setting,
        "r": r,
        "budget_bits": budget_bits,
        "granularity": granularity,
        "global_budget": global_budget,
        "optimality_gap": MODEL_GAP_REL if global_budget else 0.0,
        "tie_gate_up": tie_gate_up,
        "scheme_set": p0.params["scheme_set"],
        "schemes": [str(s) for s in p0.schemes],
        "batch_tokens": p0.params["batch_tokens"],
        "method": p0.params["method"],
        "gpu": p0.params["gpu"],
        "device": p0.params["device"],
        "profile": profile,
        "time_kind": f"predicted ({p0.time_source}, mxmoe.perfmodel)",
        "predicted": {
            "L": sum(x["L"] for x in layers),
            "T_ms": sum(x["T_ms"] for x in layers),
            "T_launch_ms": sum(x["T_launch_ms"] for x in layers),
            "bits": bits_num / bits_den,
        },
        "layers": layers,
        "solve_seconds": solve_seconds,
        "inputs": {"sensitivity": p0.params["sensitivity"], "routing": p0.params["routing"]},
        "rows": scheme_map_to_rows(scheme_map(problems, choices)),
    }
