"""Dynamic per-row activation quantization for the weight-activation experts of a grouped GEMM.

Each row of ``x`` belongs to one expert; a row of a weight-activation expert is quantized once,
here, with that expert's scheme (symmetric per token, or per token and 128-long group; int or e4m3),
into ``q`` (uint8 bytes: int8 codes or e4m3 bits) and ``scale`` (float32, one per row and group).
The GEMM then reads 8-bit rows instead of re-quantizing them for every output tile. This is the
work the token gather of an MoE layer does in passing (it reads every row anyway); as a standalone
call it is one extra launch. Math matches ``mxmoe.quant.quantize_activation`` (round half to even,
``x / scale`` in IEEE division, scale 1 for an all-zero row or group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mxmoe.env import device_guard


@dataclass
class QuantizedRows:
    """Rows of x quantized for their experts: q [T, K] uint8 codes, scale [T, ceil(K/128)] float32."""

    q: torch.Tensor
    scale: torch.Tensor


@triton.jit
def _rne(v, INTERPRET: tl.constexpr):
    """Round half to even (torch.round), float32."""
    if INTERPRET:
        return (v + 12582912.0) - 12582912.0  # exact for |v| < 2^22
    else:
        return libdevice.rint(v)


@triton.jit
def _to_fp8_bits(v, INTERPRET: tl.constexpr):
    """v: float32 in [-448, 448] -> e4m3 bits (uint8), round half to even."""
    if INTERPRET:  # the interpreter's float->fp8 rounding drops mantissa carries: round on the grid first
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ulp = ((tl.maximum(e, -6) + 124) << 23).to(tl.float32, bitcast=True)  # 2^(max(e,-6)-3)
        v = _rne(v / ulp, INTERPRET) * ulp
    return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _quant_chunk(x, scale, FP8: tl.constexpr, QMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """x: [C] float32, scale > 0 -> uint8 codes [C]."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if FP8:
        return _to_fp8_bits(v, INTERPRET)
    else:
        return _rne(v, INTERPRET).to(tl.int8).to(tl.uint8, bitcast=True)


@triton.jit
def _quant_row(xr, qr, sr, K, FP8: tl.constexpr, ABITS: tl.constexpr, GROUP: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize one row xr[0:K] into qr (bytes) and sr (scales, one per 128 group or one per row)."""
    QMAX: tl.constexpr = 448.0 if FP8 else (1 << (ABITS - 1)) - 1
    rk = tl.arange(0, 128)
    if GROUP < 0:
        amax = tl.zeros([128], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, 128)):
            x = tl.load(xr + kb * 128 + rk, mask=kb * 128 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, 0)
        scale = tl.where(m > 0, m / QMAX, 1.0)
        tl.store(sr, scale)
    for kb in range(0, tl.cdiv(K, 128)):
        mask = kb * 128 + rk < K
        x = tl.load(xr + kb * 128 + rk, mask=mask, other=0.0).to(tl.float32)
        if GROUP > 0:
            m = tl.max(tl.abs(x), 0)
            scale = tl.where(m > 0, m / QMAX, 1.0)
            tl.store(sr + kb, scale)
        tl.store(qr + kb * 128 + rk, _quant_chunk(x, scale, FP8, QMAX, INTERPRET), mask=mask)


@triton.jit
def quantize_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    off_ptr,
    slot_ptr,
    E,
    K,
    NG,
    stride_xm,
    FP8S: tl.constexpr,
    ABITS: tl.constexpr,
    GROUPS: tl.constexpr,
    NSLOTS: tl.constexpr,
    E_PAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program r quantizes row r with the scheme of its expert (slot_ptr[e] < 0: weight-only, skipped)."""
    r = tl.program_id(0)
    pos = tl.arange(0, E_PAD)
    ends = tl.load(off_ptr + 1 + pos, mask=pos < E, other=2**30)
    e = tl.sum((ends <= r).to(tl.int32), 0)  # expert of row r
    sl = tl.load(slot_ptr + e)
    for s in tl.static_range(NSLOTS):
        if sl == s:
            _quant_row(
                x_ptr + r.to(tl.int64) * stride_xm,
                q_ptr + r.to(tl.int64) * K,
                s_ptr + r.to(tl.int64) * NG,
                K,
                FP8S[s],
                ABITS[s],
                GROUPS[s],
                INTERPRET,
            )


def quantize_rows(
    x: torch.Tensor, offsets: torch.Tensor, act_slot: torch.Tensor, schemes: tuple, interpret: bool
) -> QuantizedRows:
    """Quantize the rows of weight-activation experts. x: [T, K]; offsets: [E+1] int32;
    act_slot: [E] int32 index into ``schemes`` (the distinct weight-activation schemes), -1 for none."""
    t, k = x.shape
    ng = -(-k // 128)
    q = torch.empty(t, k, dtype=torch.uint8, device=x.device)
    s = torch.empty(t, ng, dtype=torch.float32, device=x.device)
    if t == 0 or not schemes:
        return QuantizedRows(q, s)
    e = act_slot.numel()
    with device_guard(x.device):  # Triton launches on the current GPU: make it x's
        quantize_rows_kernel[(t,)](
            x,
            q,
            s,
            offsets,
            act_slot,
            e,
            k,
            ng,
            x.stride(0),
            FP8S=tuple(sc.fmt == "fp8" for sc in schemes),
            ABITS=tuple(sc.a_bits for sc in schemes),
            GROUPS=tuple(sc.group_size for sc in schemes),
            NSLOTS=len(schemes),
            E_PAD=max(16, 1 << (e - 1).bit_length()),
            INTERPRET=interpret,
            num_warps=1,
        )
    return QuantizedRows(q, s)
