"""The mixed-precision grouped GEMM kernel (Triton): one persistent launch for all experts.

Every expert's output tiles form one global work list, ordered by the host so that experts of the
heaviest scheme come first; program ``p`` takes tiles ``p, p + P, p + 2P, ...`` of it. The tile
list is built inside the kernel from the device-side ``offsets`` (no host synchronisation): each
program computes the tiles per expert as a vector, takes a prefix sum, and finds a tile's expert by
counting prefix sums below it.

Each scheme present in a launch is a *slot*: its parameters are compile-time constants, so each
slot's tile loop is a specialised code path (its own tile shape, unpacking and dot type), chosen
at run time by a branch on the tile's slot. All slots share ``num_warps``.

Slot kinds:
  BF16    bf16 weight, dot in the activation dtype; its 128-row tiles load x and the weight by TMA
          (``TMA``: tensor descriptors made on the device) where K is a multiple of 8
  W_INT   b-bit integer weight dequantized in registers (``w = s q + z``, 16-bit, scale and zero of
          the weight's group, q centred on 0), 16-bit dot
  W_FP8   e4m3 weight upcast to 16 bits and scaled in registers, 16-bit dot
  WA_INT  integer weight x int8 activations (quantized per row by act_quant.py), int8 dot
  WA_FP8  e4m3 weight, or narrow symmetric integer codes converted exactly to e4m3 (w4a8 fp8), x e4m3
          activations, fp8 dot (fp32 accumulator)
  Grouped weight-activation schemes promote the partial sum of every 128-long K block into the fp32
  accumulator with that block's activation and weight scales; per-channel ones scale in the epilogue.
  8-bit weight-activation codes are stored as the dot's operand type and go from memory to the MMA
  as loaded; narrower codes are unpacked in registers.

Weight-only packed slots, and fp8 slots with codes narrower than 8 bits, may compute the transposed
tile (``SWAP``: y^T = W x^T) so that the unpacked weight is the dot's A operand, which wgmma reads from
registers (B must sit in shared memory), and a few token rows fill the MMA's N instead of padding its
M to 64.

Packed weights are read one 128-long K block at a time: each bit plane's bytes are loaded once and
unpacked with compile-time shifts into slices of ``16 * widest plane`` K rows, one dot per slice, so no
byte is loaded twice. Codes become bf16 without an int->float convert: ``bits(0x4300 | u) = 128 + u`` for
``u < 128``, then one exact bf16 subtraction and one fused multiply-add with the group's scale and zero
point (rounded to the dot type, like the weight).
2- to 4-bit weight-only codes (w2a16-w4a16, the memory-bound case) are stored in wgmma fragment order
instead (``pack.py``): each thread loads the 64 codes of its A fragment for a K block with 16-byte loads,
inline PTX turns every 32-bit word into bf16 pairs (7 instructions per 8 4-bit codes, 7.5 per 8 2-bit
codes, 16 per 8 3-bit codes), and reshapes that the compiler resolves without moving data restore the
[BN, 128] tile for one K=128 dot per block (``_fragment_values``; results/kernels/NOTES.md has the
timings). Grouped asymmetric ones keep each group's scale and zero point in one 32-bit word
(``_scale_zero_pair``), pipelined with the codes. The 4-bit codes of fp8 schemes (w4a8 fp8) are stored
in the fp8 MMA's fragment order as sign and magnitude: masked into place, each 32-bit word is two e4m3
registers of the A operand holding the codes over 512 as subnormals (``_e4m3_fragment_values``, 3
instructions per 8 codes), and the kernel takes the weight scale 512 times.

Under ``TRITON_INTERPRET=1`` (CPU) 16-bit dots run in float32 on the same exactly representable
values: the interpreter's bf16 arithmetic is wrong; fp8 is upcast likewise.
"""

from __future__ import annotations

import triton
import triton.language as tl

BF16, W_INT, W_FP8, WA_INT, WA_FP8 = 0, 1, 2, 3, 4


@triton.jit
def _as_ptr(addr, DTYPE: tl.constexpr):
    """int64 device address -> pointer to DTYPE, 16-byte aligned (ExpertGroup checks the alignment)."""
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _plane(
    w_ptr,
    kb,
    rn,
    n_mask,
    N,
    KP,
    WBITS: tl.constexpr,
    P: tl.constexpr,
    T: tl.constexpr = False,
    SIGNED: tl.constexpr = False,
):
    """Bytes [16 P, BN] (int32; [BN, 16 P] when T) of the P-bit plane for 128-long K block kb;
    0 when WBITS has no such plane. SIGNED: the bytes are int8 (the 8-bit plane of a symmetric scheme)."""
    if (WBITS & P) != 0:
        LOW: tl.constexpr = WBITS & ~(2 * P - 1)  # code bits held by wider planes
        plane = w_ptr + (N * KP // 8) * LOW + kb * (16 * P)  # [N, KP * P / 8] bytes
        if SIGNED:
            plane = plane.to(tl.pointer_type(tl.int8))
        if T:
            ptrs = plane + rn[:, None] * (KP * P // 8) + tl.arange(0, 16 * P)[None, :]
            return tl.load(ptrs, mask=n_mask[:, None], other=0).to(tl.int32)
        else:
            ptrs = plane + rn[None, :] * (KP * P // 8) + tl.arange(0, 16 * P)[:, None]
            return tl.load(ptrs, mask=n_mask[None, :], other=0).to(tl.int32)
    else:
        return 0


@triton.jit
def _fragment_bytes(w_ptr, kb, rq, N, W: tl.constexpr):
    """Bytes [BN / 4, W] (uint8) of fragment-order codes (pack.py) for 128-long K block kb, W bytes per byte row
    (256 for 4-bit codes, 128 for a 2-bit plane, 64 for a 1-bit plane): byte rows rq (the tile's output rows
    16 a .. 16 a + 15 are byte rows 4 a .. 4 a + 3), contiguous in memory."""
    rows = tl.cdiv(N, 16) * 4  # byte rows per K block
    ptrs = w_ptr + (kb * rows).to(tl.int64) * W + rq[:, None] * W + tl.arange(0, W)[None, :]
    return tl.load(ptrs, mask=(rq < rows)[:, None], other=0)


@triton.jit
def _field(
    b, j: tl.constexpr, WBITS: tl.constexpr, P: tl.constexpr, CW: tl.constexpr, BN: tl.constexpr, T: tl.constexpr
):
    """K rows [j CW, (j+1) CW) of the P-bit plane field of the code, shifted into place: [CW, BN] int32
    ([BN, CW] when T)."""
    if (WBITS & P) == 0:
        return 0
    else:
        LOW: tl.constexpr = WBITS & ~(2 * P - 1)
        C: tl.constexpr = 16 * P
        if P == 8:  # the whole byte (sign-extended when the plane is signed)
            return b
        elif C == CW:
            return ((b >> (j * P)) & ((1 << P) - 1)) << LOW
        else:  # a narrower plane: this slice spans CW // C of its byte blocks, each at its own shift
            R: tl.constexpr = CW // C
            shift = (j * R + tl.arange(0, R)) * P
            if T:
                t = (b[:, None, :] >> shift[None, :, None]) & ((1 << P) - 1)  # [BN, R, C]
                return tl.reshape(t, [BN, CW]) << LOW
            else:
                t = (b[None, :, :] >> shift[:, None, None]) & ((1 << P) - 1)  # [R, C, BN]
                return tl.reshape(t, [CW, BN]) << LOW


@triton.jit
def _codes(
    b8, b4, b2, b1, j: tl.constexpr, WBITS: tl.constexpr, CW: tl.constexpr, BN: tl.constexpr, T: tl.constexpr = False
):
    """Codes u [CW, BN] int32 ([BN, CW] when T) of slice j from the bytes of each present plane."""
    if T:
        u = tl.zeros([BN, CW], dtype=tl.int32)
    else:
        u = tl.zeros([CW, BN], dtype=tl.int32)
    u |= _field(b8, j, WBITS, 8, CW, BN, T)
    u |= _field(b4, j, WBITS, 4, CW, BN, T)
    u |= _field(b2, j, WBITS, 2, CW, BN, T)
    u |= _field(b1, j, WBITS, 1, CW, BN, T)
    return u


@triton.jit
def _asm_halves(v):
    """Values v [R, 64 words, 8 positions] -> the two [R, 256] outputs of a 4-packed asm that returns positions
    0-3 and 4-7 of word m at 4 m .. 4 m + 3: how the interpreter stands in for the inline PTX."""
    R: tl.constexpr = v.shape[0]
    lo, hi = tl.split(tl.permute(tl.reshape(v, [R, 64, 2, 4]), (0, 1, 3, 2)))  # [R, 64, 4] each
    return tl.reshape(lo, [R, 256]), tl.reshape(hi, [R, 256])


NIBBLE_ASM: tl.constexpr = tl.constexpr(
    """{
    .reg .b32 t;
    lop3.b32 $0, $4, 0x000f000f, 0x43004300, 0xea;
    shr.b32 t, $4, 4;
    lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;
    shr.b32 t, $4, 8;
    lop3.b32 $2, t, 0x000f000f, 0x43004300, 0xea;
    shr.b32 t, $4, 12;
    lop3.b32 $3, t, 0x000f000f, 0x43004300, 0xea;
    }"""
)


@triton.jit
def _nibble_values(b, INTERPRET: tl.constexpr):
    """Bytes b [R, 256] of fragment-order 4-bit codes -> 128 + code [4 R, 128] in (output row, K) order;
    bf16 (float32 under the interpreter), exact.

    On the GPU, inline PTX turns each 32-bit word (8 codes, nibble 4 (t % 2) + t // 2 holding position t)
    into four bf16 pairs (positions 0-1, 2-3, 4-5, 6-7) with three shifts and four 3-input logic ops
    (``bits(0x4300 | u) = 128 + u``); the reshapes then undo the fragment order (pack.py). On sm_90a the
    compiler keeps every thread's values where they were loaded: the K loop reads the codes with four
    16-byte shared-memory loads per thread and shuffles none of them (``mxmoe bench sass``)."""
    R: tl.constexpr = b.shape[0]
    if INTERPRET:
        word = tl.sum(tl.reshape(b.to(tl.int32), [R, 64, 4]) << (8 * tl.arange(0, 4))[None, None, :], axis=2)  # [R, 64]
        t = tl.arange(0, 8)
        v = ((word[:, :, None] >> (4 * (4 * (t % 2) + t // 2))[None, None, :]) & 15).to(tl.float32) + 128.0
        p03, p47 = _asm_halves(v)  # what the asm returns
    else:
        p03, p47 = tl.inline_asm_elementwise(
            asm=NIBBLE_ASM,
            constraints="=r,=r,=r,=r,r",
            args=[b],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=4,
        )
    # p03, p47 [R, 256]: positions 0-3 / 4-7 of word m at 4 m .. 4 m + 3
    v = tl.reshape(tl.permute(tl.reshape(tl.join(p03, p47), [R, 64, 4, 2]), (0, 1, 3, 2)), [R, 512])
    # position q = 256 c + 128 d + 32 e + 4 f + 2 g + h of byte row 4 a + b is row 16 a + 8 g + 2 b + d, K 64 c + 8 f + 2 e + h
    v = tl.permute(tl.reshape(v, [R // 4, 4, 2, 2, 4, 8, 2, 2]), (0, 6, 1, 3, 2, 5, 4, 7))
    return tl.reshape(v, [4 * R, 128])


def _pair_asm(hi: bool) -> str:
    """PTX: one 32-bit word of 16 2-bit fields ($8; position t at field 8 (t % 2) + t // 2) -> eight bf16 pairs
    $0..$7 (pair j = positions 2 j, 2 j + 1) of 128 + u, 15 instructions; with ``hi``, bit 2 of each u comes
    from $9 (bits j and 16 + j: positions 2 j and 2 j + 1), 4 more per pair."""
    lines = []
    for j in range(8):
        src = "$8" if j == 0 else "t"
        if j:
            lines.append(f"shr.b32 t, $8, {2 * j};")
        if hi:
            lines.append(f"lop3.b32 t, {src}, 0x00030003, 0x43004300, 0xea;")
            shift = "mov.b32 h, $9;" if j == 2 else f"shl.b32 h, $9, {2 - j};" if j < 2 else f"shr.b32 h, $9, {j - 2};"
            lines.append(shift)
            lines.append(f"lop3.b32 ${j}, t, h, 0x00040004, 0xf8;")
        else:
            lines.append(f"lop3.b32 ${j}, {src}, 0x00030003, 0x43004300, 0xea;")
    return "{\n.reg .b32 t, h;\n" + "\n".join(lines) + "\n}"


PAIR_ASM, PAIR_HI_ASM = tl.constexpr(_pair_asm(False)), tl.constexpr(_pair_asm(True))


@triton.jit
def _pair_values(lo, hi, HI: tl.constexpr, INTERPRET: tl.constexpr):
    """Bytes lo [R, 128] of a fragment-order 2-bit plane (and, when HI, hi [R, 64] of the 1-bit plane above
    it) -> 128 + code [4 R, 128] in (output row, K) order; bf16 (float32 under the interpreter), exact.

    Word m of a byte row holds 16 codes, position t at 2-bit field 8 (t % 2) + t // 2; bit t // 2 of
    byte 2 m + t % 2 of the 1-bit plane is bit 2 of the same code (pack.py). On the GPU, inline PTX turns a
    word into eight bf16 pairs (``_pair_asm``); the 1-bit plane reaches it with each byte twice, so the
    asm's second register holds the bits of positions 2 j and 2 j + 1 at bits j and 16 + j."""
    R: tl.constexpr = lo.shape[0]
    if INTERPRET:
        word = tl.sum(tl.reshape(lo.to(tl.int32), [R, 32, 4]) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
        t = tl.arange(0, 16)
        u = (word[:, :, None] >> (2 * (8 * (t % 2) + t // 2))[None, None, :]) & 3  # [R, 32 words, 16 positions]
        if HI:
            h0, h1 = tl.split(tl.reshape(hi.to(tl.int32), [R, 32, 2]))  # [R, 32] each: positions with t % 2 = 0 / 1
            hb = tl.where((t % 2 == 0)[None, None, :], h0[:, :, None], h1[:, :, None])  # [R, 32, 16]
            u |= ((hb >> (t // 2)[None, None, :]) & 1) << 2
        # what the asm returns: o_k [R, 128] holds positions 4 k .. 4 k + 3 of word m at 4 m .. 4 m + 3
        v = tl.permute(
            tl.reshape(u.to(tl.float32) + 128.0, [R, 32, 2, 2, 4]), (0, 1, 4, 3, 2)
        )  # [R, m, p, k % 2, k // 2]
        o01, o23 = tl.split(v)
        o0, o1 = tl.split(o01)
        o2, o3 = tl.split(o23)
        o0, o1, o2, o3 = (
            tl.reshape(o0, [R, 128]),
            tl.reshape(o1, [R, 128]),
            tl.reshape(o2, [R, 128]),
            tl.reshape(o3, [R, 128]),
        )
    else:
        if HI:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                asm=PAIR_HI_ASM,
                constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r",
                args=[lo, tl.reshape(tl.join(hi, hi), [R, 128])],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )
        else:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                asm=PAIR_ASM,
                constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
                args=[lo],
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )  # [R, 128] each: o_k holds positions 4 k .. 4 k + 3 of word m at 4 m .. 4 m + 3
    v = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [R, 128, i, j]: o_(2 j + i)
    v = tl.reshape(tl.permute(tl.reshape(v, [R, 32, 4, 2, 2]), (0, 1, 4, 3, 2)), [R, 512])  # [R, m, j, i, p]
    # position t = 4 fl + 2 g + h of word m = 16 d + 4 e + 2 c + fh in byte row 4 a + b is
    # row 16 a + 8 g + 2 b + d, K 64 c + 32 fh + 8 fl + 2 e + h
    v = tl.permute(tl.reshape(v, [R // 4, 4, 2, 4, 2, 2, 4, 2, 2]), (0, 7, 1, 2, 4, 5, 6, 3, 8))
    return tl.reshape(v, [4 * R, 128])


# Sign-and-magnitude 4-bit codes (pack.py) -> two registers of four e4m3 bytes s0000mmm = q / 512: the word
# masked, and the word rotated by 4 bits masked (each mask keeps magnitude bits 0-2 and the sign bit 7 of a byte).
E4M3_ASM: tl.constexpr = tl.constexpr(
    """{
    and.b32 $0, $2, 0x87878787;
    shf.r.wrap.b32 $1, $2, $2, 4;
    and.b32 $1, $1, 0x87878787;
    }"""
)
# the e4m3 weight bytes are the codes over 512 (subnormals): the weight scale is taken this many times (exact)
E4M3_CODE_SCALE: tl.constexpr = tl.constexpr(512.0)


@triton.jit
def _e4m3_fragment_values(b, INTERPRET: tl.constexpr):
    """Bytes b [R, 256] of fp8-fragment-order symmetric 4-bit codes -> q / 512 [4 R, 128] in (output row, K)
    order, e4m3 subnormals (float32 under the interpreter), exact.

    Word W = 32 c + 16 d + 4 e + 2 s + p of byte row 4 a + b holds the codes of rows 16 a + 2 b + d (g = 0)
    and + 8 (g = 1) at K 64 c + 32 s + 16 p + 4 e + j as sign and magnitude (pack.py): a thread of the fp8
    warpgroup MMA's A operand holds each output register's 4 bytes (one row, j = 0..3) in one word. On the
    GPU, three instructions per word (``E4M3_ASM``) make the two registers."""
    R: tl.constexpr = b.shape[0]
    if INTERPRET:
        word = tl.sum(tl.reshape(b.to(tl.int32), [R, 64, 4]) << (8 * tl.arange(0, 4))[None, None, :], axis=2)
        t = tl.arange(0, 8)  # position 4 g + j
        g, j = t // 4, t % 4
        mag = (word[:, :, None] >> (8 * j + 4 * g)[None, None, :]) & 7  # [R, 64 words, 8 (g, j)]
        sign = (word[:, :, None] >> tl.where(g == 0, 8 * j + 7, 8 * ((j + 1) % 4) + 3)[None, None, :]) & 1
        o0, o1 = _asm_halves(tl.where(sign == 1, -mag, mag).to(tl.float32) / 512.0)  # what the asm returns
    else:
        o0, o1 = tl.inline_asm_elementwise(
            asm=E4M3_ASM,
            constraints="=r,=r,r",
            args=[b],
            dtype=(tl.float8e4nv, tl.float8e4nv),
            is_pure=True,
            pack=4,
        )
    # o0, o1 [R, 256]: row g = 0 / 1, position j of word W at 4 W + j
    v = tl.reshape(tl.join(o0, o1), [R, 64, 4, 2])  # [R, W, j, g]
    # dims a, b | W = (c, d, e, s, p) | j, g -> row 16 a + 8 g + 2 b + d, K 64 c + 32 s + 16 p + 4 e + j
    v = tl.permute(tl.reshape(v, [R // 4, 4, 2, 2, 4, 2, 2, 4, 2]), (0, 8, 1, 3, 2, 5, 6, 4, 7))
    return tl.reshape(v, [4 * R, 128])


@triton.jit
def _fragment_values(w_ptr, kb, rq, N, KP, WBITS: tl.constexpr, INTERPRET: tl.constexpr):
    """128 + code [BN, 128] of the tile's rows for K block kb from fragment-order storage of WBITS-bit codes:
    a 4-bit array, or a 2-bit plane followed (3 bits) by a 1-bit plane (pack.py)."""
    if WBITS == 4:
        return _nibble_values(_fragment_bytes(w_ptr, kb, rq, N, 256), INTERPRET)
    else:
        lo = _fragment_bytes(w_ptr, kb, rq, N, 128)
        if WBITS == 3:
            hi_ptr = w_ptr + (tl.cdiv(N, 16) * 4).to(tl.int64) * KP  # after the 2-bit plane's K_pad / 128 blocks
            return _pair_values(lo, _fragment_bytes(hi_ptr, kb, rq, N, 64), True, INTERPRET)
        else:
            return _pair_values(lo, 0, False, INTERPRET)


@triton.jit
def _load_x(ptr, rm, m_mask, stride, k0, K, W: tl.constexpr, T: tl.constexpr = False):
    """Rows rm, columns k0 .. k0 + W (zero past K) of a row-major [T, stride] matrix: [BM, W] ([W, BM] when T)."""
    rk = k0 + tl.arange(0, W)
    if T:
        return tl.load(
            ptr + rm.to(tl.int64)[None, :] * stride + rk[:, None], mask=m_mask[None, :] & (rk[:, None] < K), other=0.0
        )
    else:
        return tl.load(
            ptr + rm.to(tl.int64)[:, None] * stride + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K), other=0.0
        )


@triton.jit
def _scale_zero(
    s_addr, z_addr, g, rn, n_mask, N, SDT: tl.constexpr, SYM: tl.constexpr, OFF: tl.constexpr, cdt: tl.constexpr
):
    """Scale s and zero point [BN] of weight group g (stored [n_groups, N] in SDT), in the dot type; zero 0
    when SYM. Asymmetric: the zero point of the centred code q = u - OFF, z + OFF s (near 0, so its
    rounding to 16 bits costs little, unlike z, which is about -OFF s)."""
    sc = tl.load(_as_ptr(s_addr, SDT) + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
    if SYM:
        return sc.to(cdt), 0
    else:
        zr = tl.load(_as_ptr(z_addr, SDT) + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        return sc.to(cdt), (zr + OFF * sc).to(cdt)


@triton.jit
def _scale_zero_pair(s_addr, g, rn, n_mask, N, OFF: tl.constexpr, cdt: tl.constexpr):
    """Scale s and zero point z + OFF s [BN] (as ``_scale_zero``) of weight group g, in the dot type, from the
    float16 (s, z) pairs stored [n_groups, N, 2] (pack.py): one 32-bit load per row, pipelined like the codes."""
    pair = tl.load(_as_ptr(s_addr, tl.int32) + g * N + rn, mask=n_mask, other=0)  # [BN] bits z << 16 | s
    sc = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zr = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return sc.to(cdt), (zr + OFF * sc).to(cdt)


@triton.jit
def _block_codes(b4, b2, b1, WBITS: tl.constexpr, BN: tl.constexpr):
    """Codes u [BN, 128] int32 of a whole 128-long K block from the bytes [BN, 16 P] of each present plane
    (``_plane`` with T) narrower than 8 bits: the slices of ``_codes`` side by side."""
    CW: tl.constexpr = 64 if WBITS >= 4 else 32 if WBITS >= 2 else 16
    if CW == 64:
        u = tl.join(_codes(0, b4, b2, b1, 0, WBITS, CW, BN, True), _codes(0, b4, b2, b1, 1, WBITS, CW, BN, True))
        return tl.reshape(tl.permute(u, (0, 2, 1)), [BN, 128])  # [BN, 2 slices, 64]
    else:
        lo = tl.join(_codes(0, b4, b2, b1, 0, WBITS, CW, BN, True), _codes(0, b4, b2, b1, 1, WBITS, CW, BN, True))
        hi = tl.join(_codes(0, b4, b2, b1, 2, WBITS, CW, BN, True), _codes(0, b4, b2, b1, 3, WBITS, CW, BN, True))
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 3, 2, 1)), [BN, 128])  # [BN, 4 slices, 32]


@triton.jit
def _dequant(
    u,
    sc,
    zr,
    KIND: tl.constexpr,
    WBITS: tl.constexpr,
    OFF: tl.constexpr,
    SYM: tl.constexpr,
    T: tl.constexpr,
    cdt: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Weight values s q + z [CW, BN] ([BN, CW] when T) in the dot type from codes u; sc, zr: [BN]."""
    if KIND == 2:
        q = u.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(cdt)
    elif WBITS < 8:  # bits(0x4300 | u) is the bf16 value 128 + u: no int->float convert
        wb = (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        if INTERPRET:
            q = wb.to(tl.float32) - (128 + OFF)
        else:
            q = (wb - (128 + OFF)).to(cdt)  # exact
    else:
        q = (u - OFF).to(cdt)  # 8-bit codes: integers in [-128, 127], exact in 16 bits
    return _scaled(q, sc, zr, SYM, T)


@triton.jit
def _e4m3_codes(u, OFF: tl.constexpr, INTERPRET: tl.constexpr):
    """Centred integer codes q = u - OFF [CW, BN] (|q| <= 15) as fp8 dot operands: e4m3 on the GPU, exact
    (bits(0x6400 | u) is the fp16 value 1024 + u, one exact fp16 subtraction, one fp16 -> e4m3 convert);
    float32 under the interpreter, which upcasts fp8 dots."""
    if INTERPRET:
        return (u - OFF).to(tl.float32)
    else:
        h = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024 + OFF)
        return h.to(tl.float8e4nv)


@triton.jit
def _fp8_mma(qa, qw, acc, T: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + qa qw for activation codes qa [BM, CW] and e4m3 weights qw [CW, BN]; when T, acc + qw qa for
    qw [BN, CW], qa [CW, BM] (the transposed tile). qa holds e4m3 bits (uint8) under the interpreter."""
    if INTERPRET:
        qa = qa.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if T:
        return tl.dot(qw, qa, acc)
    else:
        return tl.dot(qa, qw, acc)


@triton.jit
def _outer(sx, sw, T: tl.constexpr):
    """Row scales sx [BM] times column scales sw [BN]: [BM, BN], or [BN, BM] when T."""
    if T:
        return sw[:, None] * sx[None, :]
    else:
        return sx[:, None] * sw[None, :]


@triton.jit
def _scaled(q, sc, zr, SYM: tl.constexpr, T: tl.constexpr):
    """s q + z [CW, BN] ([BN, CW] when T) from centred codes q in the dot type; sc, zr: [BN] (zr unused when SYM)."""
    s = tl.expand_dims(sc, 1 if T else 0)
    if SYM:
        return q * s
    else:
        return tl.fma(q, s, tl.expand_dims(zr, 1 if T else 0))


@triton.jit
def _tile(
    x_ptr,
    xq_ptr,
    xs_ptr,
    y_ptr,
    w_addr,
    s_addr,
    z_addr,
    row0,
    row1,
    local,
    N,
    K,
    KP,
    NG,
    stride_xm,
    stride_ym,
    KIND: tl.constexpr,
    WBITS: tl.constexpr,
    GROUP: tl.constexpr,
    SYM: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    SWAP: tl.constexpr,
    TMA: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One [BM, BN] output tile of one expert (rows row0:row1), specialised on its scheme."""
    mt = tl.cdiv(row1 - row0, BM)
    rm = row0 + (local % mt) * BM + tl.arange(0, BM)  # [BM] rows of x / y
    rn = (local // mt) * BN + tl.arange(0, BN)  # [BN] output columns
    m_mask = rm < row1
    n_mask = rn < N
    cdt: tl.constexpr = tl.float32 if INTERPRET else x_ptr.dtype.element_ty  # 16-bit dot operand type
    acc = tl.zeros([BM, BN], dtype=tl.float32)

    if KIND == 0 and TMA:  # BF16 tiles loaded by the tensor memory accelerator; x rows past the expert's read as 0
        m0 = row0 + (local % mt) * BM
        n0 = (local // mt) * BN
        xd = tl.make_tensor_descriptor(x_ptr, shape=[row1, K], strides=[stride_xm, 1], block_shape=[BM, BK])
        wd = tl.make_tensor_descriptor(_as_ptr(w_addr, tl.bfloat16), shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
            a = xd.load([m0, kt * BK])  # [BM, BK]
            b = wd.load([n0, kt * BK])  # [BN, BK]
            acc = tl.dot(a.to(cdt), b.to(cdt).T, acc)
    elif KIND == 0:  # BF16: w [N, K]
        w_cols = _as_ptr(w_addr, tl.bfloat16) + rn.to(tl.int64)[None, :] * K  # [1, BN]
        for kt in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
            rk = kt * BK + tl.arange(0, BK)
            a = _load_x(x_ptr, rm, m_mask, stride_xm, kt * BK, K, BK)
            b = tl.load(w_cols + rk[:, None], mask=(rk[:, None] < K) & n_mask[None, :], other=0.0)
            acc = tl.dot(a.to(cdt), b.to(cdt), acc)
    else:
        wp = _as_ptr(w_addr, tl.uint8)
        CW: tl.constexpr = 128 if WBITS >= 8 else 64 if WBITS >= 4 else 32 if WBITS >= 2 else 16  # K rows per slice
        NSL: tl.constexpr = 128 // CW  # slices per 128-long K block
        OFF: tl.constexpr = (
            0 if SYM and WBITS == 8 else 1 << (WBITS - 1)
        )  # centred code q = u - OFF (8-bit sym: stored signed)
        SIGNED: tl.constexpr = SYM and WBITS == 8 and KIND != 2 and KIND != 4
        rq = (local // mt) * (BN // 4) + tl.arange(0, BN // 4)  # [BN / 4] byte rows of fragment-order codes
        if KIND == 1 or KIND == 2:  # W_INT, W_FP8: weight dequantized in registers (s q + z), 16-bit dot
            # The scale and zero point multiply the weight before the dot, so the accumulator chain runs
            # through all of K for any group size. SWAP: compute the [BN, BM] tile y^T = W x^T, so the
            # unpacked weight is the dot's A operand (wgmma reads A from registers; B must come from
            # shared memory) and few rows fill its N.
            if SWAP:
                acc = tl.zeros([BN, BM], dtype=tl.float32)
            # FRAG: 2- to 4-bit integer codes in fragment order (pack.py), unpacked by _fragment_values into
            # v = 128 + u = q + 128 + OFF [BN, 128], then w = s (v - 128 - OFF) + zr (the subtraction is exact),
            # one K=128 dot per block.
            FRAG: tl.constexpr = KIND == 1 and WBITS >= 2 and WBITS <= 4
            # PAIRED: grouped asymmetric fragment-order codes keep each group's scale and zero point in one
            # 32-bit word (pack.py), a load the pipeliner multi-buffers like the codes.
            PAIRED: tl.constexpr = FRAG and GROUP > 0 and not SYM
            # PREFETCH: per-group scales of block kb + 1 are loaded during block kb. Triton does not pipeline
            # 16-bit loads of one value per thread, and on short tiles (few rows, memory-bound) a load at the
            # point of use stalls every block; tall tiles hide it behind their MMA work and lose registers to
            # the prefetch.
            PREFETCH: tl.constexpr = GROUP > 0 and BM <= 64 and not PAIRED
            nkb = tl.cdiv(K, 128)
            if GROUP < 0:
                sc, zr = _scale_zero(s_addr, z_addr, 0, rn, n_mask, N, tl.float32, SYM, OFF, cdt)
            elif PREFETCH:
                sc_next, zr_next = _scale_zero(s_addr, z_addr, 0, rn, n_mask, N, tl.float16, SYM, OFF, cdt)
            for kb in tl.range(0, nkb, num_stages=STAGES):
                if FRAG:
                    v = _fragment_values(wp, kb, rq, N, KP, WBITS, INTERPRET)  # [BN, 128]
                else:
                    b8 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 8, SWAP, SIGNED)
                    b4 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 4, SWAP)
                    b2 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 2, SWAP)
                    b1 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 1, SWAP)
                if PREFETCH:
                    sc, zr = sc_next, zr_next
                    sc_next, zr_next = _scale_zero(
                        s_addr,
                        z_addr,
                        (kb + 1) * 128 // GROUP,
                        rn,
                        n_mask & (kb + 1 < nkb),
                        N,
                        tl.float16,
                        SYM,
                        OFF,
                        cdt,
                    )
                elif PAIRED:
                    sc, zr = _scale_zero_pair(s_addr, kb * 128 // GROUP, rn, n_mask, N, OFF, cdt)
                elif GROUP > 0:
                    sc, zr = _scale_zero(s_addr, z_addr, kb * 128 // GROUP, rn, n_mask, N, tl.float16, SYM, OFF, cdt)
                if FRAG:
                    w = _scaled(v.to(cdt) - (128 + OFF), sc, zr, SYM, True)  # [BN, 128]
                    if SWAP:
                        a = _load_x(x_ptr, rm, m_mask, stride_xm, kb * 128, K, 128, True)  # [128, BM]
                        acc = tl.dot(w, a.to(cdt), acc)
                    else:
                        a = _load_x(x_ptr, rm, m_mask, stride_xm, kb * 128, K, 128)  # [BM, 128]
                        acc = tl.dot(a.to(cdt), tl.trans(w), acc)
                else:
                    for j in tl.static_range(NSL):
                        a = _load_x(x_ptr, rm, m_mask, stride_xm, kb * 128 + j * CW, K, CW, SWAP)  # [BM, CW] / [CW, BM]
                        u = _codes(b8, b4, b2, b1, j, WBITS, CW, BN, SWAP)  # [CW, BN] / [BN, CW]
                        w = _dequant(u, sc, zr, KIND, WBITS, OFF, SYM, SWAP, cdt, INTERPRET)
                        if SWAP:
                            acc = tl.dot(w, a.to(cdt), acc)
                        else:
                            acc = tl.dot(a.to(cdt), w, acc)
        else:  # WA_INT, WA_FP8: activations pre-quantized per row into xq (codes) and xs (scales)
            # 8-bit codes are stored as the dot's operand type (int8 / e4m3 bits): loaded straight into
            # shared memory for the MMA, with no pass through registers. Narrower integer codes are
            # unpacked in registers, to int8 (WA_INT) or to e4m3 (WA_FP8: |q| <= 15 is exact there).
            # Grouped schemes (one activation and one weight group per 128-long K block) keep each block's
            # partial sum apart and promote it into the fp32 accumulator with both groups' scales
            # (DeepGEMM's fine-grained scaling); per-channel schemes scale once, in the epilogue.
            # SWAP (fp8 codes narrower than 8 bits): the [BN, BM] tile y^T = W x^T, so the e4m3 weight is
            # the dot's register A operand and the activations stream into shared memory as B: per channel,
            # the conversion of one K block overlaps the asynchronous MMA of the block before (per group,
            # each block's partial sum is promoted before the next block, so the MMA is waited for).
            DT: tl.constexpr = tl.int8 if KIND == 3 else tl.uint8 if INTERPRET else tl.float8e4nv
            xq8 = xq_ptr.to(tl.pointer_type(DT))
            if SWAP:
                acc = tl.zeros([BN, BM], dtype=tl.float32)
            # FRAG8: 4-bit codes of fp8 schemes in the fp8 MMA's fragment order (pack.py), converted to e4m3
            # by _e4m3_fragment_values; one K=128 dot per block in either tile orientation.
            FRAG8: tl.constexpr = KIND == 4 and WBITS == 4
            if KIND == 3:
                acc_i = tl.zeros([BM, BN], dtype=tl.int32)
            for kb in tl.range(0, tl.cdiv(K, 128), num_stages=STAGES):
                if WBITS < 8 and not FRAG8:
                    b4 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 4, SWAP)
                    b2 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 2, SWAP)
                    b1 = _plane(wp, kb, rn, n_mask, N, KP, WBITS, 1, SWAP)
                if GROUP > 0:
                    if KIND == 3:
                        part_i = tl.zeros([BM, BN], dtype=tl.int32)
                    else:
                        part = tl.zeros_like(acc)
                if SWAP or FRAG8:  # one K=128 dot per block keeps a wgmma in flight (two made them synchronous)
                    qa = _load_x(xq8, rm, m_mask, K, kb * 128, K, 128, SWAP)  # [128, BM] / [BM, 128]
                    if FRAG8:
                        qw = _e4m3_fragment_values(_fragment_bytes(wp, kb, rq, N, 256), INTERPRET)  # [BN, 128]
                    else:
                        qw = _e4m3_codes(_block_codes(b4, b2, b1, WBITS, BN), OFF, INTERPRET)  # [BN, 128]
                    if not SWAP:
                        qw = tl.trans(qw)  # [128, BN]
                    if GROUP > 0:
                        part = _fp8_mma(qa, qw, part, SWAP, INTERPRET)
                    else:
                        acc = _fp8_mma(qa, qw, acc, SWAP, INTERPRET)
                for j in tl.static_range(0 if SWAP or FRAG8 else NSL):
                    qa = _load_x(xq8, rm, m_mask, K, kb * 128 + j * CW, K, CW)  # [BM, CW]
                    if WBITS == 8:
                        qw = tl.load(
                            wp.to(tl.pointer_type(DT)) + rn[None, :] * KP + kb * 128 + tl.arange(0, 128)[:, None],
                            mask=n_mask[None, :],
                            other=0.0,
                        )  # [128, BN]
                        if KIND == 4 and INTERPRET:
                            qw = qw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                    elif KIND == 4:
                        qw = _e4m3_codes(_codes(0, b4, b2, b1, j, WBITS, CW, BN), OFF, INTERPRET)  # [CW, BN]
                    else:
                        qw = (_codes(0, b4, b2, b1, j, WBITS, CW, BN) - OFF).to(DT)  # [CW, BN]
                    if KIND == 4:
                        if GROUP > 0:
                            part = _fp8_mma(qa, qw, part, False, INTERPRET)
                        else:
                            acc = _fp8_mma(qa, qw, acc, False, INTERPRET)
                    elif GROUP > 0:
                        part_i = tl.dot(qa, qw, part_i, out_dtype=tl.int32)
                    else:
                        acc_i = tl.dot(qa, qw, acc_i, out_dtype=tl.int32)
                if GROUP > 0:  # promote this block's partial sum with its activation and weight scales
                    sx = tl.load(xs_ptr + rm.to(tl.int64) * NG + kb, mask=m_mask, other=0.0)
                    sw = tl.load(_as_ptr(s_addr, tl.float16) + kb * N + rn, mask=n_mask, other=0.0).to(tl.float32)
                    if FRAG8:
                        sw = sw * E4M3_CODE_SCALE
                    if KIND == 3:
                        part = part_i.to(tl.float32)
                    acc += part * _outer(sx, sw, SWAP)
            if GROUP < 0:
                sx = tl.load(xs_ptr + rm.to(tl.int64) * NG, mask=m_mask, other=0.0)
                sw = tl.load(_as_ptr(s_addr, tl.float32) + rn, mask=n_mask, other=0.0)
                if FRAG8:
                    sw = sw * E4M3_CODE_SCALE
                if KIND == 3:
                    acc = acc_i.to(tl.float32)
                acc = acc * _outer(sx, sw, SWAP)

    if SWAP:  # acc: [BN, BM]
        y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])
    else:
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def group_gemm_kernel(
    x_ptr,
    xq_ptr,
    xs_ptr,
    y_ptr,
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    K,
    KP,
    NG,
    stride_xm,
    stride_ym,
    KINDS: tl.constexpr,
    WBITS: tl.constexpr,
    GROUPS: tl.constexpr,
    SYMS: tl.constexpr,
    BMS: tl.constexpr,
    BNS: tl.constexpr,
    BKS: tl.constexpr,
    STAGES: tl.constexpr,
    SWAPS: tl.constexpr,
    TMAS: tl.constexpr,
    NSLOTS: tl.constexpr,
    E_PAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Persistent grouped GEMM over all experts (see module docstring).

    x: [T, K] 16-bit; xq: [T, K] uint8 quantized rows and xs: [T, NG] float32 their scales (rows of
    weight-activation experts); y: [T, N]; off: [E+1] int32; sched: [E, 2] int32 (expert, slot) in
    schedule order; addr: [E, 3] int64 (codes, scale, zero) per expert.
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
                _tile(
                    x_ptr,
                    xq_ptr,
                    xs_ptr,
                    y_ptr,
                    w_addr,
                    s_addr,
                    z_addr,
                    row0,
                    row1,
                    local,
                    N,
                    K,
                    KP,
                    NG,
                    stride_xm,
                    stride_ym,
                    KINDS[s],
                    WBITS[s],
                    GROUPS[s],
                    SYMS[s],
                    BMS[s],
                    BNS[s],
                    BKS[s],
                    STAGES[s],
                    SWAPS[s],
                    TMAS[s],
                    INTERPRET,
                )
