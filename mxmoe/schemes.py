"""Quantization schemes: ``w{W}a{A}_g{G}_{sym|asym}[_fp8]`` and ``bf16``.

A scheme fixes how one linear block is stored and computed:

* ``W``  weight bits (1..8), ``A`` activation bits (2..8, or 16 for weight-only);
* ``G``  group size along the input dimension K (``-1``: one group per output channel);
* ``sym`` / ``asym`` weight grid (activations are always symmetric);
* ``_fp8`` e4m3 (float8) tensor cores instead of integer ones; always symmetric:

  - ``w8a8`` / ``w8a16`` ``_g-1_sym_fp8``: the weight itself is stored in e4m3, scaled per
    output channel (``w8a16``: upcast to bf16 for a 16-bit dot; ``w8a8``: an fp8 dot with e4m3
    activations per token);
  - ``w{2..5}a8_g{-1|G}_sym_fp8`` (e.g. ``w4a8_g128_sym_fp8``, the Hopper "W4AFP8" scheme): the
    weight is a symmetric integer grid exactly as in ``w4a8_g128_sym`` (codes ``q`` in
    ``±(2^(W-1) - 1)``, a scale per channel or per group of G along K), and ``|q| <= 15`` is
    exactly representable in e4m3, so the codes enter an fp8 dot unchanged; activations are e4m3
    per token (per token and group of G when G > 0, like the integer schemes), the group scales
    apply to the fp32 partial sum of each group. Zero points are not offered (asymmetric grids
    would need each row's activation sum per group in the epilogue), nor widths above 5 bits
    (6-bit codes reach 31, which e4m3 does not hold exactly).

Bit accounting follows the paper: a grouped scheme stores a 16-bit scale and a 16-bit
zero point per group, so it costs ``W + 32 / G`` bits per weight (g128 adds 0.25); a
per-channel scheme (g-1) costs ``W``. Symmetric grouped schemes, which store no zero point, are
counted the same way, so that every ``G`` costs the same whatever the grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRAMMAR = (
    "w{W}a{A}_g{G}_{sym|asym}[_fp8] with W in 1..8, A in 2..8 or 16, G = -1 (per channel) "
    "or a positive group size, e.g. 'w4a16_g128_asym', 'w8a8_g-1_sym_fp8', 'w4a8_g128_sym_fp8'; or 'bf16'"
)
FP8_CODE_BITS = (2, 5)  # integer weight widths whose symmetric codes (|q| <= 15) are exact in e4m3
_PATTERN = re.compile(r"^w(\d+)a(\d+)_g(-1|\d+)_(sym|asym)(_fp8)?$")


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme; ``Scheme.parse(str(s)) == s`` for every valid scheme."""

    w_bits: int
    a_bits: int
    group_size: int = -1
    symmetric: bool = True
    fmt: str = "int"  # "int" | "fp8" | "bf16" (full precision)

    def __post_init__(self):
        if self.fmt == "bf16":
            if (self.w_bits, self.a_bits, self.group_size) != (16, 16, -1):
                raise ValueError(f"bf16 scheme must be w16a16 g-1, got {self!r}")
            return
        if self.fmt not in ("int", "fp8"):
            raise ValueError(f"scheme format must be 'int', 'fp8' or 'bf16', got {self.fmt!r}")
        if not 1 <= self.w_bits <= 8:
            raise ValueError(f"weight bits must be 1..8 in scheme '{self}'; grammar: {GRAMMAR}")
        if not (2 <= self.a_bits <= 8 or self.a_bits == 16):
            raise ValueError(f"activation bits must be 2..8 or 16 in scheme '{self}'; grammar: {GRAMMAR}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group size must be -1 or positive in scheme '{self}'; grammar: {GRAMMAR}")
        if self.fmt == "fp8":
            self._check_fp8()

    def _check_fp8(self) -> None:
        """fp8 schemes: e4m3 weights (8-bit, per channel) or exact integer codes on fp8 activations."""
        lo, hi = FP8_CODE_BITS
        if not self.symmetric:
            try:
                hint = f"; use '{Scheme(self.w_bits, self.a_bits, self.group_size, True, 'fp8')}'"
            except ValueError:  # the symmetric form is not a valid scheme either
                hint = ""
            raise ValueError(f"fp8 schemes are symmetric (a zero point does not fit the fp8 dot), got '{self}'{hint}")
        if self.w_bits == 8:
            if self.a_bits not in (8, 16) or self.group_size != -1:
                raise ValueError(
                    f"fp8 schemes with e4m3 weights are 8-bit and per-channel (w8a8_g-1_sym_fp8 or "
                    f"w8a16_g-1_sym_fp8), got '{self}'"
                )
        elif not lo <= self.w_bits <= hi or self.a_bits != 8:
            raise ValueError(
                f"fp8 schemes with integer weights take W in {lo}..{hi} (codes exact in e4m3) and 8-bit "
                f"e4m3 activations, e.g. 'w4a8_g-1_sym_fp8' or 'w4a8_g128_sym_fp8'; got '{self}'"
            )

    @classmethod
    def parse(cls, text: "str | Scheme") -> "Scheme":
        """Parse a scheme string; raises ValueError quoting the string and the grammar."""
        if isinstance(text, Scheme):
            return text
        if not isinstance(text, str):
            raise ValueError(f"scheme must be a string, got {type(text).__name__} {text!r}; grammar: {GRAMMAR}")
        s = text.strip().lower()
        if s in ("bf16", "fp16", "w16a16"):
            return BF16
        m = _PATTERN.match(s)
        if not m:
            raise ValueError(f"malformed scheme string {text!r}; expected {GRAMMAR}")
        w, a, g, sym, fp8 = m.groups()
        return cls(int(w), int(a), int(g), sym == "sym", "fp8" if fp8 else "int")

    def __str__(self) -> str:
        if self.fmt == "bf16":
            return "bf16"
        text = f"w{self.w_bits}a{self.a_bits}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"
        return text + ("_fp8" if self.fmt == "fp8" else "")

    @property
    def weight_only(self) -> bool:
        """True when activations stay in 16 bits (bf16 counts as weight-only)."""
        return self.a_bits == 16

    @property
    def fp8_weight(self) -> bool:
        """True when the weight itself is stored in e4m3 (the 8-bit fp8 schemes); narrower fp8 schemes
        store integer codes (see the module docstring)."""
        return self.fmt == "fp8" and self.w_bits == 8

    @property
    def is_full_precision(self) -> bool:
        """True for the unquantized bf16 scheme."""
        return self.fmt == "bf16"

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight with the paper's accounting (scale + zero = 32 bits per group)."""
        if self.group_size > 0:
            return self.w_bits + 32 / self.group_size
        return float(self.w_bits)

    def effective_group(self, k: int) -> int:
        """Group length along an input dimension of size ``k`` (g-1 means the whole row)."""
        return k if self.group_size < 0 else min(self.group_size, k)


BF16 = Scheme(16, 16, -1, True, "bf16")

# What Hopper (H100/H200) runs in our kernel. 4-bit activations compute at int8 rate:
# Hopper has no int4 tensor cores. Weight-only widths come per channel (g-1) and g128, as in the
# paper's candidate set, so a 2.25-bit budget can still mix (w2 g-1 is 2.0 bits). W4A8 "_fp8" runs its
# 4-bit integer codes on the fp8 tensor cores (exact in e4m3), with fp8 activations per token.
HOPPER_SCHEMES = tuple(
    Scheme.parse(s)
    for s in (
        "bf16",
        "w8a16_g-1_sym",
        "w4a16_g-1_asym",
        "w4a16_g128_asym",
        "w3a16_g-1_asym",
        "w3a16_g128_asym",
        "w2a16_g-1_asym",
        "w2a16_g128_asym",
        "w8a8_g-1_sym",
        "w8a8_g-1_sym_fp8",
        "w4a8_g-1_sym",
        "w4a8_g-1_sym_fp8",
        "w4a8_g128_sym_fp8",
        "w4a4_g-1_sym",
        "w4a4_g128_sym",
    )
)

# Named scheme sets used by the allocation (paper §5: weight-only and weight-activation runs; "fp8": Hopper's
# fp8 tensor cores with fp8 activations everywhere, as torch's fp8 grouped GEMM, and 4-bit integer codes run
# exactly as e4m3 for W4A8 (results/kernels/NOTES.md: a 4.25-bit mix of them 1.39-1.52x that GEMM, H100)).
SCHEME_SETS = {
    "hopper": HOPPER_SCHEMES,
    "weight_only": tuple(s for s in HOPPER_SCHEMES if s.weight_only),
    "w5a5": tuple(Scheme.parse(s) for s in ("w4a4_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_sym")),
    "fp8": tuple(Scheme.parse(s) for s in ("w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8", "w8a8_g-1_sym_fp8")),
}


def scheme_set(name: str) -> tuple[Scheme, ...]:
    """Return a named scheme set ('hopper', 'weight_only', 'w5a5') or parse a comma-separated list."""
    if name in SCHEME_SETS:
        return SCHEME_SETS[name]
    if "," in name or _PATTERN.match(name.strip().lower()) or name.strip().lower() == "bf16":
        return tuple(Scheme.parse(s) for s in name.split(",") if s.strip())
    raise ValueError(
        f"unknown scheme set {name!r}; use one of {sorted(SCHEME_SETS)} or a comma-separated list of schemes"
    )
