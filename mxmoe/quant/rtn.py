"""Round-to-nearest fake quantization: the grids every other part of mxmoe agrees on.

Weights ``w[N, K]`` are quantized in groups of ``g`` along K (the last group is shorter when
``g`` does not divide K):

* asym: ``s = (max - min) / (2^b - 1)``, ``q = round((x - min) / s)`` in ``[0, 2^b - 1]``,
  ``x̂ = q·s + min`` (a float zero point, as in GPTQ/AWQ kernels);
* sym: ``s = absmax / (2^(b-1) - 1)``, ``q = round(x / s)`` in ``±(2^(b-1) - 1)``, ``x̂ = q·s``;
* fp8 with 8-bit weights: per-channel ``s = absmax / 448``, ``x̂ = e4m3(x / s)·s``; narrower fp8
  schemes (``w4a8_g128_sym_fp8``) use the sym integer grid above, whose codes e4m3 holds exactly.

Grouped schemes store scale and zero in float16 (the 16 + 16 bits per group of the bit
accounting), so the grid here is exactly the one the kernel runs; per-channel schemes keep
float32. A constant group (max == min, e.g. all zeros) gets scale 0 and reproduces its value
(up to that storage): never a NaN. Activations ``x[T, K]`` are quantized symmetrically per token (per token and
group when ``g > 0``), onto the integer grid or, for fp8 schemes, to e4m3 with ``s = absmax / 448``;
16-bit activations pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxmoe.schemes import Scheme

FP8_MAX = 448.0  # largest finite float8 e4m3fn value


@dataclass
class IntWeight:
    """A weight on a scheme's grid: ``w ≈ q·scale + zero`` per group (repeated along K).

    q: [N, K] int32 (signed for sym, unsigned for asym; e4m3 weights are kept as float in ``q``)
    scale, zero: [N, n_groups] float32 (zero is 0 for symmetric grids)
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: Scheme

    def to(self, device) -> "IntWeight":
        """A copy on ``device``."""
        return IntWeight(self.q.to(device), self.scale.to(device), self.zero.to(device), self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the dequantized weight [N, K]."""
        k = self.q.shape[1]
        g = self.scheme.effective_group(k)
        scale = self.scale.repeat_interleave(g, dim=1)[:, :k]  # [N, K]
        zero = self.zero.repeat_interleave(g, dim=1)[:, :k]
        return (self.q.float() * scale + zero).to(dtype)


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """[R, K] -> [R, ceil(K/g), g], padding the last group with its own last value."""
    r, k = x.shape
    pad = (-k) % g
    if pad:
        x = torch.cat([x, x[:, -1:].expand(r, pad)], dim=1)
    return x.reshape(r, -1, g)


def _check_supported(s: Scheme) -> None:
    if s.fmt == "int" and s.symmetric and s.w_bits < 2:
        raise ValueError(f"scheme '{s}': a symmetric grid needs at least 2 bits; use asym for 1-bit weights")


def quantize_weight_int(w: torch.Tensor, s: "Scheme | str") -> IntWeight:
    """Quantize ``w[N, K]`` to integer codes, scales and zero points on scheme ``s``'s grid."""
    s = Scheme.parse(s)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if s.is_full_precision:
        raise ValueError("bf16 is not quantized: there is no integer grid for it")
    _check_supported(s)
    n, k = w.shape
    wf = w.detach().float()
    if s.fp8_weight:
        scale = wf.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [N, 1]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (wf / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return IntWeight(q, scale, torch.zeros_like(scale), s)
    g = s.effective_group(k)
    xg = _grouped(wf, g)  # [N, G, g]
    stored = torch.float16 if s.group_size > 0 else torch.float32  # grouped: 16-bit scale + 16-bit zero
    if s.symmetric:
        qmax = 2 ** (s.w_bits - 1) - 1
        scale = (xg.abs().amax(dim=2) / qmax).to(stored).float()  # [N, G]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(xg / safe[..., None]), -qmax, qmax)
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**s.w_bits - 1
        lo, hi = xg.amin(dim=2), xg.amax(dim=2)  # [N, G]
        lo = lo.to(stored).float()
        scale = ((hi - lo) / qmax).to(stored).float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round((xg - lo[..., None]) / safe[..., None]), 0, qmax)
        zero = lo
    q = q.reshape(n, -1)[:, :k].to(torch.int32)
    return IntWeight(q, scale, zero, s)


def quantize_weight(w: torch.Tensor, s: "Scheme | str") -> torch.Tensor:
    """RTN fake quantization of ``w[N, K]`` with scheme ``s``; same shape and dtype out."""
    s = Scheme.parse(s)
    if s.is_full_precision:
        return w.clone()
    return quantize_weight_int(w, s).dequantize(w.dtype)


def quantize_activation(x: torch.Tensor, s: "Scheme | str") -> torch.Tensor:
    """Symmetric per-token (per token-and-group when g > 0) fake quantization of ``x[..., K]``."""
    s = Scheme.parse(s)
    if s.a_bits >= 16:
        return x
    shape, k = x.shape, x.shape[-1]
    if x.numel() == 0:  # no tokens (an expert nobody was routed to)
        return x
    xf = x.detach().float().reshape(-1, k)  # [T, K]
    g = s.effective_group(k)
    xg = _grouped(xf, g)  # [T, G, g]
    qmax = FP8_MAX if s.fmt == "fp8" else 2 ** (s.a_bits - 1) - 1
    scale = xg.abs().amax(dim=2, keepdim=True) / qmax  # [T, G, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = torch.clamp(xg / safe, -qmax, qmax)
    out = (v.to(torch.float8_e4m3fn).float() if s.fmt == "fp8" else torch.round(v)) * safe
    return out.reshape(xf.shape[0], -1)[:, :k].reshape(shape).to(x.dtype)
