"""A warp-specialised Gluon grouped GEMM for 4-bit weight-only experts on Hopper (sm_90a): a prototype.

What: ``y[r] = x[r] @ W_e^T`` for the rows ``offsets[e] <= r < offsets[e+1]`` of every expert ``e``, one
persistent launch, for the 4-bit weight-only fragment-order schemes only (``w4a16_g128_asym`` and other
grouped asymmetric ones with (scale, zero) pairs; ``w4a16_g-1_asym`` / ``w4a16_g-1_sym`` per channel). It
reads exactly the storage ``mxmoe.kernels.pack`` writes and takes the launch arguments of the Triton
kernel (``group_gemm._launch``: x, y, offsets, sched, addr, E, N, K, KP), without the activation-quantization
ones.

Why: the plain-Triton path (``triton_kernel.py``, KIND W_INT, FRAG, SWAP, PAIRED) is latency bound at
prefill sizes: every warp both issues the cp.async loads and unpacks and multiplies, and the K loop
meets at CTA-wide barriers every block (Nsight Compute: ~4.4 cycles per issued instruction, 40-48 % of
copy bandwidth on an H100 at 512 tokens). Here the work is split (``gl.warp_specialize``):

* a *producer* partition (``PW`` warps, 4 by default) only issues cp.async copies of each 128-long K
  block into a ring of ``STAGES`` shared-memory stages and signals stage ``s`` full with
  ``cp.async.mbarrier.arrive.noinc`` (one arrival per producer thread, when that thread's copies land);
* the *consumer* warpgroup (the default partition, 4 warps) waits for ``full[s]``, unpacks the 4-bit
  codes straight into the wgmma register A operand, scales them, issues the wgmma, and releases the
  stage with one ``mbarrier.arrive(empty[s])`` once the wgmma that read it is complete.
The two partitions never meet at a barrier: only the 2 x STAGES mbarriers connect them (Triton's barrier
analysis still puts a named barrier of the partition's own 128 threads into each one's K loop).

Measured on an H100 (``mxmoe bench gluon``, ``results/kernels/NOTES.md``): bitwise equal to the Triton
kernel and no faster (0.94-1.02x at 16 and 512 tokens, ~0.9x at 8192): with the loads issued ahead, DRAM,
issue slots and the tensor pipe all stay near 40%, so the 512-token case is not held by load latency but by
each consumer warpgroup's dependent chain per K block. It is the benchmark's comparison and the skeleton for
a kernel with more independent work per SM, not a path ``group_gemm`` takes.

The shared-operand variant (``gluon_shared_group_gemm_kernel``, ``operand="shared"``) takes the unpack off the
MMA's path, the usual warp-specialised mixed-input design. One CTA per SM; the same producer; two *converter*
warpgroups wait for a ring stage, unpack and scale its codes (64 weight rows each, or all 128 of alternate K
blocks) and store the bf16 tile [BN, 128] with stmatrix into a ring of ``WSTAGES`` weight tiles; the *MMA*
warpgroup (default partition) waits for the x stage and the weight tile and issues the wgmma with both operands
in shared memory, one group in flight. A ring stage is released when the converters that unpacked it have its
codes in registers and the MMA has retired the wgmma that read its x rows; a weight tile when its wgmma
retired. Measured on H100s (``mxmoe bench gluon``, results/kernels/NOTES.md): correct, and 1.3-1.5x slower
than the register-operand kernel at 16 and 512 tokens (1.4-1.8x with a single converter): each converter's
chain per K block (wait, unpack, wait for a free tile, stmatrix, fence, barrier, arrive) replaces the
consumer's.

Tiles, exactly as the Triton kernel's SWAP path: per expert ``mt = cdiv(rows, BM)`` token blocks x
``cdiv(N, BN)`` weight-row blocks (BN = 128); local tile ``local`` is token block ``local % mt`` of row
block ``local // mt``; the accumulator is the [BN, BM] tile y^T (weight rows as the wgmma's M, tokens as
its N: instr_shape [16, BM, 16]). Program ``p`` of ``P`` takes tiles ``p, p + P, ...`` of the global list
(experts in ``sched`` order). Each partition finds a tile's expert with the same scalar cursor
(``_seek``: schedule position, its first tile, its tile count), walking ``sched`` / ``offsets`` forward,
so no tensor layout depends on a partition's warp count for the schedule.

One ring stage (K block ``kb`` of the current tile):
  codes  [BN/4, 256] uint8   fragment-order byte rows 32 nb .. 32 nb + 31 of block kb (contiguous)
  pairs  [BN] int32          (scale, zero) fp16 pairs of the block's group (PAIRED schemes)
  x      [BM, 128] bf16      token rows of the tile (rows past the expert's end and K past K zero-filled)
Bytes per stage: 8192 + 512 + 256 BM (BM 16/32/64: 12.7/16.9/25.1 KiB).

Layout facts (Triton 3.6, sm_90a, 4 consumer warps, BN = 128): the codes are read from shared memory in
the linear layout the Triton compiler picked for ``_nibble_values`` (``CODE_LAYOUT``: four 16-byte
loads per thread, register bits = bytes 0-15 and +128 of a byte row and +16 byte rows, lanes = bytes
16-127 and byte rows +1, +2, warps = byte rows +4, +8); the inline PTX (the Triton kernel's
``NIBBLE_ASM``), a join, and reshapes/permutes that move no data land the values in
``DotOperandLayout(0, NVMMADistributedLayout([3, 0], [4, 1], [16, BM, 16]), k_width=2)``, which the
consumer asserts with ``convert_layout(..., assert_trivial=True)`` (it compiles: no data moves). The (scale, zero) pairs are read in that
operand layout's row slice, so ``w = fma(v - 136, s, z + 8 s)`` needs no shuffle. x sits in shared memory
[BM, 128] with the 128-byte NVMMA swizzle; its permuted view [128, BM] is the wgmma B operand.

Launch (Triton 3.6 compiles for sm_90a, ``mxmoe.bench.sass.gluon_facts``): Triton pads a warp-specialised CTA to whole
warpgroups (``.reqntid 256``: 4 consumer warps + the producer's warpgroup), so a 1-warp producer only
leaves 3 warps idle, and at 40 registers it spills its pointer tensors (1.6 KiB at BM 64); 4 producer warps
hold them in 64 registers without spilling. ``maxnreg=128`` makes the launch 256 threads x 128 registers (two CTAs per
SM); ``setmaxnreg`` then moves the consumer to 256 - 64 = 192 registers and the producer to 64. Without it
ptxas takes 255 registers per thread for all 256 threads: one CTA per SM.

wgmma depth (``DEPTH``), from the sm_90a SASS (Triton 3.6, ptxas of its wheel): with 0 the consumer waits
for each block's wgmma before unpacking the next. With 1 it leaves it in flight: ptxas puts no wait between
the HGMMAs of block kb and the next block's LDS/LOP3/HFMA2, which write the very registers those HGMMAs read
as A (the wait's operands are the accumulator only: PTX leaves such a write undefined; on an H100 results
were exact). 2 unpacks each K block in two K halves (bytes 0-127 / 128-255 of the byte rows, K 0-63 / 64-127)
into two distinct A operands [BN, 64]: issue wgmma(half 0); wait until one group is in flight (the previous
half retires: the previous block's stage is released); unpack half 1 into the other registers; issue
wgmma(half 1); wait until one is in flight (half 0 retires); the next block's half 0 unpacks while half 1
multiplies. Each wait names the operand it retires, so ptxas keeps the two sets apart (BM 16/32/64: A in 64
distinct registers, the 32 LOP3 + 32 HFMA2 of one half between the HGMMAs of the other and the wait that
retires them, no spill, no C751x note). Unrolling by whole blocks (two [BN, 128] operands, 128 registers)
does not fit the consumer's 192: ptxas serialises every HGMMA (C7511/C7512, "insufficient register
resources"), at BM 16 too.

Why it cannot deadlock: both partitions run the same scalar tile walk over the same arguments, so they
visit the same tiles and the same ``nkb`` K blocks per tile, and number the ring uses ``it = 0, 1, ...``
identically. Use ``it`` takes stage ``it % STAGES``; ``full[s]`` (count 32 PW) completes its j-th phase when
every producer thread's copies of use ``s + j STAGES`` have landed; ``empty[s]`` (count 1) completes its j-th
phase when the consumer has retired the wgmma of that use. The producer's wait for use ``it`` is on
``empty`` phase parity ``((it // STAGES) & 1) ^ 1``, which a fresh barrier passes at once, so the first
``STAGES`` uses never wait, and later ones wait only for the consumer's release of use ``it - STAGES``;
the consumer waits for ``full`` of use ``it`` only, which the producer issues as soon as use
``it - STAGES`` is released, which the consumer has done before reaching use ``it`` (``STAGES >= 2``;
with ``DEPTH`` 1 or 2 the release of use ``it - 1`` follows the issue of (the first half of) use ``it``'s
wgmma, and the last use of a tile is released after its final wait). Neither side ever waits for the other to get *ahead*, the
producer cannot lap the consumer (it waits on ``empty``), and a phase is never waited for twice. A program
with no tile (``pid >= total``) and an expert with no rows (no tiles: the walk steps over it) make both
loops empty or skip alike. Masked copies (rows past an expert's end, K past K, byte rows past N) still
issue (zero-filled), so every producer thread arrives exactly once per use.

The shared-operand kernel adds the weight ring (``wfull[w]`` counts an arrival of each converter that unpacks
the use, ``wempty[w]`` one MMA arrival) and numbers its uses with the same ``it``; a converter skips a use that
is not its own (alternate K blocks) but still counts it. The MMA waits for ``full`` and ``wfull`` of use ``it``,
issues it, and then releases use ``it - 1`` (``empty`` and ``wempty``), whose wgmma has retired. A converter
waits for ``full`` of use ``it`` and for ``wempty`` of use ``it - WSTAGES``, which the MMA released once it had
issued use ``it - WSTAGES + 1``; that needs only the weight tiles of uses up to ``it - 1``, which the converter
stored before reaching ``it`` (``WSTAGES >= 2``). The producer waits for ``empty`` of use ``it - STAGES``: each
converter released it when it stored that use's tile, the MMA when it issued use ``it - STAGES + 1``
(``STAGES >= 2``). So every wait is for work that an earlier use of the waiting side made possible.

Without Gluon the module still imports and ``gluon_group_gemm`` raises RuntimeError; ``mxmoe.bench.sass``
compiles it for sm_90a without a GPU (``compile_gluon``, ``gluon_facts``). It is not re-exported by
``mxmoe.kernels`` and is not part of the kernel fingerprint (``mxmoe.kernels.version.SOURCES``).
"""

from __future__ import annotations

import torch

from mxmoe.env import device_guard
from mxmoe.kernels import triton_kernel
from mxmoe.kernels.group_gemm import _check_offsets, expert_group

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    GLUON_ERROR: "Exception | None" = None
except Exception as exc:  # no Gluon in this Triton: the module imports, the kernel does not run
    gluon = gl = async_copy = mbarrier = None
    fence_async_shared = warpgroup_mma = warpgroup_mma_wait = None
    GLUON_ERROR = exc


def _jit(fn):
    """``gluon.jit`` where Gluon exists; the plain function otherwise (never launched then)."""
    return gluon.jit(fn) if gluon is not None else fn


def _constexpr(value):
    return gl.constexpr(value) if gl is not None else value


TILE_N = 128  # weight rows per tile (the wgmma's M: one warpgroup, 4 warps x 16 rows, twice)
BLOCK_K = 128  # K block of the packed layout (pack.PACK_K)
BN, PACK_K = _constexpr(TILE_N), _constexpr(BLOCK_K)  # the same, for the kernels
# The Triton kernel's unpacking PTX: one 32-bit word of 8 codes (position t at nibble 4 (t % 2) + t // 2) ->
# four bf16 pairs 128 + u (positions 0-1, 2-3, 4-5, 6-7).
NIBBLE_ASM_TEXT = triton_kernel.NIBBLE_ASM.value
NIBBLE_ASM = _constexpr(NIBBLE_ASM_TEXT)
# Linear layout of the [BN / 4, 256] uint8 codes as the consumer warpgroup loads them (module docstring):
# Triton 3.6's choice for the same unpack, so the reshapes after the asm move no data.
CODE_LAYOUT = CODE_HALF_LAYOUT = CODE_ROWS_HALF_LAYOUT = None
if gl is not None:
    try:
        CODE_LAYOUT = gl.constexpr(
            gl.DistributedLinearLayout(
                reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 128], [16, 0]],
                lane_bases=[[0, 16], [0, 32], [0, 64], [1, 0], [2, 0]],
                warp_bases=[[4, 0], [8, 0]],
                block_bases=[],
                shape=[32, 256],
            )
        )
        # bytes 0-127 or 128-255 of the byte rows (K 0-63 or 64-127 of the block): CODE_LAYOUT less its +128 basis
        CODE_HALF_LAYOUT = gl.constexpr(
            gl.DistributedLinearLayout(
                reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [16, 0]],
                lane_bases=[[0, 16], [0, 32], [0, 64], [1, 0], [2, 0]],
                warp_bases=[[4, 0], [8, 0]],
                block_bases=[],
                shape=[32, 128],
            )
        )
        # byte rows 0-15 or 16-31 (weight rows 0-63 or 64-127 of the tile): CODE_LAYOUT less its +16 rows basis
        CODE_ROWS_HALF_LAYOUT = gl.constexpr(
            gl.DistributedLinearLayout(
                reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 128]],
                lane_bases=[[0, 16], [0, 32], [0, 64], [1, 0], [2, 0]],
                warp_bases=[[4, 0], [8, 0]],
                block_bases=[],
                shape=[16, 256],
            )
        )
    except Exception as exc:  # a Gluon whose layout API differs: importable, not runnable
        GLUON_ERROR = exc
CODE_OFF = _constexpr(8)  # centred 4-bit code q = u - 8
# A barrier of the calling partition's warps (gl.barrier; thread_barrier in Triton 3.6)
_partition_barrier = (getattr(gl, "barrier", None) or gl.thread_barrier) if gl is not None else None
STOP = _constexpr(1 << 30)  # tile count of the cursor past the last expert: ends every walk


@_jit
def _tile_count(pos, E, off_ptr, sched_ptr, NB, BM: gl.constexpr):
    """Tiles (scalar) of schedule position pos: cdiv(rows, BM) * NB; STOP once pos >= E."""
    e = gl.load(sched_ptr + 2 * gl.minimum(pos, E - 1))  # expert at schedule position pos
    rows = gl.load(off_ptr + e + 1) - gl.load(off_ptr + e)
    return gl.where(pos < E, gl.cdiv(rows, BM) * NB, STOP)


@_jit
def _seek(t, pos, start, cnt, E, off_ptr, sched_ptr, NB, BM: gl.constexpr):
    """Move the cursor (schedule position pos, its first global tile start, its tile count cnt) forward until
    it holds tile t. Tiles only increase, so the walk is monotone; past the last tile pos = E (cnt = STOP).
    Scalars only: both partitions run it and see the same tiles whatever their warp counts."""
    while t >= start + cnt:
        start += cnt
        pos += 1
        cnt = _tile_count(pos, E, off_ptr, sched_ptr, NB, BM)
    return pos, start, cnt


@_jit
def _tile(t, pos, start, off_ptr, sched_ptr, BM: gl.constexpr):
    """Global tile t at schedule position pos (its first tile: start) -> (expert e, its first and past-last rows
    row0 / row1, weight-row block nb, first token row m0): token block ``local % mt`` of row block ``local // mt``."""
    e = gl.load(sched_ptr + 2 * pos)
    row0 = gl.load(off_ptr + e)
    row1 = gl.load(off_ptr + e + 1)
    mt = gl.cdiv(row1 - row0, BM)
    local = t - start
    return e, row0, row1, local // mt, row0 + (local % mt) * BM


@_jit
def _store_tile(y_ptr, acc, rn, rm, row1, N, stride_ym):
    """Store the y^T tile acc [BN, BM] (weight rows rn [BN] x token rows rm [BM]) as y rows, bf16, masked to the
    expert's rows (< row1) and N."""
    y_ptrs = y_ptr + rm.to(gl.int64)[None, :] * stride_ym + rn[:, None]  # [BN, BM] of y^T
    gl.store(y_ptrs, acc.to(gl.bfloat16), mask=(rm < row1)[None, :] & (rn < N)[:, None])


@_jit
def _nibble_values(b):
    """Bytes b [R, 128 C] of fragment-order 4-bit codes (CODE_LAYOUT, C = 2: a whole K block; CODE_HALF_LAYOUT,
    C = 1: half of one) -> 128 + code [4 R, 64 C] bf16 in (output row, K) order, in the wgmma A operand layout
    (``triton_kernel._nibble_values`` in Gluon)."""
    R: gl.constexpr = b.shape[0]
    C: gl.constexpr = b.shape[1] // 128
    p03, p47 = gl.inline_asm_elementwise(
        asm=NIBBLE_ASM,
        constraints="=r,=r,=r,=r,r",
        args=[b],
        dtype=(gl.bfloat16, gl.bfloat16),
        is_pure=True,
        pack=4,
    )  # [R, 128 C] each: positions 0-3 / 4-7 of word m at 4 m .. 4 m + 3
    v = gl.reshape(gl.permute(gl.reshape(gl.join(p03, p47), [R, 32 * C, 4, 2]), (0, 1, 3, 2)), [R, 256 * C])
    # position q = 256 c + 128 d + 32 e + 4 f + 2 g + h of byte row 4 a + b is row 16 a + 8 g + 2 b + d, K 64 c + 8 f + 2 e + h
    v = gl.permute(gl.reshape(v, [R // 4, 4, C, 2, 4, 8, 2, 2]), (0, 6, 1, 3, 2, 5, 4, 7))
    return gl.reshape(v, [4 * R, 64 * C])  # [BN, 64 C]


@_jit
def _pair_scale_zero(pair, OFF: gl.constexpr):
    """(scale, zero) fp16 pairs [BN] (int32 bits z << 16 | s) -> s and z + OFF s [BN], bf16 (``_scale_zero_pair``)."""
    sc = (pair & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    zr = (pair >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return sc.to(gl.bfloat16), (zr + OFF * sc).to(gl.bfloat16)


@_jit
def _channel_scale_zero(addr_ptr, e, rn, N, SYM: gl.constexpr):
    """Per-channel fp32 scale and zero point of expert ``e``'s weight rows rn [R] -> s and z + OFF s [R], bf16
    (symmetric schemes: s twice, the zero unused)."""
    s_ptr = gl.multiple_of(gl.load(addr_ptr + 3 * e + 1).to(gl.pointer_type(gl.float32)), 16)
    sc32 = gl.load(s_ptr + rn, mask=rn < N, other=0.0)
    sc = sc32.to(gl.bfloat16)
    if SYM:
        return sc, sc
    z_ptr = gl.multiple_of(gl.load(addr_ptr + 3 * e + 2).to(gl.pointer_type(gl.float32)), 16)
    return sc, (gl.load(z_ptr + rn, mask=rn < N, other=0.0) + CODE_OFF * sc32).to(gl.bfloat16)


@_jit
def _producer_ring(BM: gl.constexpr, STAGES: gl.constexpr, PW: gl.constexpr, RELEASES: gl.constexpr):
    """The producer's ring in shared memory and its barriers: (codes [STAGES, BN / 4, 256] uint8, (scale, zero)
    pairs [STAGES, BN] int32, x rows [STAGES, BM, 128] bf16, full, empty). A stage is full when every producer
    thread's cp.async has landed, empty after RELEASES arrivals (one per partition that reads it)."""
    codes_smem = gl.allocate_shared_memory(
        gl.uint8, [STAGES, BN // 4, 256], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    )
    pair_smem = gl.allocate_shared_memory(
        gl.int32, [STAGES, BN], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    )
    x_smem = gl.allocate_shared_memory(
        gl.bfloat16, [STAGES, BM, PACK_K], gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    )
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=32 * PW)  # every producer thread's cp.async.mbarrier.arrive.noinc
        mbarrier.init(empty.index(i), count=RELEASES)
    return codes_smem, pair_smem, x_smem, full, empty


@_jit
def _invalidate(full, empty, STAGES: gl.constexpr):
    """Invalidate a ring's full and empty barriers once every partition has left it."""
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))


@_jit
def _producer(
    x_ptr,
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    K,
    KP,
    stride_xm,
    codes_smem,
    pair_smem,
    x_smem,
    full,
    empty,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP: gl.constexpr,
    PW: gl.constexpr,
):
    """Worker partition (PW warps): cp.async every K block of every tile of this program into the ring."""
    CODE_L: gl.constexpr = gl.BlockedLayout([1, 16], [2, 16], [PW, 1], [1, 0])  # [BN/4, 256] u8, 16-byte copies
    X_L: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [PW, 1], [1, 0])  # [BM, 128] bf16, 16-byte copies
    PAIR_L: gl.constexpr = gl.BlockedLayout([4 // PW], [32], [PW], [0])  # [BN] int32
    NB = gl.cdiv(N, BN)
    rows_blk = gl.cdiv(N, 16) * 4  # fragment-order byte rows per K block
    nkb = KP // PACK_K
    rq0 = gl.arange(0, BN // 4, layout=gl.SliceLayout(1, CODE_L))  # [BN/4]
    cb = gl.arange(0, 256, layout=gl.SliceLayout(0, CODE_L))  # [256]
    rm0 = gl.arange(0, BM, layout=gl.SliceLayout(1, X_L))  # [BM]
    rk = gl.arange(0, PACK_K, layout=gl.SliceLayout(0, X_L))  # [128]
    rn0 = gl.arange(0, BN, layout=PAIR_L)  # [BN]

    t = gl.program_id(0)
    nprog = gl.num_programs(0)
    zero = gl.to_tensor(0)
    pos, start, cnt = _seek(
        t, zero, zero, _tile_count(zero, E, off_ptr, sched_ptr, NB, BM), E, off_ptr, sched_ptr, NB, BM
    )
    it = zero  # ring slot counter: stage it % STAGES, use it // STAGES
    while pos < E:
        e, row0, row1, nb, m0 = _tile(t, pos, start, off_ptr, sched_ptr, BM)
        w_ptr = gl.multiple_of(gl.load(addr_ptr + 3 * e).to(gl.pointer_type(gl.uint8)), 16)
        rq = nb * (BN // 4) + rq0  # [BN/4] byte rows of the tile
        code_ptrs = w_ptr + rq[:, None] * 256 + cb[None, :]  # [BN/4, 256], K block 0
        code_mask = (rq < rows_blk)[:, None]  # [BN/4, 1]
        rm = m0 + rm0  # [BM] token rows
        x_ptrs = x_ptr + rm.to(gl.int64)[:, None] * stride_xm + rk[None, :]  # [BM, 128], K block 0
        x_rows = (rm < row1)[:, None]  # [BM, 1]
        rn = nb * BN + rn0  # [BN] weight rows
        if GROUP > 0:
            s_ptr = gl.multiple_of(gl.load(addr_ptr + 3 * e + 1).to(gl.pointer_type(gl.int32)), 16)
            pair_ptrs = s_ptr + rn  # [BN] pairs of group 0
        for kb in range(nkb):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # the first pass of each stage passes at once
            async_copy.async_copy_global_to_shared(
                codes_smem.index(s), code_ptrs + (kb * rows_blk).to(gl.int64) * 256, mask=code_mask
            )
            if GROUP > 0:
                async_copy.async_copy_global_to_shared(
                    pair_smem.index(s), pair_ptrs + (kb * PACK_K // GROUP) * N, mask=rn < N
                )
            async_copy.async_copy_global_to_shared(
                x_smem.index(s), x_ptrs + kb * PACK_K, mask=x_rows & (kb * PACK_K + rk < K)[None, :]
            )
            async_copy.mbarrier_arrive(full.index(s), increment_count=False)  # one arrival per thread, on landing
            it += 1
        t += nprog
        pos, start, cnt = _seek(t, pos, start, cnt, E, off_ptr, sched_ptr, NB, BM)


@_jit
def _landed(it, full, STAGES: gl.constexpr, FENCE: gl.constexpr):
    """Wait until ring use ``it`` has landed; its stage."""
    s = it % STAGES
    mbarrier.wait(full.index(s), (it // STAGES) & 1)
    if FENCE:  # cp.async wrote the stage through the generic proxy; wgmma reads x through the async one
        fence_async_shared()
    return s


@_jit
def _weights(codes, sc, zr, SYM: gl.constexpr, DOT_A: gl.constexpr):
    """Codes [BN/4, 128 C] (``_nibble_values``) and per-row sc, zr [BN] -> s q + z [BN, 64 C] bf16 in DOT_A."""
    v = gl.convert_layout(_nibble_values(codes), DOT_A, assert_trivial=True)  # 128 + u
    q = v - (128 + CODE_OFF)  # exact in bf16
    if SYM:
        w = q * gl.expand_dims(sc, 1)
    else:
        w = gl.fma(q, gl.expand_dims(sc, 1), gl.expand_dims(zr, 1))  # s q + z + 8 s
    return w


@_jit
def _consumer(
    y_ptr,
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    KP,
    stride_ym,
    codes_smem,
    pair_smem,
    x_smem,
    full,
    empty,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP: gl.constexpr,
    SYM: gl.constexpr,
    DEPTH: gl.constexpr,
    FENCE: gl.constexpr,
):
    """Default partition (one warpgroup): unpack, scale, wgmma every K block; store each tile's y rows."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    ROW_L: gl.constexpr = gl.SliceLayout(1, DOT_A)  # [BN] per weight row, where the A operand holds it
    NB = gl.cdiv(N, BN)
    nkb = KP // PACK_K
    rn_a = gl.arange(0, BN, layout=ROW_L)  # [BN]
    rn_y = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))  # [BN] rows of acc
    rm_y = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))  # [BM] columns of acc

    t = gl.program_id(0)
    nprog = gl.num_programs(0)
    zero = gl.to_tensor(0)
    pos, start, cnt = _seek(
        t, zero, zero, _tile_count(zero, E, off_ptr, sched_ptr, NB, BM), E, off_ptr, sched_ptr, NB, BM
    )
    it = zero
    while pos < E:
        e, row0, row1, nb, m0 = _tile(t, pos, start, off_ptr, sched_ptr, BM)
        n0 = nb * BN
        if GROUP < 0:  # per channel: one scale (and zero point) per weight row
            sc, zr = _channel_scale_zero(addr_ptr, e, n0 + rn_a, N, SYM)
        acc = gl.zeros([BN, BM], gl.float32, layout=MMA)  # y^T tile
        if DEPTH == 2:  # each K block as two K halves whose A operands sit in two register sets
            wb = gl.zeros([BN, PACK_K // 2], gl.bfloat16, DOT_A)  # A operand of the wgmma in flight (none yet)
            for kb in range(nkb):
                s = _landed(it, full, STAGES, FENCE)
                if GROUP > 0:
                    sc, zr = _pair_scale_zero(pair_smem.index(s).load(ROW_L), CODE_OFF)  # [BN] each
                codes = codes_smem.index(s)
                wa = _weights(codes.slice(0, PACK_K, dim=1).load(CODE_HALF_LAYOUT), sc, zr, SYM, DOT_A)  # K 0-63
                acc = warpgroup_mma(wa, x_smem.index(s).slice(0, 64, dim=1).permute((1, 0)), acc, is_async=True)
                acc, wb = warpgroup_mma_wait(num_outstanding=1, deps=[acc, wb])  # the half before (wb) retired
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kb > 0)  # so the block before is done
                wb = _weights(codes.slice(PACK_K, PACK_K, dim=1).load(CODE_HALF_LAYOUT), sc, zr, SYM, DOT_A)  # K 64-127
                acc = warpgroup_mma(wb, x_smem.index(s).slice(64, 64, dim=1).permute((1, 0)), acc, is_async=True)
                acc, wa = warpgroup_mma_wait(num_outstanding=1, deps=[acc, wa])  # K 0-63 (wa) retired
                it += 1
            acc, wb = warpgroup_mma_wait(num_outstanding=0, deps=[acc, wb])
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        else:
            for kb in range(nkb):
                s = _landed(it, full, STAGES, FENCE)
                codes = codes_smem.index(s).load(CODE_LAYOUT)
                if GROUP > 0:
                    sc, zr = _pair_scale_zero(pair_smem.index(s).load(ROW_L), CODE_OFF)  # [BN] each
                w = _weights(codes, sc, zr, SYM, DOT_A)  # [BN, 128]
                tok = warpgroup_mma(w, x_smem.index(s).permute((1, 0)), acc, is_async=True)  # [BN,128] x [128,BM]
                if DEPTH == 0:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=[tok])
                    mbarrier.arrive(empty.index(s))  # one arrival (count 1): the wgmma that read the stage is done
                else:
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=[tok])
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kb > 0)  # the block before is done
                it += 1
            if DEPTH == 1:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        _store_tile(y_ptr, acc, n0 + rn_y, m0 + rm_y, row1, N, stride_ym)
        t += nprog
        pos, start, cnt = _seek(t, pos, start, cnt, E, off_ptr, sched_ptr, NB, BM)


@_jit
def gluon_group_gemm_kernel(
    x_ptr,
    y_ptr,
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    K,
    KP,
    stride_xm,
    stride_ym,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    GROUP: gl.constexpr,
    SYM: gl.constexpr,
    PW: gl.constexpr,
    PREGS: gl.constexpr,
    DEPTH: gl.constexpr,
    FENCE: gl.constexpr,
):
    """Persistent warp-specialised grouped GEMM over all experts (module docstring); launch with num_warps=4.

    x: [T, K] bf16; y: [T, N] bf16; off: [E+1] int32; sched: [E, 2] int32 (expert, slot) in schedule order;
    addr: [E, 3] int64 (codes, scale, zero) per expert. BM: tokens per tile (16/32/64); STAGES: ring depth;
    GROUP: 128 (or a multiple) for (scale, zero) pairs, -1 per channel; SYM: per-channel symmetric (no zero);
    PW / PREGS: producer warps and their register request; DEPTH: 0 (wait for each block's wgmma), 1 (leave it
    in flight) or 2 (two K halves per block, A operands in two register sets; module docstring);
    FENCE: fence.proxy.async after each full-barrier wait."""
    codes_smem, pair_smem, x_smem, full, empty = _producer_ring(BM, STAGES, PW, 1)  # one consumer release a use
    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    y_ptr,
                    off_ptr,
                    sched_ptr,
                    addr_ptr,
                    E,
                    N,
                    KP,
                    stride_ym,
                    codes_smem,
                    pair_smem,
                    x_smem,
                    full,
                    empty,
                    BM,
                    STAGES,
                    GROUP,
                    SYM,
                    DEPTH,
                    FENCE,
                ),
            ),
            (
                _producer,
                (
                    x_ptr,
                    off_ptr,
                    sched_ptr,
                    addr_ptr,
                    E,
                    N,
                    K,
                    KP,
                    stride_xm,
                    codes_smem,
                    pair_smem,
                    x_smem,
                    full,
                    empty,
                    BM,
                    STAGES,
                    GROUP,
                    PW,
                ),
            ),
        ],
        [PW],
        [PREGS],
    )
    _invalidate(full, empty, STAGES)


# ------------------------------------------------------------------------- shared-memory weight operand
# operand="shared" (module docstring): two converter warpgroups unpack and scale each K block into a ring of bf16
# weight tiles, splitting its 128 weight rows or (USES) taking alternate K blocks; the MMA warpgroup only waits and
# issues wgmma with both operands in shared memory (weights [BN, 128] as A, x rows [BM, 128] permuted as B).


@_jit
def _converter(
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    KP,
    codes_smem,
    pair_smem,
    w_smem,
    full,
    empty,
    wfull,
    wempty,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    WSTAGES: gl.constexpr,
    GROUP: gl.constexpr,
    SYM: gl.constexpr,
    CID: gl.constexpr,
    USES: gl.constexpr,
):
    """Worker partition (one warpgroup, converter CID of two): unpack and scale into the weight ring its half of the
    weight rows of every K block of every tile, or (USES) all BN rows of every other ring use."""
    ROWS: gl.constexpr = BN if USES else BN // 2  # weight rows of this converter: ROW0 ...
    ROW0: gl.constexpr = 0 if USES else CID * ROWS
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    ROW_L: gl.constexpr = gl.SliceLayout(1, DOT_A)  # [ROWS] per weight row, where the unpacked values hold it
    CODES_L: gl.constexpr = CODE_LAYOUT if ROWS == BN else CODE_ROWS_HALF_LAYOUT
    NB = gl.cdiv(N, BN)
    nkb = KP // PACK_K
    rn_a = ROW0 + gl.arange(0, ROWS, layout=ROW_L)  # [ROWS] rows of the tile
    t = gl.program_id(0)
    nprog = gl.num_programs(0)
    zero = gl.to_tensor(0)
    pos, start, cnt = _seek(
        t, zero, zero, _tile_count(zero, E, off_ptr, sched_ptr, NB, BM), E, off_ptr, sched_ptr, NB, BM
    )
    it = zero
    while pos < E:
        e, row0, row1, nb, m0 = _tile(t, pos, start, off_ptr, sched_ptr, BM)
        if GROUP < 0:  # per channel: one scale (and zero point) per weight row
            sc, zr = _channel_scale_zero(addr_ptr, e, nb * BN + rn_a, N, SYM)
        for kb in range(nkb):
            if not USES or it % 2 == CID:
                s = it % STAGES
                mbarrier.wait(full.index(s), (it // STAGES) & 1)
                codes = codes_smem.index(s).slice(ROW0 // 4, ROWS // 4, dim=0).load(CODES_L)  # [ROWS/4, 256]
                if GROUP > 0:
                    sc, zr = _pair_scale_zero(pair_smem.index(s).slice(ROW0, ROWS).load(ROW_L), CODE_OFF)
                w = _weights(codes, sc, zr, SYM, DOT_A)  # [ROWS, 128]
                ws = it % WSTAGES
                mbarrier.wait(wempty.index(ws), ((it // WSTAGES) & 1) ^ 1)  # the first pass of a stage passes at once
                w_smem.index(ws).slice(ROW0, ROWS, dim=0).store(w)
                fence_async_shared()  # each thread's stores, before the wgmma (async proxy) reads them
                _partition_barrier()  # every thread's loads of use it and stores, before the one arrival each
                mbarrier.arrive(wfull.index(ws))
                mbarrier.arrive(empty.index(s))
            it += 1
        t += nprog
        pos, start, cnt = _seek(t, pos, start, cnt, E, off_ptr, sched_ptr, NB, BM)


@_jit
def _shared_mma(
    y_ptr,
    off_ptr,
    sched_ptr,
    E,
    N,
    KP,
    stride_ym,
    x_smem,
    w_smem,
    full,
    empty,
    wfull,
    wempty,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    WSTAGES: gl.constexpr,
    FENCE: gl.constexpr,
):
    """Default partition (one warpgroup): wgmma every K block from the two rings; store each tile's y rows."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
    NB = gl.cdiv(N, BN)
    nkb = KP // PACK_K
    rn_y = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))  # [BN] rows of acc
    rm_y = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))  # [BM] columns of acc
    t = gl.program_id(0)
    nprog = gl.num_programs(0)
    zero = gl.to_tensor(0)
    pos, start, cnt = _seek(
        t, zero, zero, _tile_count(zero, E, off_ptr, sched_ptr, NB, BM), E, off_ptr, sched_ptr, NB, BM
    )
    it = zero
    acc = gl.zeros([BN, BM], gl.float32, layout=MMA)  # y^T tile; each tile's first wgmma ignores it (use_acc)
    while pos < E:
        # the tile's rows before the K loop: divided after it, ptxas serialised every wgmma (C7514)
        e, row0, row1, nb, m0 = _tile(t, pos, start, off_ptr, sched_ptr, BM)
        for kb in range(nkb):
            s = _landed(it, full, STAGES, FENCE)
            ws = it % WSTAGES
            mbarrier.wait(wfull.index(ws), (it // WSTAGES) & 1)
            tok = warpgroup_mma(w_smem.index(ws), x_smem.index(s).permute((1, 0)), acc, use_acc=kb > 0, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[tok])  # the block before retired
            mbarrier.arrive(wempty.index((it + WSTAGES - 1) % WSTAGES), pred=kb > 0)
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kb > 0)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        mbarrier.arrive(wempty.index((it + WSTAGES - 1) % WSTAGES))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        _store_tile(y_ptr, acc, nb * BN + rn_y, m0 + rm_y, row1, N, stride_ym)
        t += nprog
        pos, start, cnt = _seek(t, pos, start, cnt, E, off_ptr, sched_ptr, NB, BM)


@_jit
def gluon_shared_group_gemm_kernel(
    x_ptr,
    y_ptr,
    off_ptr,
    sched_ptr,
    addr_ptr,
    E,
    N,
    K,
    KP,
    stride_xm,
    stride_ym,
    BM: gl.constexpr,
    STAGES: gl.constexpr,
    WSTAGES: gl.constexpr,
    GROUP: gl.constexpr,
    SYM: gl.constexpr,
    PW: gl.constexpr,
    PREGS: gl.constexpr,
    CREGS: gl.constexpr,
    USES: gl.constexpr,
    FENCE: gl.constexpr,
):
    """The ``gluon_group_gemm_kernel`` contract with the weight operand in shared memory (block comment above):
    the MMA warpgroup (default partition, launch with num_warps=4), two converter warpgroups (CREGS registers each;
    they split each K block's 128 weight rows, or with USES take alternate ring uses) and the producer (PW warps,
    PREGS registers).
    WSTAGES: depth of the bf16 weight ring; BM up to 128."""
    # the converters' and the MMA's releases of each use
    codes_smem, pair_smem, x_smem, full, empty = _producer_ring(BM, STAGES, PW, (1 if USES else 2) + 1)
    w_smem = gl.allocate_shared_memory(
        gl.bfloat16, [WSTAGES, BN, PACK_K], gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    )
    wfull = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
    wempty = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(WSTAGES):
        mbarrier.init(wfull.index(i), count=1 if USES else 2)
        mbarrier.init(wempty.index(i), count=1)
    # fmt: off
    # one line per partition: the two converters differ only in their index (constexprs must stay literal here)
    gl.warp_specialize(
        [
            (_shared_mma, (y_ptr, off_ptr, sched_ptr, E, N, KP, stride_ym, x_smem, w_smem, full, empty, wfull, wempty,
                           BM, STAGES, WSTAGES, FENCE)),
            (_converter, (off_ptr, sched_ptr, addr_ptr, E, N, KP, codes_smem, pair_smem, w_smem, full, empty, wfull,
                          wempty, BM, STAGES, WSTAGES, GROUP, SYM, 0, USES)),
            (_converter, (off_ptr, sched_ptr, addr_ptr, E, N, KP, codes_smem, pair_smem, w_smem, full, empty, wfull,
                          wempty, BM, STAGES, WSTAGES, GROUP, SYM, 1, USES)),
            (_producer, (x_ptr, off_ptr, sched_ptr, addr_ptr, E, N, K, KP, stride_xm, codes_smem, pair_smem, x_smem,
                         full, empty, BM, STAGES, GROUP, PW)),
        ],
        [4, 4, PW],
        [CREGS, CREGS, PREGS],
    )
    # fmt: on
    _invalidate(full, empty, STAGES)
    _invalidate(wfull, wempty, WSTAGES)


# ---------------------------------------------------------------------------------------------- host side

# Launch shape (sm_90a compiles, module docstring): Triton pads the warp-specialised CTA to whole warpgroups
# (.reqntid 256), so a 1-warp producer leaves 3 warps idle and spills its pointer tensors at 40 registers;
# 4 producer warps hold them in 64. maxnreg 128 makes the
# launch 256 x 128 registers (two CTAs per SM); setmaxnreg then gives the consumer 256 - PRODUCER_REGS = 192.
PRODUCER_WARPS, PRODUCER_REGS, MAXNREG = 4, 64, 128
STAGE_BYTES_FIXED = TILE_N // 4 * 256 + TILE_N * 4  # codes + (scale, zero) pairs per ring stage
SMEM_PER_CTA = 113 * 1024  # two CTAs per SM on H100/H200 (227 KiB, 1 KiB reserved per CTA)


def stage_bytes(bm: int) -> int:
    """Shared-memory bytes of one ring stage at BM token rows."""
    return STAGE_BYTES_FIXED + bm * BLOCK_K * 2


def default_stages(bm: int) -> int:
    """The deepest ring (at most 6 stages) that leaves two CTAs per SM (BM 16/32/64: 6/6/4)."""
    return max(2, min(6, (SMEM_PER_CTA - 1024) // stage_bytes(bm)))


# Shared-memory weight operand (``gluon_shared_group_gemm_kernel``): one CTA per SM of four warpgroups (MMA, two
# converters, producer), so 65536 / 512 = 128 registers a thread at launch; setmaxnreg then gives each converter
# CONVERTER_REGS[split], the producer PRODUCER_REGS and the MMA warpgroup the rest (rows: 4 x 128 - 2 x 120 - 64 =
# 208; uses, each converter unpacking all 128 rows: 4 x 128 - 2 x 152 - 64 = 144).
SHARED_MAXNREG, CONVERTER_REGS = 128, {"rows": 120, "uses": 152}
SMEM_ONE_CTA = 227 * 1024  # one CTA per SM on H100/H200
W_STAGE_BYTES = TILE_N * BLOCK_K * 2  # one bf16 weight tile [BN, 128]


def shared_stages(bm: int) -> "tuple[int, int]":
    """(ring depth, weight-ring depth) of the shared-operand kernel at BM token rows: three weight tiles, then
    the deepest ring (at most 6) in the rest of one CTA's shared memory (BM 16/32/64: 6/6/5)."""
    wstages = 3
    return max(2, min(6, (SMEM_ONE_CTA - 1024 - wstages * W_STAGE_BYTES) // stage_bytes(bm))), wstages


def default_bm(rows_per_expert: float) -> int:
    """Token rows per tile for this many rows per expert on average (the Triton path's rule, capped at 64)."""
    return 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64


def check_scheme(scheme) -> None:
    """Raise ValueError unless this kernel runs scheme ``scheme``: 4-bit weight-only integer codes in fragment
    order with (scale, zero) pairs (grouped asymmetric, e.g. ``w4a16_g128_asym``) or per-channel scales."""
    s = scheme
    ok = s.weight_only and s.fmt == "int" and s.w_bits == 4 and not s.is_full_precision
    ok = ok and ((s.group_size > 0 and s.group_size % BLOCK_K == 0 and not s.symmetric) or s.group_size == -1)
    if not ok:
        raise ValueError(
            f"gluon_group_gemm runs 4-bit weight-only schemes with (scale, zero) pairs (w4a16_g128_asym) or "
            f"per-channel scales (w4a16_g-1_asym, w4a16_g-1_sym), not '{s}'; use mxmoe.kernels.group_gemm"
        )


def gluon_group_gemm(
    x,
    offsets,
    group,
    *,
    bm: "int | None" = None,
    stages: "int | tuple[int, int] | None" = None,
    num_programs: "int | None" = None,
    programs_per_sm: int = 2,
    producer_warps: int = PRODUCER_WARPS,
    producer_regs: int = PRODUCER_REGS,
    depth: int = 0,
    fence: bool = True,
    operand: str = "registers",
    split: str = "rows",
    validate: bool = True,
):
    """Grouped GEMM ``y[r] = x[r] @ W_e^T`` for rows ``offsets[e] <= r < offsets[e+1]`` with the Gluon kernel.

    x: [T, K] bf16 on a Hopper GPU; offsets: [E+1] int (rising from 0 to T); group: an ExpertGroup (or a list
    of PackedWeights) whose experts all have one scheme ``check_scheme`` accepts. bm: tokens per tile (16, 32,
    64; default from the rows per expert); stages: ring depth (default ``default_stages(bm)``);
    num_programs: persistent programs (default ``programs_per_sm`` x SM count); producer_warps (1, 2 or 4),
    producer_regs, depth (0, 1 or 2: ``gluon_group_gemm_kernel``) and fence: kernel variants. operand: where the
    unpacked weight tile meets the wgmma: "registers" (``gluon_group_gemm_kernel``, two CTAs per SM) or "shared"
    (``gluon_shared_group_gemm_kernel``: two converter warpgroups store it to shared memory, splitting each K
    block's weight rows, or with ``split="uses"`` taking alternate K blocks; one CTA per SM, stages = (ring,
    weight ring) depths, depth unused). ``validate`` checks the
    offsets as ``group_gemm`` does (an asynchronous device assertion). Returns y: [T, N] bf16.
    Raises ValueError for a scheme or input it does not run, RuntimeError without Gluon or a CUDA GPU."""
    group = expert_group(group)
    if len(group.schemes) != 1:
        raise ValueError(f"gluon_group_gemm runs one scheme per launch, got {[str(s) for s in group.schemes]}")
    s = group.schemes[0]
    check_scheme(s)
    if x.dim() != 2 or x.shape[1] != group.k:
        raise ValueError(f"x must be [T, K={group.k}], got shape {tuple(x.shape)}")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16, got {x.dtype}")
    if group.k % 8:
        raise ValueError(f"K={group.k}: x rows are copied 16 bytes at a time, K must be a multiple of 8")
    if offsets.dim() != 1 or offsets.numel() != len(group) + 1:
        raise ValueError(f"offsets must have E+1 = {len(group) + 1} entries, got shape {tuple(offsets.shape)}")
    if operand not in ("registers", "shared") or split not in CONVERTER_REGS:
        raise ValueError(
            f"operand must be 'registers' or 'shared' and split 'rows' or 'uses', got {operand!r}, {split!r}"
        )
    if bm is not None and bm not in (16, 32, 64):
        raise ValueError(f"bm must be 16, 32 or 64, got {bm}")
    if producer_warps not in (1, 2, 4) or depth not in (0, 1, 2):
        raise ValueError("producer_warps must be 1, 2 or 4 and depth 0, 1 or 2")
    if GLUON_ERROR is not None:
        raise RuntimeError(f"this Triton has no usable Gluon: {GLUON_ERROR}")
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] != 9:
        raise RuntimeError("gluon_group_gemm needs a Hopper GPU (sm_90a)")
    if x.device != group.device or offsets.device != x.device:
        raise ValueError(f"x ({x.device}), offsets ({offsets.device}) and experts ({group.device}) must share a device")
    t = x.shape[0]
    if validate:
        _check_offsets(offsets, t, len(group))
    y = torch.empty(t, group.n, dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    x = x.contiguous()
    if x.data_ptr() % 16:
        raise ValueError("x must start on a 16-byte boundary (16-byte copies)")
    offsets = offsets.to(torch.int32)
    bm = bm or default_bm(t / len(group))
    sched = group.schedule((s,))
    args = (x, y, offsets, sched, group.addr, sched.shape[0], group.n, group.k, group.k_pad, x.stride(0), y.stride(0))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if operand == "shared":
        ring, wring = stages or shared_stages(bm)
        need = ring * stage_bytes(bm) + wring * W_STAGE_BYTES
        if min(ring, wring) < 2 or need > SMEM_ONE_CTA - 1024:
            raise ValueError(f"stages=({ring}, {wring}) at bm={bm} needs {need} bytes of shared memory")
        with device_guard(x.device):
            gluon_shared_group_gemm_kernel[(num_programs or sms,)](
                *args,
                BM=bm,
                STAGES=ring,
                WSTAGES=wring,
                GROUP=s.group_size,
                SYM=s.symmetric,
                PW=producer_warps,
                PREGS=producer_regs,
                CREGS=CONVERTER_REGS[split],
                USES=split == "uses",
                FENCE=fence,
                num_warps=4,
                maxnreg=SHARED_MAXNREG,
            )
        return y
    stages = stages or default_stages(bm)
    if stages < 2 or stages * stage_bytes(bm) > SMEM_PER_CTA:
        raise ValueError(f"stages={stages} at bm={bm} needs {stages * stage_bytes(bm)} bytes of shared memory")
    with device_guard(x.device):
        gluon_group_gemm_kernel[(num_programs or programs_per_sm * sms,)](
            *args,
            BM=bm,
            STAGES=stages,
            GROUP=s.group_size,
            SYM=s.symmetric,
            PW=producer_warps,
            PREGS=producer_regs,
            DEPTH=depth,
            FENCE=fence,
            num_warps=4,
            maxnreg=MAXNREG,
        )
    return y
