"""The mixed-precision grouped GEMM kernel (Triton): one persistent launch for all experts.

Every expert's output tiles form one global work list, ordered by the host so that experts of the
heaviest scheme come first; program ``p`` takes tiles ``p, p + P, p + 2P, ...`` of it. The tile
list is built inside the kernel from the device-side ``offsets`` (no host synchronisation): each
program computes the tiles per expert as a vector, takes a prefix sum, and finds a tile's expert by
counting prefix sums below it.

Each scheme present in a launch is a *slot*: its parameters are compile-time constants, so each
slot's tile loop is a specialised code path (its own tile shape, dequantisation and dot type),
chosen at run time by a branch on the tile's slot. All slots share ``num_warps``.

Slot kinds:
  BF16    bf16 weight, dot in the activation dtype
  W_INT   b-bit integer weight unpacked in registers, ``(u - off) * s + z``, 16-bit dot
  W_FP8   e4m3 weight upcast, 16-bit dot
  WA_INT  integer weight and per-token (or per token-and-group) int activations, int8 dot
  WA_FP8  e4m3 weight and per-token e4m3 activations, fp8 dot

Under ``TRITON_INTERPRET=1`` (CPU) dots run in float32 on exactly representable values:
the interpreter's bf16 arithmetic and float->fp8 rounding are wrong, so both are emulated.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

BF16, W_INT, W_FP8, WA_INT, WA_FP8 = 0, 1, 2, 3, 4


@triton.jit
def _as_ptr(addr, DTYPE: tl.constexpr):
    """int64 device address -> pointer to DTYPE, 16-byte aligned (ExpertGroup checks the alignment)."""
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _rne(v, INTERPRET: tl.constexpr):
    """Round half to even (torch.round), float32."""
    if INTERPRET:
        return (v + 12582912.0) - 12582912.0  # exact for |v| < 2^22
    else:
        return libdevice.rint(v)


@triton.jit
def _fp8_grid(v, INTERPRET: tl.constexpr):
    """v: float32 in [-448, 448] -> e4m3 (float8e4nv on GPU; its float32 value when interpreting)."""
    if INTERPRET:
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        ulp = ((tl.maximum(e, -6) + 124) << 23).to(tl.float32, bitcast=True)  # 2^(max(e,-6)-3)
        return _rne(v / ulp, INTERPRET) * ulp
    else:
        return v.to(tl.float8e4nv)


@triton.jit
def _load_codes(w_ptr, rk, rn, n_mask, N, KP, WBITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Codes u [BK, BN] (int32) of K rows ``rk`` and columns ``rn`` from the bit-plane layout (pack.py)."""
    blk = rk // 128
    r = rk % 128
    u = tl.zeros([BK, BN], dtype=tl.int32)
    for i in tl.static_range(4):
        P = 8 >> i  # plane width (compile-time)
        if (WBITS & P) != 0:
            LOW = WBITS & ~(2 * P - 1)  # code bits held by wider planes
            C = 16 * P  # bytes per 128-long K block in this plane
            plane = w_ptr + (N * KP // 8) * LOW  # [N, KP * P / 8] bytes
            byte = blk * C + r % C  # [BK]
            ptrs = plane + rn[None, :] * (KP * P // 8) + byte[:, None]
            b = tl.load(ptrs, mask=n_mask[None, :], other=0).to(tl.int32)  # [BK, BN]
            u |= ((b >> ((r // C) * P)[:, None]) & ((1 << P) - 1)) << LOW
    return u


@triton.jit
def _row_amax(x_rows, amax_ptr, rm, m_mask, K, BM: tl.constexpr, BK: tl.constexpr, HAS_AMAX: tl.constexpr):
    """Per-row max |x| over all K for the tile's rows: [BM] float32, given or from a pass over K."""
    if HAS_AMAX:
        return tl.load(amax_ptr + rm, mask=m_mask, other=0.0)
    amax = tl.zeros([BM], dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BK)):
        rk = kt * BK + tl.arange(0, BK)
        a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    return amax


@triton.jit
def _tile(x_ptr, y_ptr, amax_ptr, w_addr, s_addr, z_addr, row0, row1, local, N, K, KP, stride_xm, stride_ym,
          KIND: tl.constexpr, WBITS: tl.constexpr, ABITS: tl.constexpr, GROUP: tl.constexpr,
          SYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          STAGES: tl.constexpr, HAS_AMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """One [BM, BN] output tile of one expert (rows row0:row1), specialised on its scheme."""
    mt = tl.cdiv(row1 - row0, BM)
    rm = row0 + (local % mt) * BM + tl.arange(0, BM)  # [BM] rows of x / y
    rn = (local // mt) * BN + tl.arange(0, BN)  # [BN] output columns
    m_mask = rm < row1
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    cdt: tl.constexpr = tl.float32 if INTERPRET else x_ptr.dtype.element_ty  # 16-bit dot operand type
    nk = tl.cdiv(K, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)

    if KIND == 0:  # BF16
        wp = _as_ptr(w_addr, tl.bfloat16)
        w_cols = wp + rn.to(tl.int64)[None, :] * K  # [1, BN]
        for kt in tl.range(0, nk, num_stages=STAGES):
            rk = kt * BK + tl.arange(0, BK)
            k_mask = rk < K
            a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_cols + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a.to(cdt), b.to(cdt), acc)
    elif KIND == 1 or KIND == 2:  # W_INT, W_FP8: dequantise in registers, 16-bit dot
        wp = _as_ptr(w_addr, tl.uint8)
        if GROUP < 0:
            sc = tl.load(_as_ptr(s_addr, tl.float32) + rn, mask=n_mask, other=0.0)  # [BN]
            if not SYM:
                zr = tl.load(_as_ptr(z_addr, tl.float32) + rn, mask=n_mask, other=0.0)
        for kt in tl.range(0, nk, num_stages=STAGES):
            rk = kt * BK + tl.arange(0, BK)
            a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K), other=0.0)
            if GROUP > 0:
                g = (kt * BK) // GROUP
                sc = tl.load(_as_ptr(s_addr, tl.float16) + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
                if not SYM:
                    zr = tl.load(_as_ptr(z_addr, tl.float16) + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            if KIND == 2:
                u = _load_codes(wp, rk, rn, n_mask, N, KP, 8, BK, BN)
                w = u.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc[None, :]
            else:
                u = _load_codes(wp, rk, rn, n_mask, N, KP, WBITS, BK, BN)
                if SYM:
                    w = (u - (1 << (WBITS - 1))).to(tl.float32) * sc[None, :]
                else:
                    w = u.to(tl.float32) * sc[None, :] + zr[None, :]
            acc = tl.dot(a.to(cdt), w.to(cdt), acc)
    elif KIND == 3:  # WA_INT: int activations x int weights, int8 dot
        wp = _as_ptr(w_addr, tl.uint8)
        QMAX: tl.constexpr = (1 << (ABITS - 1)) - 1
        if GROUP < 0:
            amax = _row_amax(x_rows, amax_ptr, rm, m_mask, K, BM, BK, HAS_AMAX)
            sx = tl.where(amax > 0, amax / QMAX, 1.0)  # [BM]
            acc_i = tl.zeros([BM, BN], dtype=tl.int32)
        for kt in tl.range(0, nk, num_stages=STAGES):
            rk = kt * BK + tl.arange(0, BK)
            a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K), other=0.0).to(tl.float32)
            if GROUP > 0:  # one activation group per K tile (BK == GROUP)
                gmax = tl.max(tl.abs(a), axis=1)
                sx = tl.where(gmax > 0, gmax / QMAX, 1.0)
            qa = _rne(tl.math.div_rn(a, sx[:, None]), INTERPRET)
            qa = tl.minimum(tl.maximum(qa, -QMAX), QMAX).to(tl.int8)  # [BM, BK]
            qw = (_load_codes(wp, rk, rn, n_mask, N, KP, WBITS, BK, BN) - (1 << (WBITS - 1))).to(tl.int8)
            if GROUP > 0:
                sw = tl.load(_as_ptr(s_addr, tl.float16) + (kt * BK // GROUP) * N + rn, mask=n_mask, other=0.0).to(tl.float32)
                acc += tl.dot(qa, qw, out_dtype=tl.int32).to(tl.float32) * sx[:, None] * sw[None, :]
            else:
                acc_i = tl.dot(qa, qw, acc_i, out_dtype=tl.int32)
        if GROUP < 0:
            sw = tl.load(_as_ptr(s_addr, tl.float32) + rn, mask=n_mask, other=0.0)
            acc = acc_i.to(tl.float32) * sx[:, None] * sw[None, :]
    else:  # WA_FP8: per-token e4m3 activations x e4m3 weights
        wp = _as_ptr(w_addr, tl.uint8)
        amax = _row_amax(x_rows, amax_ptr, rm, m_mask, K, BM, BK, HAS_AMAX)
        sx = tl.where(amax > 0, amax / 448.0, 1.0)  # [BM]
        for kt in tl.range(0, nk, num_stages=STAGES):
            rk = kt * BK + tl.arange(0, BK)
            a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K), other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(tl.math.div_rn(a, sx[:, None]), -448.0), 448.0)
            qa = _fp8_grid(v, INTERPRET)
            qw = tl.load(wp + rn[None, :] * KP + rk[:, None], mask=n_mask[None, :], other=0).to(tl.float8e4nv, bitcast=True)
            if INTERPRET:
                qw = qw.to(tl.float32)
            acc = tl.dot(qa, qw, acc)
        sw = tl.load(_as_ptr(s_addr, tl.float32) + rn, mask=n_mask, other=0.0)
        acc = acc * sx[:, None] * sw[None, :]

    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def group_gemm_kernel(x_ptr, y_ptr, amax_ptr, off_ptr, sched_ptr, addr_ptr, E, N, K, KP, stride_xm, stride_ym,
                      KINDS: tl.constexpr, WBITS: tl.constexpr, ABITS: tl.constexpr, GROUPS: tl.constexpr,
                      SYMS: tl.constexpr, BMS: tl.constexpr, BNS: tl.constexpr, BKS: tl.constexpr,
                      STAGES: tl.constexpr, NSLOTS: tl.constexpr, E_PAD: tl.constexpr,
                      HAS_AMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """Persistent grouped GEMM over all experts (see module docstring).

    x: [T, K]; y: [T, N]; amax: [T] float32 max |x| per row (read when HAS_AMAX); off: [E+1] int32;
    sched: [E, 2] int32 (expert, slot) in schedule order; addr: [E, 3] int64 (codes, scale, zero) per expert.
    """
    pid = tl.program_id(0)
    pos = tl.arange(0, E_PAD)
    valid = pos < E
    eid = tl.load(sched_ptr + pos * 2, mask=valid, other=0)
    slot = tl.load(sched_ptr + pos * 2 + 1, mask=valid, other=0)
    rows = tl.load(off_ptr + eid + 1, mask=valid, other=0) - tl.load(off_ptr + eid, mask=valid, other=0)
    tiles = tl.zeros([E_PAD], dtype=tl.int32)
    for s in tl.static_range(NSLOTS):
        per = tl.cdiv(rows, BMS[s]) * tl.cdiv(N, BNS[s])
        tiles = tl.where(slot == s, per, tiles)
    tiles = tl.where(valid, tiles, 0)
    ends = tl.cumsum(tiles, 0)  # [E_PAD] inclusive prefix sums
    total = tl.sum(tiles, 0)
    for t in range(pid, total, tl.num_programs(0)):
        done = ends <= t
        p = tl.sum(done.to(tl.int32), 0)  # schedule position of tile t
        local = t - tl.sum(tl.where(done, tiles, 0), 0)
        e = tl.load(sched_ptr + p * 2)
        sl = tl.load(sched_ptr + p * 2 + 1)
        row0 = tl.load(off_ptr + e)
        row1 = tl.load(off_ptr + e + 1)
        w_addr = tl.load(addr_ptr + e * 3)
        s_addr = tl.load(addr_ptr + e * 3 + 1)
        z_addr = tl.load(addr_ptr + e * 3 + 2)
        for s in tl.static_range(NSLOTS):
            if sl == s:
                _tile(x_ptr, y_ptr, amax_ptr, w_addr, s_addr, z_addr, row0, row1, local, N, K, KP, stride_xm, stride_ym,
                      KINDS[s], WBITS[s], ABITS[s], GROUPS[s], SYMS[s], BMS[s], BNS[s], BKS[s], STAGES[s],
                      HAS_AMAX, INTERPRET)
