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

``gptq_quantize_batched`` runs the same algorithm on a batch of same-shape weights (the experts of
one MoE layer) with one Python column loop; ``gptq_quantize`` is its batch of one.
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


def _inverse_cholesky(H: torch.Tensor, percdamp: float, max_retries: int) -> list:
    """Upper Cholesky factors of ``(H[b] + damp_b·I)⁻¹`` for a batch ``H[B, K, K]``.

    An expert whose Cholesky fails is retried alone with 10× its damping (0 -> 0.01), with a
    warning each time. Returns, per expert, ``(U [K, K], percdamp used)`` or the ``LinAlgError``
    it ends with after ``max_retries`` retries.
    """
    b, k = H.shape[0], H.shape[-1]
    # [B]; contiguous first: a strided sum rounds differently from the single-matrix torch.diag(H).mean()
    mean_diag = H.diagonal(dim1=-2, dim2=-1).contiguous().mean(dim=-1)
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    damp = [percdamp] * b
    out: list = [None] * b
    pending = list(range(b))
    for attempt in range(max_retries + 1):
        idx = torch.tensor(pending, device=H.device)
        Hd = H[idx]  # [P, K, K] (a copy)
        Hd.diagonal(dim1=-2, dim2=-1).add_(
            (torch.tensor([damp[i] for i in pending], dtype=H.dtype, device=H.device) * mean_diag[idx])[:, None])
        L, info = torch.linalg.cholesky_ex(Hd)  # [P, K, K], [P]
        # H⁻¹ via cholesky_solve: same result as cholesky_inverse, which is ~30x slower on CPU
        U, info_u = torch.linalg.cholesky_ex(torch.cholesky_solve(eye.expand_as(L), L), upper=True)
        ok = ((info == 0) & (info_u == 0) & torch.isfinite(U).flatten(1).all(dim=1)).tolist()
        failed = []
        for j, i in enumerate(pending):
            if ok[j]:
                out[i] = (U[j], damp[i])
                continue
            failed.append(i)
            if attempt < max_retries:
                warnings.warn(
                    f"GPTQ: Cholesky failed for a {k}x{k} Hessian with percdamp={damp[i]:g}; "
                    f"retrying with percdamp={_more(damp[i]):g}",
                    stacklevel=3,
                )
                damp[i] = _more(damp[i])
        pending = failed
        if not pending:
            break
    for i in pending:
        out[i] = torch.linalg.LinAlgError(
            f"GPTQ: Cholesky of the damped {k}x{k} Hessian failed {max_retries + 1} times "
            f"(last percdamp={damp[i]:g}); the calibration inputs are degenerate: use RTN for this layer"
        )
    return out


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
    every input is dead, ``torch.linalg.LinAlgError`` when damping cannot make it definite;
    callers fall back to RTN.
    """
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    (out,) = gptq_quantize_batched(w[None], [hessian], scheme, blocksize=blocksize, percdamp=percdamp,
                                   act_order=act_order, static_groups=static_groups, min_tokens=min_tokens,
                                   max_damp_retries=max_damp_retries)  # the batch of one: same code path
    if isinstance(out, Exception):
        raise out
    return out


def gptq_quantize_batched(
    w: torch.Tensor,
    hessians: "list[HessianAccumulator]",
    scheme: "Scheme | str",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    min_tokens: int = 1,
    max_damp_retries: int = 3,
) -> list:
    """GPTQ of a batch of same-shape weights ``w[E, N, K]``, expert e with ``hessians[e]``.

    Per expert the result is exactly ``gptq_quantize``'s (see there for the options), but the
    column loop runs once for the whole batch. Returns one entry per expert: a ``GPTQWeight``, or
    the ``InsufficientCalibration`` / ``torch.linalg.LinAlgError`` instance ``gptq_quantize``
    would have raised for it. Invalid schemes, shapes and non-finite Hessians still raise.
    """
    s = Scheme.parse(scheme)
    if w.dim() != 3:
        raise ValueError(f"gptq_quantize_batched expects weights [E, N, K], got shape {tuple(w.shape)}")
    if len(hessians) != w.shape[0]:
        raise ValueError(f"{w.shape[0]} weights but {len(hessians)} Hessians")
    if s.is_full_precision:
        raise ValueError("bf16 is not quantized: there is no grid for GPTQ to round onto")
    if s.fmt == "fp8" and s.group_size > 0:
        raise ValueError(f"scheme '{s}': fp8 weights are per channel only; use g-1 (e.g. 'w8a8_g-1_sym_fp8')")
    if act_order and not static_groups:
        raise ValueError(
            "act_order without static_groups scatters groups over K (a g_idx layout the kernel cannot run); "
            "pass static_groups=True"
        )
    _, n, k = w.shape
    results: list = [None] * w.shape[0]
    active, Hs = [], []
    for e, hessian in enumerate(hessians):
        if hessian.in_features != k:
            raise ValueError(f"Hessian is {hessian.in_features}x{hessian.in_features} but the weight has K={k} inputs")
        if hessian.tokens < max(min_tokens, 1):
            results[e] = InsufficientCalibration(
                f"GPTQ needs at least {max(min_tokens, 1)} calibration tokens for this layer, got {hessian.tokens}; "
                "quantize it with RTN instead"
            )
            continue
        H = hessian.H.to(w.device, torch.float32)  # [K, K]
        if not torch.isfinite(H).all():
            raise ValueError("GPTQ: the Hessian contains NaN or Inf; check the calibration activations")
        if (torch.diag(H) == 0).all():
            results[e] = InsufficientCalibration(
                f"GPTQ: all {k} inputs are zero on the {hessian.tokens} calibration tokens; quantize with RTN instead"
            )
            continue
        active.append(e)
        Hs.append(H)
    if not active:
        return results

    b = len(active)
    H = torch.stack(Hs)  # [B, K, K] (a copy)
    W = w.detach()[torch.tensor(active, device=w.device)].to(torch.float32)  # [B, N, K] (a copy)
    dead = H.diagonal(dim1=-2, dim2=-1) == 0  # [B, K]
    g = s.effective_group(k)
    if s.group_size < 0:  # one group per row, found (as the reference does) before dead inputs are zeroed
        grid = quantize_weight_int(W.reshape(b * n, k), s)  # grids are per row: experts stay apart
        scale, zero = grid.scale.reshape(b, n, 1), grid.zero.reshape(b, n, 1)  # [B, N, 1]
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1
    W.masked_fill_(dead[:, None, :], 0)
    if s.group_size > 0 and static_groups:  # every group on the original column order, before any update
        grid = quantize_weight_int(W.reshape(b * n, k), s)
        scale, zero = grid.scale.reshape(b, n, -1), grid.zero.reshape(b, n, -1)  # [B, N, n_groups]
    elif s.group_size > 0:  # filled as each group starts, from the error-corrected weight
        scale = torch.zeros(b, n, -(-k // g), device=W.device)
        zero = torch.zeros_like(scale)

    if act_order:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [B, K]
    else:
        perm = torch.arange(k, device=W.device).expand(b, k)
    W = W.gather(2, perm[:, None, :].expand(b, n, k))  # [B, N, K] processed order
    H = H.gather(1, perm[:, :, None].expand(b, k, k)).gather(2, perm[:, None, :].expand(b, k, k))
    chol = _inverse_cholesky(H, percdamp, max_damp_retries)
    for j, c in enumerate(chol):
        if isinstance(c, Exception):
            results[active[j]] = c
    keep = [j for j, c in enumerate(chol) if not isinstance(c, Exception)]
    if not keep:
        return results
    if len(keep) < b:  # drop the experts Cholesky gave up on
        sel = torch.tensor(keep, device=W.device)
        W, perm, dead, scale, zero = W[sel], perm[sel], dead[sel], scale[sel], zero[sel]
        active, b = [active[j] for j in keep], len(keep)
    Hinv = torch.stack([chol[j][0] for j in keep])  # [B, K, K] upper
    used_damp = [chol[j][1] for j in keep]

    dynamic = s.group_size > 0 and not static_groups
    if not dynamic:  # each processed column's grid, gathered once: [B, N, K]
        col_group = (perm // g)[:, None, :].expand(b, n, k)
        scale_col, zero_col = scale.gather(2, col_group), zero.gather(2, col_group)
    Q = torch.zeros_like(W)  # [B, N, K] codes, processed order
    loss = torch.zeros(b, dtype=torch.float64, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, :, i1:i2].clone()  # [B, N, Bk]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]  # [B, Bk, Bk]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic:
                if col % g == 0:
                    # the reference finds the group on W, which holds this block's columns before
                    # the in-block updates (identical to W1 when the group starts a block)
                    part = W[:, :, col : col + g]  # [B, N, <=g] one group
                    grid = quantize_weight_int(part.reshape(b * n, -1), s)
                    scale[:, :, col // g] = grid.scale.reshape(b, n)
                    zero[:, :, col // g] = grid.zero.reshape(b, n)
                sc, zc = scale[:, :, col // g], zero[:, :, col // g]  # [B, N]
            else:
                sc, zc = scale_col[:, :, col], zero_col[:, :, col]  # [B, N]
            wcol, d = W1[:, :, i], Hinv1[:, i, i]  # [B, N], [B]
            q = _codes(wcol, sc, zc, s)  # [B, N]
            Q[:, :, col] = q
            err = (wcol - (q * sc + zc)) / d[:, None]  # [B, N]
            loss += (err.double() ** 2).sum(dim=1) / 2
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]

    q = torch.empty_like(Q).scatter_(2, perm[:, None, :].expand(b, n, k), Q)  # [B, N, K] original order
    if s.fmt == "int":
        q = q.to(torch.int32)
    losses, n_dead = loss.tolist(), dead.sum(dim=1).tolist()
    for j, e in enumerate(active):
        results[e] = GPTQWeight(q[j], scale[j], zero[j], s, loss=losses[j], percdamp=used_damp[j],
                                dead_inputs=int(n_dead[j]), tokens=hessians[e].tokens)
    return results
