"""GPTQ (Frantar et al. 2022) onto the same grids as RTN, so the kernel can run its output.

The algorithm follows the reference implementation (IST-DASLab/gptq ``fasterquant``):

* ``H = 2/n Σ xᵀx`` over the n calibration tokens, kept as a running mean (fed in chunks);
* dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` and ``W[:, j] = 0``;
* relative damping ``percdamp · mean(diag H)`` on the diagonal;
* the upper Cholesky factor of ``H⁻¹`` drives column-by-column error feedback, in lazy
  batches of ``blocksize`` columns;
* act-order (columns by decreasing ``H[j, j]``) with *static* groups: each group's scale and
  zero are found on the original column order before the permutation, so the stored grid is the
  plain per-group RTN layout (no ``g_idx``) and ``q``, ``scale``, ``zero`` come back in the
  original column order.

Every scheme quantizes onto exactly the grid ``mxmoe.quant.rtn`` defines (asym float zero, sym,
g-1 and g>0 with a shorter last group, fp8 e4m3 per channel); only the rounded values differ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from mxmoe.quant.rtn import FP8_MAX, IntWeight, quantize_weight_int
from mxmoe.schemes import Scheme


class InsufficientCalibration(ValueError):
    """The Hessian holds too few tokens (or none that reach any input) for GPTQ.

    Callers catch it to fall back to RTN for that block, with a warning and a count.
    """


class HessianAccumulator:
    """Running ``H = 2/n Σ_t x_tᵀ x_t`` over the tokens of one linear layer's input.

    ``add`` can be called any number of times with chunks ``x[..., K]``; ``tokens`` counts the
    rows seen so far. H is kept in float32 as in the reference implementation.
    """

    def __init__(self, in_features: int, device: "torch.device | str | None" = None):
        """Start an empty accumulator for inputs of width ``in_features``."""
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [K, K]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold the tokens of ``x[..., K]`` into the running mean."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} does not match the Hessian's {self.in_features}")
        x = x.reshape(-1, self.in_features)  # [T, K]
        t = x.shape[0]
        if t == 0:
            return
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = (2.0 / self.tokens) ** 0.5 * x.to(self.H.device, torch.float32)
        self.H += x.T @ x


@dataclass
class GPTQWeight(IntWeight):
    """An ``IntWeight`` produced by GPTQ, with what happened on the way.

    loss: the reference's proxy loss Σ (w - q)² / (2·Hinv[j, j]²)
    percdamp: the relative damping finally used (larger than asked if Cholesky had to retry)
    dead_inputs: inputs whose Hessian diagonal was 0 (their weight columns were zeroed)
    tokens: calibration tokens behind the Hessian
    """

    loss: float = 0.0
    percdamp: float = 0.0
    dead_inputs: int = 0
    tokens: int = 0


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, s: Scheme) -> torch.Tensor:
    """Round one column ``w[N]`` onto the grid given by ``scale[N]``, ``zero[N]`` (as RTN does)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if s.fmt == "fp8":
        q = (w / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    elif s.symmetric:
        qmax = 2 ** (s.w_bits - 1) - 1
        q = torch.clamp(torch.round(w / safe), -qmax, qmax)
    else:
        q = torch.clamp(torch.round((w - zero) / safe), 0, 2**s.w_bits - 1)
    return torch.where(scale > 0, q, torch.zeros_like(q))  # a constant group keeps its value via zero


def _more(percdamp: float) -> float:
    """The next, larger relative damping to try after a failed Cholesky."""
    return percdamp * 10 if percdamp > 0 else 0.01


def _inverse_cholesky(H: torch.Tensor, percdamp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹``; on failure retry with 10× the damping (0 -> 0.01)."""
    k = H.shape[0]
    mean_diag = torch.diag(H).mean()
    for attempt in range(max_retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(percdamp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            eye = torch.eye(k, dtype=H.dtype, device=H.device)
            # H⁻¹ via cholesky_solve: same result as cholesky_inverse, which is ~30x slower on CPU
            U, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, percdamp
        if attempt < max_retries:
            warnings.warn(
                f"GPTQ: Cholesky failed for a {k}x{k} Hessian with percdamp={percdamp:g}; "
                f"retrying with percdamp={_more(percdamp):g}",
                stacklevel=3,
            )
            percdamp = _more(percdamp)
    raise torch.linalg.LinAlgError(
        f"GPTQ: Cholesky of the damped {k}x{k} Hessian failed {max_retries + 1} times "
        f"(last percdamp={percdamp:g}); the calibration inputs are degenerate: use RTN for this layer"
    )


def gptq_quantize(
    w: torch.Tensor,
    hessian: HessianAccumulator,
    scheme: "Scheme | str",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    min_tokens: int = 1,
    max_damp_retries: int = 3,
) -> GPTQWeight:
    """Quantize ``w[N, K]`` with GPTQ on ``scheme``'s grid, using the Hessian of its inputs.

    ``act_order`` processes columns by decreasing Hessian diagonal; it requires
    ``static_groups`` (group parameters from the original weight, plain per-group layout).
    Without act-order, ``static_groups=False`` finds each group's parameters on the
    error-corrected weight when the group starts, as the reference does.
    Raises ``InsufficientCalibration`` when the Hessian has fewer than ``min_tokens`` tokens or
    every input is dead; callers fall back to RTN.
    """
    s = Scheme.parse(scheme)
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if s.is_full_precision:
        raise ValueError("bf16 is not quantized: there is no grid for GPTQ to round onto")
    if s.fmt == "fp8" and s.group_size > 0:
        raise ValueError(f"scheme '{s}': fp8 weights are per channel only; use g-1 (e.g. 'w8a8_g-1_sym_fp8')")
    if act_order and not static_groups:
        raise ValueError(
            "act_order without static_groups scatters groups over K (a g_idx layout the kernel cannot run); "
            "pass static_groups=True"
        )
    n, k = w.shape
    if hessian.in_features != k:
        raise ValueError(f"Hessian is {hessian.in_features}x{hessian.in_features} but the weight has K={k} inputs")
    if hessian.tokens < max(min_tokens, 1):
        raise InsufficientCalibration(
            f"GPTQ needs at least {max(min_tokens, 1)} calibration tokens for this layer, got {hessian.tokens}; "
            "quantize it with RTN instead"
        )
    H = hessian.H.to(w.device, torch.float32, copy=True)  # [K, K]
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the Hessian contains NaN or Inf; check the calibration activations")

    W = w.detach().to(torch.float32, copy=True)  # [N, K]
    dead = torch.diag(H) == 0  # [K]
    if dead.all():
        raise InsufficientCalibration(
            f"GPTQ: all {k} inputs are zero on the {hessian.tokens} calibration tokens; quantize with RTN instead"
        )
    g = s.effective_group(k)
    if s.group_size < 0:  # one group per row, found (as the reference does) before dead inputs are zeroed
        grid = quantize_weight_int(W, s)
        scale, zero = grid.scale, grid.zero  # [N, 1]
    H[dead, dead] = 1
    W[:, dead] = 0
    if s.group_size > 0 and static_groups:  # every group on the original column order, before any update
        grid = quantize_weight_int(W, s)
        scale, zero = grid.scale, grid.zero  # [N, n_groups]
    elif s.group_size > 0:  # filled as each group starts, from the error-corrected weight
        scale = torch.zeros(n, -(-k // g), device=W.device)
        zero = torch.zeros_like(scale)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // g  # [K]: group of each processed column, in the original order
    Hinv, used_damp = _inverse_cholesky(H, percdamp, max_damp_retries)  # [K, K] upper

    Q = torch.zeros_like(W)  # [N, K] codes, processed order
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        for i in range(i2 - i1):
            col = i1 + i
            if s.group_size > 0 and not static_groups and col % g == 0:
                # the reference finds the group on W, which holds this block's columns before
                # the in-block updates (identical to W1 when the group starts a block)
                grid = quantize_weight_int(W[:, col : col + g], s)  # one group: the slice
                scale[:, col // g], zero[:, col // g] = grid.scale[:, 0], grid.zero[:, 0]
            gi = group_of[col]
            wcol, d = W1[:, i], Hinv1[i, i]
            q = _codes(wcol, scale[:, gi], zero[:, gi], s)  # [N]
            Q[:, col] = q
            err = (wcol - (q * scale[:, gi] + zero[:, gi])) / d  # [N]
            loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    q = Q[:, torch.argsort(perm)]  # [N, K] original order
    if s.fmt == "int":
        q = q.to(torch.int32)
    return GPTQWeight(
        q, scale, zero, s, loss=float(loss), percdamp=used_damp, dead_inputs=int(dead.sum()), tokens=hessian.tokens
    )
