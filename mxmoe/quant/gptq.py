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
g-1 and g>0 with a shorter last group, e4m3 per channel for 8-bit fp8 weights, the sym integer grid
for narrower fp8 schemes); only the rounded values differ.

``gptq_quantize_batched`` runs the same algorithm on a batch of same-shape weights (the experts of
one MoE layer, each under its own scheme) with one Python column loop; ``gptq_quantize`` is its
batch of one.
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


def _codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fp8: "torch.Tensor | None",
) -> torch.Tensor:
    """Round one column ``w[B, N]`` per element onto its grid ``scale[B, N]``, ``zero[B, N]`` (as RTN does).

    Integers: ``clamp(round((w - zero) / scale), lo, hi)`` with ``lo``/``hi`` [B, 1] (sym: zero 0,
    ±qmax; asym: 0, 2^b - 1); the elements flagged in ``fp8`` [B, 1] (or None) are cast to e4m3.
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = (w - zero) / safe  # zero is exactly 0 on sym/fp8 grids, so this is w / scale there
    q = torch.clamp(torch.round(x), lo, hi)
    if fp8 is not None:
        q = torch.where(fp8, x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float(), q)
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
            (torch.tensor([damp[i] for i in pending], dtype=H.dtype, device=H.device) * mean_diag[idx])[:, None]
        )
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
    (out,) = gptq_quantize_batched(
        w[None],
        [hessian],
        scheme,
        blocksize=blocksize,
        percdamp=percdamp,
        act_order=act_order,
        static_groups=static_groups,
        min_tokens=min_tokens,
        max_damp_retries=max_damp_retries,
    )  # the batch of one: same code path
    if isinstance(out, Exception):
        raise out
    return out


def _schemes_of(schemes, b: int) -> list:
    """One parsed, GPTQ-able ``Scheme`` per batch element from a scheme or a sequence of ``b``."""
    many = not isinstance(schemes, (str, Scheme))
    ss = [Scheme.parse(s) for s in schemes] if many else [Scheme.parse(schemes)] * b
    if len(ss) != b:
        raise ValueError(f"{b} weights but {len(ss)} schemes")
    for s in dict.fromkeys(ss):
        if s.is_full_precision:
            raise ValueError("bf16 is not quantized: there is no grid for GPTQ to round onto")
        if s.fp8_weight and s.group_size > 0:
            raise ValueError(f"scheme '{s}': fp8 weights are per channel only; use g-1 (e.g. 'w8a8_g-1_sym_fp8')")
    return ss


def gptq_quantize_batched(
    w: torch.Tensor,
    hessians: "list[HessianAccumulator]",
    schemes: "Scheme | str | list",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    min_tokens: int = 1,
    max_damp_retries: int = 3,
) -> list:
    """GPTQ of a batch of same-shape weights ``w[B, N, K]``, element b with ``hessians[b]`` and its own scheme.

    ``schemes``: one scheme for all, or one per element (any mix of bit widths, sym/asym, group
    sizes, fp8). Per element the result is exactly ``gptq_quantize``'s (see there for the options),
    but the column loop runs once for the whole batch. Elements may share a Hessian object (e.g. one
    expert under several schemes): its checks, act-order and Cholesky then run once. Returns one
    entry per element: a ``GPTQWeight``, or the ``InsufficientCalibration`` /
    ``torch.linalg.LinAlgError`` instance ``gptq_quantize`` would have raised for it. Invalid
    schemes, shapes and non-finite Hessians still raise.
    """
    if w.dim() != 3:
        raise ValueError(f"gptq_quantize_batched expects weights [E, N, K], got shape {tuple(w.shape)}")
    if len(hessians) != w.shape[0]:
        raise ValueError(f"{w.shape[0]} weights but {len(hessians)} Hessians")
    ss = _schemes_of(schemes, w.shape[0])
    if act_order and not static_groups:
        raise ValueError(
            "act_order without static_groups scatters groups over K (a g_idx layout the kernel cannot run); "
            "pass static_groups=True"
        )
    _, n, k = w.shape
    results: list = [None] * w.shape[0]
    slot: dict = {}  # id(Hessian) -> its index in Hs, or the exception its elements get
    Hs, active, uidx = [], [], []  # distinct usable Hessians; elements with one, and which
    for e, hessian in enumerate(hessians):
        if id(hessian) not in slot:
            if hessian.in_features != k:
                raise ValueError(
                    f"Hessian is {hessian.in_features}x{hessian.in_features} but the weight has K={k} inputs"
                )
            slot[id(hessian)] = _checked(hessian, k, min_tokens, w.device, Hs)
        u = slot[id(hessian)]
        if isinstance(u, Exception):
            results[e] = u
        else:
            active.append(e)
            uidx.append(u)
    if not active:
        return results

    H = torch.stack(Hs)  # [U, K, K] (a copy), one per distinct Hessian
    dead = H.diagonal(dim1=-2, dim2=-1) == 0  # [U, K]
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1
    u_n = H.shape[0]
    if act_order:
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [U, K]
    else:
        perm = torch.arange(k, device=w.device).expand(u_n, k)
    H = H.gather(1, perm[:, :, None].expand(u_n, k, k)).gather(2, perm[:, None, :].expand(u_n, k, k))
    chol = _inverse_cholesky(H, percdamp, max_damp_retries)
    for e, u in zip(active, uidx):
        if isinstance(chol[u], Exception):
            results[e] = chol[u]
    keep = [j for j, u in enumerate(uidx) if not isinstance(chol[u], Exception)]
    if not keep:
        return results
    active, uidx = [active[j] for j in keep], [uidx[j] for j in keep]
    ok_u = sorted(set(uidx))  # renumber the surviving Hessians
    uidx = [ok_u.index(u) for u in uidx]
    Hinv = torch.stack([chol[u][0] for u in ok_u])  # [U', K, K] upper
    used_damp = [chol[u][1] for u in ok_u]
    ut = torch.tensor(uidx, device=w.device)  # [B] element -> Hessian
    perm, dead = perm[ok_u][ut], dead[ok_u][ut]  # [B, K] each
    b = len(active)
    ss = [ss[e] for e in active]

    W = w.detach()[torch.tensor(active, device=w.device)].to(torch.float32)  # [B, N, K] (a copy)
    by_scheme: dict = {}  # scheme -> positions in the batch
    for j, s in enumerate(ss):
        by_scheme.setdefault(s, []).append(j)
    grids = {}  # scheme -> (scale, zero) [P, N, n_groups] of its elements
    for s, pos in by_scheme.items():
        if s.group_size < 0:  # one group per row, found (as the reference does) before dead inputs are zeroed
            grids[s] = _grid(W[pos], s)
    W.masked_fill_(dead[:, None, :], 0)
    dynamic = {}  # scheme -> (positions, group) of the schemes whose groups are found as they start
    for s, pos in by_scheme.items():
        if s.group_size > 0 and static_groups:  # every group on the original column order, before any update
            grids[s] = _grid(W[pos], s)
        elif s.group_size > 0:  # filled as each group starts, from the error-corrected weight
            sc = torch.zeros(len(pos), n, -(-k // s.effective_group(k)), device=W.device)
            grids[s] = (sc, torch.zeros_like(sc))
            dynamic[s] = (torch.tensor(pos, device=W.device), s.effective_group(k))

    W = W.gather(2, perm[:, None, :].expand(b, n, k))  # [B, N, K] processed order
    scale_col = torch.zeros(b, n, k, device=W.device)  # [B, N, K] each processed column's grid
    zero_col = torch.zeros_like(scale_col)
    lo, hi = torch.empty(b, 1, device=W.device), torch.empty(b, 1, device=W.device)  # [B, 1] code range
    for s, pos in by_scheme.items():
        qmax = 2 ** (s.w_bits - 1) - 1 if s.symmetric else 2**s.w_bits - 1
        lo[pos], hi[pos] = (-qmax if s.symmetric else 0), qmax
        if s not in dynamic:
            idx = torch.tensor(pos, device=W.device)
            col_group = (perm[idx] // s.effective_group(k))[:, None, :].expand(len(pos), n, k)
            scale_col[idx], zero_col[idx] = grids[s][0].gather(2, col_group), grids[s][1].gather(2, col_group)
    fp8 = torch.tensor([s.fp8_weight for s in ss], device=W.device)[:, None]  # [B, 1] e4m3 weights
    fp8 = fp8 if any(s.fp8_weight for s in ss) else None

    Q = torch.zeros_like(W)  # [B, N, K] codes, processed order
    loss = torch.zeros(b, dtype=torch.float64, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, :, i1:i2].clone()  # [B, N, Bk]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[ut, i1:i2, i1:i2]  # [B, Bk, Bk]
        for i in range(i2 - i1):
            col = i1 + i
            for s, (pos, g) in dynamic.items():
                if col % g == 0:
                    # the reference finds the group on W, which holds this block's columns before
                    # the in-block updates (identical to W1 when the group starts a block)
                    sc, zc = _grid(W[pos, :, col : col + g], s)  # [P, N, 1]
                    grids[s][0][:, :, col // g], grids[s][1][:, :, col // g] = sc[:, :, 0], zc[:, :, 0]
                    scale_col[pos, :, col : col + g], zero_col[pos, :, col : col + g] = sc, zc
            sc, zc = scale_col[:, :, col], zero_col[:, :, col]  # [B, N]
            wcol, d = W1[:, :, i], Hinv1[:, i, i]  # [B, N], [B]
            q = _codes(wcol, sc, zc, lo, hi, fp8)  # [B, N]
            Q[:, :, col] = q
            err = (wcol - (q * sc + zc)) / d[:, None]  # [B, N]
            loss += (err.double() ** 2).sum(dim=1) / 2
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[ut, i1:i2, i2:]

    q = torch.empty_like(Q).scatter_(2, perm[:, None, :].expand(b, n, k), Q)  # [B, N, K] original order
    losses, n_dead = loss.tolist(), dead.sum(dim=1).tolist()
    for s, pos in by_scheme.items():
        for p, j in enumerate(pos):
            e = active[j]
            results[e] = GPTQWeight(
                q[j] if s.fp8_weight else q[j].to(torch.int32),
                grids[s][0][p],
                grids[s][1][p],
                s,
                loss=losses[j],
                percdamp=used_damp[uidx[j]],
                dead_inputs=int(n_dead[j]),
                tokens=hessians[e].tokens,
            )
    return results


def _checked(hessian: HessianAccumulator, k: int, min_tokens: int, device, Hs: list) -> "int | Exception":
    """Append a usable Hessian's float32 H [K, K] to ``Hs`` and return its index, else the exception for it."""
    if hessian.tokens < max(min_tokens, 1):
        return InsufficientCalibration(
            f"GPTQ needs at least {max(min_tokens, 1)} calibration tokens for this layer, got {hessian.tokens}; "
            "quantize it with RTN instead"
        )
    H = hessian.H.to(device, torch.float32)  # [K, K]
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the Hessian contains NaN or Inf; check the calibration activations")
    if (torch.diag(H) == 0).all():
        return InsufficientCalibration(
            f"GPTQ: all {k} inputs are zero on the {hessian.tokens} calibration tokens; quantize with RTN instead"
        )
    Hs.append(H)
    return len(Hs) - 1


def _grid(w: torch.Tensor, s: Scheme) -> tuple:
    """RTN scale and zero [P, N, n_groups] of ``w[P, N, K']`` on scheme ``s`` (rows are independent)."""
    p, n, _ = w.shape
    grid = quantize_weight_int(w.reshape(p * n, -1), s)
    return grid.scale.reshape(p, n, -1), grid.zero.reshape(p, n, -1)
