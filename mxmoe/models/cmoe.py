"""CMoE-style carving of a dense SwiGLU FFN into a shared expert and balanced routed experts.

After CMoE (Pei et al., arXiv 2502.04416), training-free:

1. per calibration token, mark the ``k_act`` neurons with the largest |activation| (activations
   computed with L2-normalised inputs and weight rows, so neurons compare on direction, not scale);
2. the shared expert is the ``shared_width`` neurons marked most often (highest activation rate);
3. the other neurons are grouped into ``E`` experts of equal width by balanced assignment: cluster
   centres start at the markers of the ``E`` most frequent remaining neurons, each neuron goes to a
   centre by a linear assignment problem on the L1 distance between marker columns (every centre
   repeated ``width`` times, so every expert gets exactly ``width`` neurons), centres are re-averaged;
4. each expert's representative is the neuron closest to its centre; CMoE routes on the
   representative's |activation|. The checkpoint is a standard Qwen2-MoE, whose router is linear,
   so the router here is the least-squares linear fit [E, H] to the representatives' log |activation|
   (a ranking-preserving target), scaled to a small logit spread so the renormalised top-k weights
   stay ≈ 1/k, as CMoE's unit weights are; ``moefy.fit_scales`` then fits one output scale per expert.

The result is a ``moefy.LayerSplit``, so ``moefy.sparse_block`` / ``moefy.assemble`` build the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from mxmoe.models.moefy import LayerSplit, MoefyConfig, fit_router, fit_scales


@dataclass(frozen=True)
class CarveConfig(MoefyConfig):
    """Structure and carving method of a fully sparse smollm2-moe (every field shapes the weights).

    The sizes and seeds are ``moefy.MoefyConfig``'s; ``method='kmeans'`` carves with its co-activation k-means.
    """

    method: str = "cmoe"  # "cmoe" (this module) or "kmeans" (moefy's co-activation k-means)
    router: str = "rep"  # "rep": fit to the representatives' log |activation| (CMoE); "norm": log expert-output norms
    k_act: int = 128  # neurons marked per token (CMoE's K_a)
    assign_iters: int = 2  # balanced-assignment rounds (CMoE: 1)

    def check(self, inter: int) -> int:
        """Validate the structure against an FFN of ``inter`` neurons; returns the routed expert width."""
        if self.method not in ("cmoe", "kmeans"):
            raise ValueError(f"unknown carving method {self.method!r}: use 'cmoe' or 'kmeans'")
        routed = inter - self.shared_width
        if self.shared_width < 0 or routed <= 0 or routed % self.num_experts:
            raise ValueError(
                f"{inter} neurons minus {self.shared_width} shared do not split into {self.num_experts} equal experts"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and num_experts {self.num_experts}")
        if self.router not in ("rep", "norm"):
            raise ValueError(f"unknown router fit {self.router!r}: use 'rep' or 'norm'")
        if not 1 <= self.k_act <= inter:
            raise ValueError(f"k_act {self.k_act} must be between 1 and {inter}")
        return routed // self.num_experts

    def active_neurons(self, inter: int) -> int:
        """Neurons a token runs through: shared + top_k routed experts."""
        return self.shared_width + self.top_k * self.check(inter)


def activation_markers(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, k_act: int) -> torch.Tensor:
    """0/1 markers [T, I]: each token's ``k_act`` neurons of largest |silu(x̂·ĝ)·(x̂·û)| (rows L2-normalised).

    x: [T, H]; wg, wu: [I, H].
    """
    xn = F.normalize(x, dim=1)  # [T, H]
    h = F.silu(xn @ F.normalize(wg, dim=1).T) * (xn @ F.normalize(wu, dim=1).T)  # [T, I]
    top = torch.topk(h.abs(), k_act, dim=1).indices  # [T, k_act]
    return torch.zeros_like(h).scatter_(1, top, 1.0)


def balanced_assignment(
    markers: torch.Tensor, rates: torch.Tensor, k: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group n = k·m neurons into k clusters of exactly m by linear assignment on L1 marker distance.

    markers: [T, n] 0/1 columns of the neurons to group; rates: [n] their activation rates (the k most
    frequent seed the centres). Returns labels [n] and representatives [k] (index of the neuron
    closest to each final centre, within 0..n-1).
    """
    n = markers.shape[1]
    if n % k:
        raise ValueError(f"{n} neurons cannot be split into {k} equal experts")
    m = n // k
    cols = markers.T.contiguous()  # [n, T]
    centres = cols[torch.topk(rates, k).indices].clone()  # [k, T]
    labels = None
    for _ in range(max(1, iters)):
        dist = torch.cdist(cols, centres, p=1)  # [n, k]
        cost = np.repeat(dist.double().numpy(), m, axis=1)  # [n, n]: slot j belongs to cluster j // m
        rows, slots = linear_sum_assignment(cost)
        new = torch.empty(n, dtype=torch.long)
        new[torch.from_numpy(rows)] = torch.from_numpy(slots // m).long()
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([cols[labels == c].mean(0) for c in range(k)])  # [k, T]
    reps = torch.empty(k, dtype=torch.long)
    for c in range(k):
        members = (labels == c).nonzero().squeeze(1)  # [m]
        reps[c] = members[torch.cdist(centres[c : c + 1], cols[members], p=1).argmin()]
    return labels, reps


def representative_scores(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """CMoE's analytic router scores [T, E]: |silu(x̂·ĝ_r)·(x̂·û_r)| of each expert's representative neuron."""
    xn = F.normalize(x, dim=1)
    return (F.silu(xn @ F.normalize(wg[reps], dim=1).T) * (xn @ F.normalize(wu[reps], dim=1).T)).abs()


@torch.no_grad()
def carve_layer(mlp: nn.Module, x: torch.Tensor, cfg: CarveConfig, seed: int) -> tuple[LayerSplit, float]:
    """Carve one dense SwiGLU FFN with CMoE: shared expert, balanced routed experts, linearised router, scales.

    x: [T, H] FFN inputs from the dense model; ``router_tokens`` of them carve and fit, up to half as many
    others give the held-out relative output error ‖MoE(x) − FFN(x)‖ / ‖FFN(x)‖.
    """
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I, H], [I, H], [H, I]
    inter = wg.shape[0]
    cfg.check(inter)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    sub, held = x[perm[: cfg.router_tokens]], x[perm[cfg.router_tokens :][: cfg.router_tokens // 2]]  # [T', H]
    markers = activation_markers(sub, wg, wu, cfg.k_act)  # [T', I]
    rates = markers.mean(0)  # [I]
    order = torch.argsort(rates, descending=True, stable=True)
    shared, rest_ids = order[: cfg.shared_width].sort().values, order[cfg.shared_width :].sort().values  # [S], [R]
    labels, reps = balanced_assignment(markers[:, rest_ids], rates[rest_ids], cfg.num_experts, cfg.assign_iters)
    experts = torch.stack([rest_ids[labels == e] for e in range(cfg.num_experts)])  # [E, w]
    rep_ids = rest_ids[reps]  # [E] representative neuron per expert (expert e's own)

    if cfg.router == "rep":
        target = torch.log(representative_scores(sub, wg, wu, rep_ids) + 1e-6)  # [T', E]
    else:
        act = F.silu(sub @ wg.T) * (sub @ wu.T)  # [T', I]
        target = torch.log(torch.einsum("tew,hew->teh", act[:, experts], wd[:, experts]).norm(dim=2) + 1e-6)
    router = fit_router(sub, target, cfg.router_spread)
    return finish_split(mlp, sub, held, shared, experts, router, cfg.top_k)


@torch.no_grad()
def finish_split(
    mlp: nn.Module,
    sub: torch.Tensor,
    held: torch.Tensor,
    shared: torch.Tensor,
    experts: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
) -> tuple[LayerSplit, float]:
    """Fit per-expert output scales for a carving and router on ``sub`` [T', H]; held-out error on ``held``.

    Returns the split (scales times ``top_k``, folded into down_proj by ``moefy.sparse_block``) and the
    held-out relative FFN output error.
    """
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    num_experts = experts.shape[0]

    def outputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        act = F.silu(tokens @ wg.T) * (tokens @ wu.T)  # [T, I]
        y = torch.einsum("tew,hew->teh", act[:, experts], wd[:, experts])  # [T, E, H]
        top = torch.topk(tokens @ router.T, top_k, dim=1).indices  # [T, k]
        mask = torch.zeros(tokens.shape[0], num_experts).scatter_(1, top, 1.0)  # [T, E]
        return act, y, mask

    act, y, mask = outputs(sub)
    scale = fit_scales(y, mask, y.sum(1))
    act_h, y_h, mask_h = outputs(held)
    dense = act_h @ wd.T  # [T'', H]
    approx = torch.einsum("te,teh->th", mask_h * scale, y_h) + act_h[:, shared] @ wd[:, shared].T
    rel = ((approx - dense).norm() / dense.norm()).item()
    return LayerSplit(shared, experts, router, scale * top_k), rel


def kmeans_config(cfg: CarveConfig) -> MoefyConfig:
    """The ``moefy.MoefyConfig`` of the co-activation k-means baseline with the same structure and sizes."""
    return MoefyConfig(**{f.name: getattr(cfg, f.name) for f in fields(MoefyConfig)})


def carve(mlp: nn.Module, x: torch.Tensor, cfg: CarveConfig, seed: int) -> tuple[LayerSplit, float]:
    """Carve one FFN by ``cfg.method``: 'cmoe' (:func:`carve_layer`) or 'kmeans' (``moefy.split_layer``)."""
    from mxmoe.models.moefy import split_layer

    cfg.check(mlp.gate_proj.weight.shape[0])
    if cfg.method == "kmeans":
        return split_layer(mlp, x, kmeans_config(cfg), seed)
    return carve_layer(mlp, x, cfg, seed)
