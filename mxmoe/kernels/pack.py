"""Kernel storage for one expert weight: integer codes in bit planes, 16-bit group scales.

Layout (what ``group_gemm`` reads):

* ``bf16``: the weight itself, ``[N, K]`` bfloat16.
* integer schemes: code ``u = q + 2^(b-1)`` (sym) or ``u = q`` (asym), ``b`` bits; 8-bit symmetric
  codes are stored as ``q`` itself (int8 two's complement, ``u ^ 0x80``), the int8 dot's operand
  as loaded. ``b`` is split
  into bit planes of 8, 4, 2 and 1 bits (3 bits = a 2-bit plane + a 1-bit plane, so storage is
  exactly ``b`` bits per weight). The plane of width ``p`` holds bits ``[low, low + p)`` of ``u``,
  ``low`` counting the wider planes before it. K is padded with zero codes to ``K_pad``, a multiple
  of ``PACK_K = 128``. Inside each 128-long K block, element ``r`` of a ``p``-bit plane sits in
  byte ``r % (16 p)`` of that block's ``16 p`` bytes, at bit ``(r // (16 p)) * p``: a tile of K
  reads contiguous bytes (16-byte loads) and a few shifts unpack it. Planes follow each other in
  one uint8 buffer, each ``[N, K_pad * p / 8]``.
* 4-bit weight-only integer schemes (``w4a16_*``, the memory-bound case) instead store their codes in
  *fragment order*, ``[K_pad / 128, N16 / 4, 256]`` bytes (``N16`` = N rounded up to 16, zero codes in
  the extra rows): per 128-long K block, 256 bytes for each *byte row*. Output row
  ``n = 16a + 8g + 2b + d`` and K index ``k = 128 kb + 64c + 8f + 2e + h`` go to byte row ``4a + b`` of
  block ``kb`` at nibble position ``q = 128d + 32e + 4f + 2g + h + 256c``: a thread of the warpgroup MMA
  that holds rows ``n, n + 8`` and the K pairs ``2e, 2e + 1`` of every 8 finds the 32 codes of each
  64-long half of a K block in 16 contiguous bytes (one 16-byte load), and a tile of BN rows reads
  ``BN * 64`` contiguous bytes per K block. Inside each 32-bit word the 8 positions ``t`` sit at nibbles
  ``4 (t % 2) + t // 2``, so one shift and one logic op turn a word into two bf16 pairs
  (``triton_kernel._nibble_values``).
* 2- and 3-bit weight-only integer schemes (``w2a16_*``, ``w3a16_*``) store the code's low 2 bits in
  fragment order too, ``[K_pad / 128, N16 / 4, 128]`` bytes, with the same threads' codes together:
  ``k = 128 kb + 64c + 32 fh + 8 fl + 2e + h`` goes to 32-bit word ``16d + 4e + 2c + fh`` of byte row
  ``4a + b`` at position ``t = 4 fl + 2g + h``, held in 2-bit field ``8 (t % 2) + t // 2`` (one 16-byte
  load per thread and K block; one shift and one logic op per bf16 pair). 3-bit codes follow with
  their top bit, ``[K_pad / 128, N16 / 4, 64]`` bytes: bit ``t // 2`` of byte ``2 word + t % 2``
  (``triton_kernel._pair_values``).
* fp8 schemes with e4m3 weights (``w8a*_g-1_sym_fp8``): the 8-bit plane holds the e4m3 bit pattern;
  4-bit fp8 schemes (``w4a8_*_sym_fp8``) store symmetric integer codes ``q`` in ``-7..7`` in the fp8 MMA's
  fragment order, ``[K_pad / 128, N16 / 4, 256]`` bytes: ``k = 128 kb + 64c + 32s + 16p + 4e + j`` of rows
  ``16a + 2b + d`` (``g = 0``) and ``+ 8`` (``g = 1``) go to 32-bit word ``32c + 16d + 4e + 2s + p`` of byte
  row ``4a + b``, as sign and magnitude: ``|q|`` at bits ``8j + 4g .. 8j + 4g + 2``, the sign at bit ``8j + 7``
  (``g = 0``) or ``8 ((j + 1) % 4) + 3`` (``g = 1``). Masked with ``0x87878787``, the word and the word rotated
  by 4 bits are the two registers (one row, four consecutive K) a thread of the fp8 warpgroup MMA holds:
  each byte ``s0000mmm`` is the e4m3 subnormal ``±m 2^-9``, exactly ``q / 512``, and the kernel takes the
  weight scale 512 times (``triton_kernel._e4m3_fragment_values``). ``-8`` has no such byte: ``pack`` refuses it
  (the symmetric grid of ``mxmoe.quant`` is ``±7``).
* scales and zero points: ``[n_groups, N]`` (transposed, so a tile's scales are contiguous);
  float16 for grouped schemes (the paper's 16+16 bits per group), float32 for per-channel ones.
  Symmetric schemes store no zero point. Grouped asymmetric fragment-order schemes (``w4a16_g128_asym``)
  store each group's scale and zero point side by side, ``scale`` = ``[n_groups, N, 2]`` float16 and no
  separate ``zero``: a tile's pairs are one 32-bit load per row, which the compiler pipelines through
  shared memory with the codes and reads straight into the rows each thread holds (two 16-bit loads per
  row are too narrow to pipeline, and their values must be shuffled into place every K block).

``PackedWeight.int_weight()`` inverts the packing, so the reference path and the tests see
exactly the codes and (16-bit-rounded) scales that the kernel reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mxmoe.quant.rtn import IntWeight, quantize_weight_int
from mxmoe.schemes import Scheme

PACK_K = 128  # K block of the packed layout; kernel K tiles divide it
PLANES = (8, 4, 2, 1)  # plane widths, widest (lowest code bits) first


def planes_of(bits: int) -> tuple[int, ...]:
    """Bit-plane widths that make up a ``bits``-bit code, e.g. 3 -> (2, 1)."""
    return tuple(p for p in PLANES if bits & p)


def check_kernel_scheme(s: Scheme) -> None:
    """Raise ValueError for a scheme the kernel cannot run (checked at pack time)."""
    if s.is_full_precision:
        return
    if s.fp8_weight and s.group_size != -1:
        raise ValueError(f"scheme '{s}': fp8 weights are scaled per channel (g-1) in the kernel")
    if s.group_size > 0 and s.group_size % PACK_K:
        raise ValueError(f"scheme '{s}': the kernel takes group sizes -1 or multiples of {PACK_K}")
    if not s.weight_only:
        if s.fmt == "int" and not s.symmetric:
            raise ValueError(f"scheme '{s}': weight-activation integer schemes must be symmetric in the kernel")
        if s.group_size not in (-1, PACK_K):
            raise ValueError(f"scheme '{s}': weight-activation schemes take group size -1 or {PACK_K} in the kernel")
        if s.a_bits > 8:
            raise ValueError(f"scheme '{s}': activation bits above 8 are not quantized; use a16")


@dataclass
class PackedWeight:
    """One expert's weight in kernel storage (see the module docstring for the layout).

    data:  bf16 [N, K] for the bf16 scheme, uint8 [N16 * K_pad * bits / 8] in fragment order for 2- to
           4-bit weight-only codes and 4-bit fp8 codes, else uint8 [sum over planes of N * K_pad * p / 8]
    scale: [n_groups, N] float16 (grouped) / float32 (per channel); None for bf16; [n_groups, N, 2] float16
           (scale, zero point) pairs where ``paired_scales`` (module docstring)
    zero:  like ``scale`` for the other asymmetric schemes, else None
    """

    scheme: Scheme
    n: int
    k: int
    data: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None

    @property
    def k_pad(self) -> int:
        """K rounded up to the packing block (``k`` for bf16)."""
        return self.k if self.scheme.is_full_precision else -(-self.k // PACK_K) * PACK_K

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of weight memory: codes plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def to(self, device) -> "PackedWeight":
        """Copy to ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(self.scheme, self.n, self.k, mv(self.data), mv(self.scale), mv(self.zero))

    def codes(self) -> torch.Tensor:
        """Unpack the stored codes ``u`` [N, K] (int32; e4m3 bit patterns for e4m3 weights)."""
        s, n, kp = self.scheme, self.n, self.k_pad
        if fragment_order(s):
            e4m3 = e4m3_fragment_order(s)
            codes = _fragment_unpack(self.data, n, kp, s.w_bits, e4m3)[:, : self.k]
            return codes + 8 if e4m3 else codes  # sign and magnitude hold q = u - 8
        u = torch.zeros(n, kp, dtype=torch.int32, device=self.device)
        start, low = 0, 0
        for p in planes_of(s.w_bits):
            size = n * kp * p // 8
            plane = self.data[start : start + size].view(n, kp // PACK_K, 16 * p).to(torch.int32)  # [N, blocks, 16p]
            fields = [(plane >> (j * p)) & ((1 << p) - 1) for j in range(8 // p)]  # each [N, blocks, 16p]
            u |= torch.cat(fields, dim=2).reshape(n, kp) << low
            start, low = start + size, low + p
        if _signed_bytes(s):
            u ^= 0x80
        return u[:, : self.k]

    def int_weight(self) -> IntWeight:
        """The stored weight as an ``IntWeight`` (codes, scales and zeros as the kernel reads them)."""
        s = self.scheme
        if s.is_full_precision:
            raise ValueError("bf16 weights are not quantized: use dequantize()")
        u = self.codes()
        if s.fp8_weight:
            q = u.to(torch.uint8).view(torch.float8_e4m3fn).float()
        else:
            q = u - (1 << (s.w_bits - 1)) if s.symmetric else u
        scale, zero = self.scale.unbind(-1) if paired_scales(s) else (self.scale, self.zero)  # [n_groups, N] each
        scale = scale.float().t().contiguous()  # [N, n_groups]
        zero = zero.float().t().contiguous() if zero is not None else torch.zeros_like(scale)
        return IntWeight(q, scale, zero, s)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K] float32."""
        if self.scheme.is_full_precision:
            return self.data.float()
        return self.int_weight().dequantize(torch.float32)


def fragment_order(s: Scheme) -> bool:
    """True when the codes of scheme ``s`` are stored in fragment order: 2- to 4-bit weight-only integer codes
    (the 16-bit MMA's order) and the 4-bit integer codes of fp8 schemes (``e4m3_fragment_order``)."""
    return (s.weight_only and s.fmt == "int" and s.w_bits in (2, 3, 4)) or e4m3_fragment_order(s)


def e4m3_fragment_order(s: Scheme) -> bool:
    """True when scheme ``s`` keeps 4-bit codes in the fp8 MMA's fragment order (``w4a8_*_fp8``)."""
    return s.fmt == "fp8" and not s.fp8_weight and s.w_bits == 4


def paired_scales(s: Scheme) -> bool:
    """True when scheme ``s`` stores (scale, zero point) pairs in ``scale`` (grouped asymmetric fragment order)."""
    return fragment_order(s) and s.group_size > 0 and not s.symmetric


def storage_bytes(s: Scheme, n: int, k: int) -> int:
    """Code bytes of an [n, k] weight of integer or fp8 scheme ``s`` (``PackedWeight.data.numel()``)."""
    rows = fragment_rows(n) if fragment_order(s) else n
    return rows * (-(-k // PACK_K) * PACK_K) * s.w_bits // 8


def fragment_rows(n: int) -> int:
    """Output rows of fragment-order storage: ``n`` rounded up to 16."""
    return -(-n // 16) * 16


_NIBBLE = torch.tensor([4 * (t % 2) + t // 2 for t in range(8)])  # nibble of position t of a 32-bit word
_PAIR = torch.tensor([8 * (t % 2) + t // 2 for t in range(16)])  # 2-bit field of position t of a 32-bit word


def _le_bytes(word: torch.Tensor) -> torch.Tensor:
    """int32 words [..., W] -> their little-endian bytes, uint8 [..., 4 W]."""
    byte = torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1)  # [..., W, 4]
    return byte.to(torch.uint8).flatten(-2)


def _le_words(byte: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_le_bytes``: uint8 [..., 4 W] -> int32 [..., W]."""
    b = byte.unflatten(-1, (-1, 4)).to(torch.int32)
    return sum(b[..., i] << (8 * i) for i in range(4))


def _nibble_rows(u: torch.Tensor) -> torch.Tensor:
    """u: [N16, K_pad] 4-bit codes -> uint8 [K_pad / 128, N16 / 4, 256] (module docstring)."""
    n16, kp = u.shape
    v = u.view(n16 // 16, 2, 4, 2, kp // 64, 8, 4, 2)  # [a, g, b, d, c, f, e, h]
    v = v.permute(0, 2, 4, 3, 6, 5, 1, 7).reshape(n16 // 4, kp // 2, 8)  # [row 4a + b, word, position t]
    word = (v << (4 * _NIBBLE.to(u.device))).sum(-1)  # [N16 / 4, K_pad / 2] int32 (wraps into the sign bit: exact)
    return _le_bytes(word).view(n16 // 4, kp // 128, 256).transpose(0, 1)


def _pair_rows(f: torch.Tensor) -> torch.Tensor:
    """f: [N16, K_pad] 2-bit fields -> uint8 [K_pad / 128, N16 / 4, 128] (module docstring)."""
    n16, kp = f.shape
    v = f.view(n16 // 16, 2, 4, 2, kp // 128, 2, 2, 4, 4, 2)  # [a, g, b, d, kb, c, fh, fl, e, h]
    v = v.permute(4, 0, 2, 3, 8, 5, 6, 7, 1, 9).reshape(kp // 128, n16 // 4, 32, 16)  # [kb, row, word, t]
    return _le_bytes((v << (2 * _PAIR.to(f.device))).sum(-1))


def _bit_rows(f: torch.Tensor) -> torch.Tensor:
    """f: [N16, K_pad] 1-bit fields -> uint8 [K_pad / 128, N16 / 4, 64] (module docstring)."""
    n16, kp = f.shape
    v = f.view(n16 // 16, 2, 4, 2, kp // 128, 2, 2, 4, 4, 2)  # [a, g, b, d, kb, c, fh, fl, e, h]
    v = v.permute(4, 0, 2, 3, 8, 5, 6, 9, 7, 1).reshape(kp // 128, n16 // 4, 64, 8)  # [kb, row, byte, bit]
    return (v << torch.arange(8, device=f.device)).sum(-1).to(torch.uint8)


# bits of code (g, j) (index 4 g + j) in its 32-bit word: magnitude |q| (3 bits) and sign (module docstring)
_E4M3_MAGNITUDE = torch.tensor([8 * j + 4 * g for g in range(2) for j in range(4)])
_E4M3_SIGN = torch.tensor([8 * j + 7 for j in range(4)] + [8 * ((j + 1) % 4) + 3 for j in range(4)])


def _e4m3_rows(q: torch.Tensor) -> torch.Tensor:
    """q: [N16, K_pad] codes in -7..7 -> uint8 [K_pad / 128, N16 / 4, 256] in the fp8 MMA's order (module docstring)."""
    n16, kp = q.shape
    v = q.view(n16 // 16, 2, 4, 2, kp // 128, 2, 2, 2, 4, 4)  # [a, g, b, d, kb, c, s, p, e, j]
    v = v.permute(4, 0, 2, 5, 3, 8, 6, 7, 1, 9).reshape(kp // 128, n16 // 4, 64, 8).long()  # [kb, row, word, (g, j)]
    dev = q.device
    word = (v.abs() << _E4M3_MAGNITUDE.to(dev)) | ((v < 0).long() << _E4M3_SIGN.to(dev))  # disjoint bits
    return _le_bytes(word.sum(-1))


def _fragment_pack(u: torch.Tensor, bits: int, e4m3: bool = False) -> torch.Tensor:
    """u: [N, K_pad] int32 codes of ``bits`` (2, 3 or 4) bits -> flat uint8 fragment-order storage (``e4m3``: the
    signed codes q in -7..7 of an fp8 scheme, stored as sign and magnitude)."""
    n, _ = u.shape
    u = torch.nn.functional.pad(u, (0, 0, 0, fragment_rows(n) - n))  # [N16, K_pad], zero codes added
    if e4m3:
        return _e4m3_rows(u).reshape(-1)
    if bits == 4:
        return _nibble_rows(u).reshape(-1)
    parts = [_pair_rows(u & 3).reshape(-1)]
    if bits == 3:
        parts.append(_bit_rows(u >> 2).reshape(-1))
    return torch.cat(parts)


def _fragment_unpack(data: torch.Tensor, n: int, kp: int, bits: int, e4m3: bool = False) -> torch.Tensor:
    """Inverse of ``_fragment_pack``: the codes [N, K_pad] int32 (``e4m3``: the signed codes q)."""
    n16 = fragment_rows(n)
    dev = data.device
    if e4m3:
        word = _le_words(data.view(kp // 128, n16 // 4, 256))[..., None]  # [kb, row, 64, 1]
        mag = (word >> _E4M3_MAGNITUDE.to(dev)) & 7
        sign = (word >> _E4M3_SIGN.to(dev)) & 1
        v = torch.where(sign == 1, -mag, mag)  # q [kb, row 4a + b, word (c, d, e, s, p), (g, j)]
        v = v.view(kp // 128, n16 // 16, 4, 2, 2, 4, 2, 2, 2, 4)  # [kb, a, b, c, d, e, s, p, g, j]
        return (
            v.permute(1, 8, 2, 4, 0, 3, 6, 7, 5, 9).reshape(n16, kp)[:n].contiguous()
        )  # [a, g, b, d | kb, c, s, p, e, j]
    if bits == 4:
        word = _le_words(data.view(kp // 128, n16 // 4, 256).transpose(0, 1).reshape(n16 // 4, kp * 2))
        v = (word[..., None] >> (4 * _NIBBLE.to(dev))) & 15  # [N16 / 4, K_pad / 2, 8]
        v = v.view(n16 // 16, 4, kp // 64, 2, 4, 8, 2, 2)  # [a, b, c, d, e, f, g, h]
        return v.permute(0, 6, 1, 3, 2, 5, 4, 7).reshape(n16, kp)[:n].contiguous()  # [a, g, b, d, c, f, e, h]
    lo_bytes = kp * n16 // 4
    word = _le_words(data[:lo_bytes].view(kp // 128, n16 // 4, 128))  # [kb, row, 32]
    v = (word[..., None] >> (2 * _PAIR.to(dev))) & 3  # [kb, row, word, t]
    if bits == 3:
        byte = data[lo_bytes:].view(kp // 128, n16 // 4, 64).to(torch.int32)
        bit = (byte[..., None] >> torch.arange(8, device=dev)) & 1  # [kb, row, byte (word, h), bit (fl, g)]
        bit = bit.view(kp // 128, n16 // 4, 32, 2, 4, 2).permute(0, 1, 2, 4, 5, 3).reshape(v.shape)  # [.., t]
        v = v | (bit << 2)
    v = v.view(kp // 128, n16 // 16, 4, 2, 4, 2, 2, 4, 2, 2)  # [kb, a, b, d, e, c, fh, fl, g, h]
    v = v.permute(1, 8, 2, 3, 0, 5, 6, 7, 4, 9).reshape(n16, kp)  # [a, g, b, d | kb, c, fh, fl, e, h]
    return v[:n].contiguous()


def _signed_bytes(s: Scheme) -> bool:
    """8-bit symmetric integer codes are stored as int8 q (see the module docstring)."""
    return s.fmt == "int" and s.symmetric and s.w_bits == 8


def _pack_codes(u: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """u: [N, K] int32 codes in [0, 2^bits) -> flat uint8 bit planes (module docstring layout)."""
    n, k = u.shape
    u = torch.nn.functional.pad(u, (0, k_pad - k))  # [N, K_pad], zero codes in the padding
    out, low = [], 0
    for p in planes_of(bits):
        field = (u >> low) & ((1 << p) - 1)
        blocks = field.view(n, k_pad // PACK_K, 8 // p, 16 * p)  # [N, blocks, slice j, byte]
        byte = torch.zeros(n, k_pad // PACK_K, 16 * p, dtype=torch.int32, device=u.device)
        for j in range(8 // p):
            byte |= blocks[:, :, j, :] << (j * p)
        out.append(byte.to(torch.uint8).reshape(-1))
        low += p
    return torch.cat(out)


def pack(w: "torch.Tensor | IntWeight", scheme: "Scheme | str | None" = None) -> PackedWeight:
    """Pack a weight for ``group_gemm``.

    ``w`` is either a float weight [N, K] (quantized here with RTN, ``quantize_weight_int``) or an
    already-quantized ``IntWeight`` (e.g. GPTQ output), which is packed exactly as given; a
    ``scheme`` passed with an ``IntWeight`` must match its own.
    """
    if isinstance(w, IntWeight):
        s = w.scheme if scheme is None else Scheme.parse(scheme)
        if s != w.scheme:
            raise ValueError(f"IntWeight was quantized with scheme '{w.scheme}', cannot pack it as '{s}'")
        iw = w
    else:
        if scheme is None:
            raise ValueError("pack(w, scheme): a float weight needs a scheme")
        s = Scheme.parse(scheme)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"pack expects a weight [N, K], got {getattr(w, 'shape', type(w))}")
        if s.is_full_precision:
            return PackedWeight(s, w.shape[0], w.shape[1], w.detach().to(torch.bfloat16).contiguous(), None, None)
        iw = None
    check_kernel_scheme(s)
    if iw is None:
        iw = quantize_weight_int(w, s)
    n, k = iw.q.shape
    k_pad = -(-k // PACK_K) * PACK_K
    if s.fp8_weight:
        u = iw.q.float().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    else:
        u = iw.q.to(torch.int32) + ((1 << (s.w_bits - 1)) if s.symmetric else 0)
        if int(u.min()) < 0 or int(u.max()) >= 1 << s.w_bits:
            raise ValueError(f"codes of a '{s}' weight fall outside its {s.w_bits}-bit grid")
        if e4m3_fragment_order(s) and int(u.min()) == 0:
            raise ValueError(
                f"a '{s}' weight has the code -8: its codes are stored as sign and magnitude (the e4m3 subnormals "
                "q / 512), which hold -7..7 only; quantize on the symmetric grid +-7 (mxmoe.quant does)"
            )
    sdt = torch.float16 if s.group_size > 0 else torch.float32
    scale = iw.scale.t().to(sdt).contiguous()  # [n_groups, N]
    zero = None if s.symmetric else iw.zero.t().to(sdt).contiguous()
    if paired_scales(s):
        scale, zero = torch.stack([scale, zero], dim=-1), None  # [n_groups, N, 2]: (s, z) pairs
    if _signed_bytes(s):
        u = u ^ 0x80
    if fragment_order(s):
        e4m3 = e4m3_fragment_order(s)
        codes = iw.q.to(torch.int32) if e4m3 else u  # e4m3: the signed codes q, stored as sign and magnitude
        data = _fragment_pack(torch.nn.functional.pad(codes, (0, k_pad - k)), s.w_bits, e4m3)
    else:
        data = _pack_codes(u, s.w_bits, k_pad)
    return PackedWeight(s, n, k, data, scale, zero)
