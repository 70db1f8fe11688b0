"""The kernel's inline PTX, run by a small emulator of the instructions it uses, against the layout contract the
interpreter path implements: under TRITON_INTERPRET=1 the asm is replaced by its emulation in Triton, so these
tests are what ties the GPU's upcasts to the CPU-tested code."""

import re

import numpy as np
import pytest
import torch

from mxmoe.kernels.triton_kernel import E4M3_ASM, NIBBLE_ASM, PAIR_ASM, PAIR_HI_ASM

MASK = np.uint64(0xFFFFFFFF)


def _f16x2(x: np.ndarray) -> np.ndarray:
    """uint32 words [n] -> float16 [n, 2] (low half first)."""
    return x.astype(np.uint32).view(np.float16).reshape(-1, 2)


def _lop3(a, b, c, lut: int):
    """Bitwise 3-input function given by its truth table: bit (4 a + 2 b + c) of lut."""
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & MASK


def run_ptx(asm: str, inputs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Execute the asm's instructions on uint32 arrays; operands $n are given/returned by number."""
    regs: dict[str, np.ndarray] = {f"${n}": v.astype(np.uint64) for n, v in inputs.items()}
    n = len(next(iter(inputs.values())))

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok.startswith("{"):
            lo, hi = (val(t) for t in tok.strip("{}").split(","))
            return (lo & np.uint64(0xFFFF)) | (hi & np.uint64(0xFFFF)) << np.uint64(16)
        if tok in regs:
            return regs[tok]
        return np.full(n, int(tok, 0), dtype=np.uint64)

    body = str(getattr(asm, "value", asm)).strip().strip("{}")
    for line in filter(None, (ln.strip() for ln in body.split(";"))):
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in re.split(r",(?![^{]*\})", rest)]
        args = [val(t) for t in src]
        if op == "mov.b32":
            out = args[0]
        elif op == "shr.b32":
            out = args[0] >> args[1]
        elif op == "shl.b32":
            out = (args[0] << args[1]) & MASK
        elif op == "and.b32":
            out = args[0] & args[1]
        elif op == "shf.r.wrap.b32":  # funnel shift right of the 64-bit pair (hi = b, lo = a), low word
            n_ = args[2] & np.uint64(31)
            out = ((args[1] << np.uint64(32) | args[0]) >> n_) & MASK
        elif op == "lop3.b32":
            out = _lop3(*args[:3], int(src[3], 0))
        elif op == "sub.f16x2":
            d = (_f16x2(args[0]) - _f16x2(args[1])).astype(np.float16)
            out = d.reshape(-1).view(np.uint32).astype(np.uint64)
        elif op == "cvt.rn.satfinite.e4m3x2.f16x2":
            h = torch.from_numpy(_f16x2(args[0]).astype(np.float32)).to(torch.float8_e4m3fn)
            b = h.view(torch.uint8).numpy().astype(np.uint64)  # [n, 2]: low half, high half
            out = b[:, 0] | b[:, 1] << np.uint64(8)
        else:
            raise AssertionError(f"emulator lacks {op}")
        regs[dst] = out
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$") and int(k[1:]) not in inputs}


def _halves(words: np.ndarray) -> np.ndarray:
    """uint32 words [n] -> their two 16-bit halves [n, 2], low first."""
    return np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], 1)


def _bf16(bits: np.ndarray) -> np.ndarray:
    """16-bit bf16 patterns -> float values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


rng = np.random.default_rng(0)


def test_nibble_asm_gives_128_plus_code_in_position_order():
    """Word of 8 codes, position t at nibble 4 (t % 2) + t // 2 -> bf16 128 + u, positions 0..7 in order."""
    w = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    out = run_ptx(NIBBLE_ASM, {4: w})
    got = _bf16(np.concatenate([_halves(out[r]) for r in range(4)], 1))  # [n, 8]
    t = np.arange(8)
    want = (w[:, None] >> (4 * (4 * (t % 2) + t // 2)).astype(np.uint64) & np.uint64(15)) + 128
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("hi", [False, True])
def test_pair_asm_gives_128_plus_code_in_position_order(hi):
    """Word of 16 2-bit fields, position t at field 8 (t % 2) + t // 2, and (3 bits) bit 2 of position 2 j / 2 j + 1
    at bit j / 16 + j of the second input -> bf16 128 + u, positions 0..15 in order."""
    lo = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    h = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    out = run_ptx(PAIR_HI_ASM if hi else PAIR_ASM, {8: lo, 9: h} if hi else {8: lo})
    got = _bf16(np.concatenate([_halves(out[r]) for r in range(8)], 1))  # [n, 16]
    t = np.arange(16)
    u = lo[:, None] >> (2 * (8 * (t % 2) + t // 2)).astype(np.uint64) & np.uint64(3)
    if hi:
        u |= (h[:, None] >> (16 * (t % 2) + t // 2).astype(np.uint64) & np.uint64(1)) << np.uint64(2)
    np.testing.assert_array_equal(got, (u + 128).astype(np.float32))


def test_e4m3_asm_gives_codes_over_512_per_register():
    """Word of 8 sign-and-magnitude codes, (register g, byte j): |q| at bits 8 j + 4 g, sign at bit 8 j + 7 (g = 0) or
    8 ((j + 1) % 4) + 3 (g = 1) -> e4m3 q / 512, register g's bytes."""
    w = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    out = run_ptx(E4M3_ASM, {2: w})
    got = np.stack([out[g] for g in range(2)], 1)  # [n, 2] words of 4 e4m3 bytes
    bytes_ = (got[:, :, None] >> (8 * np.arange(4)).astype(np.uint64) & np.uint64(255)).astype(np.uint8)
    vals = torch.from_numpy(bytes_).view(torch.float8_e4m3fn).float().numpy()  # [n, g, j]
    g, j = np.arange(2)[:, None], np.arange(4)[None, :]
    mag = w[:, None, None] >> (8 * j + 4 * g).astype(np.uint64) & np.uint64(7)
    sign = w[:, None, None] >> np.where(g == 0, 8 * j + 7, 8 * ((j + 1) % 4) + 3).astype(np.uint64) & np.uint64(1)
    np.testing.assert_array_equal(vals, np.where(sign == 1, -1.0, 1.0) * mag.astype(np.float32) / 512)


def test_e4m3_asm_reads_the_codes_pack_stores():
    """The words ``pack`` writes for a w4a8 fp8 weight, through the asm, are its codes q / 512 in the fp8 MMA's
    fragment order (row 16 a + 8 g + 2 b + d, K 64 c + 32 s + 16 p + 4 e + j of word 32 c + 16 d + 4 e + 2 s + p)."""
    from mxmoe.kernels import pack

    pw = pack(torch.randn(32, 256), "w4a8_g-1_sym_fp8")
    q = pw.int_weight().q  # [32, 256] in -7..7
    words = pw.data.view(2, 8, 64, 4).to(torch.int64)  # [kb, byte row 4 a + b, word, byte]
    words = (words << (8 * torch.arange(4))).sum(-1).numpy().astype(np.uint64).reshape(-1)
    out = run_ptx(E4M3_ASM, {2: words})
    got = np.stack([out[g] for g in range(2)], 1)  # [words, g]
    bytes_ = (got[:, :, None] >> (8 * np.arange(4)).astype(np.uint64) & np.uint64(255)).astype(np.uint8)
    vals = torch.from_numpy(bytes_).view(torch.float8_e4m3fn).float().reshape(2, 2, 4, 2, 2, 4, 2, 2, 2, 4)
    # [kb, a, b, c, d, e, s, p, g, j] -> [a, g, b, d | kb, c, s, p, e, j]
    vals = vals.permute(1, 8, 2, 4, 0, 3, 6, 7, 5, 9).reshape(32, 256)
    torch.testing.assert_close(vals * 512, q.float(), rtol=0, atol=0)
