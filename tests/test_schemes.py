import pytest

from mxmoe.schemes import BF16, HOPPER_SCHEMES, Scheme, scheme_set


@pytest.mark.parametrize(
    "text",
    [str(s) for s in HOPPER_SCHEMES]
    + ["w3a8_g64_asym", "w8a16_g-1_sym_fp8", "w1a16_g32_asym", "w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8"]
    + ["w2a8_g-1_sym_fp8", "w5a8_g64_sym_fp8"],
)
def test_round_trip(text):
    assert str(Scheme.parse(text)) == text
    assert Scheme.parse(str(Scheme.parse(text))) == Scheme.parse(text)


def test_fields_and_bits():
    s = Scheme.parse("w4a16_g128_asym")
    assert (s.w_bits, s.a_bits, s.group_size, s.symmetric, s.weight_only, s.fmt) == (4, 16, 128, False, True, "int")
    assert Scheme.parse("w2a16_g128_asym").bits_per_weight == 2.25
    assert Scheme.parse("w4a4_g128_sym").bits_per_weight == 4.25
    assert Scheme.parse("w3a16_g128_asym").bits_per_weight == 3.25
    assert Scheme.parse("w8a8_g-1_sym").bits_per_weight == 8.0
    assert Scheme.parse("w8a8_g-1_sym_fp8").fmt == "fp8"
    assert not Scheme.parse("w4a4_g-1_sym").weight_only
    assert Scheme.parse("bf16") is BF16 and BF16.bits_per_weight == 16 and BF16.weight_only


def test_w4a8_fp8_fields_and_bits():
    """Integer 4-bit codes on fp8 tensor cores: symmetric, 8-bit activations, the paper's bit accounting."""
    g1, g128 = Scheme.parse("w4a8_g-1_sym_fp8"), Scheme.parse("w4a8_g128_sym_fp8")
    assert (g128.w_bits, g128.a_bits, g128.group_size, g128.symmetric, g128.fmt) == (4, 8, 128, True, "fp8")
    assert g1.bits_per_weight == 4.0 and g128.bits_per_weight == 4.25  # like w4a4_g128_sym: scale + zero slot
    assert not g128.weight_only and not g128.fp8_weight and not g1.fp8_weight
    assert Scheme.parse("w8a8_g-1_sym_fp8").fp8_weight and Scheme.parse("w8a16_g-1_sym_fp8").fp8_weight
    assert not Scheme.parse("w4a8_g-1_sym").fp8_weight and not Scheme.parse("bf16").fp8_weight


@pytest.mark.parametrize(
    "bad, match",
    [
        ("w4a8_g128_asym_fp8", "symmetric.*'w4a8_g128_sym_fp8'"),
        ("w4a16_g128_sym_fp8", "8-bit e4m3 activations"),
        ("w4a4_g-1_sym_fp8", "8-bit e4m3 activations"),
        ("w6a8_g-1_sym_fp8", r"W in 2\.\.5 \(codes exact in e4m3\)"),
        ("w1a8_g-1_sym_fp8", r"W in 2\.\.5"),
        ("w8a8_g128_sym_fp8", "8-bit and per-channel"),
    ],
)
def test_invalid_fp8_combinations_say_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        Scheme.parse(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "w4a16",
        "w4a16_g128",
        "w4a16_g0_asym",
        "w9a16_g128_asym",
        "w4a1_g-1_sym",
        "w4a16_g128_asym_fp8",
        "int4",
        "",
        "w4a16_g-2_sym",
    ],
)
def test_malformed_quotes_string_and_grammar(bad):
    with pytest.raises(ValueError) as e:
        Scheme.parse(bad)
    msg = str(e.value)
    assert repr(bad) in msg or f"'{bad}'" in msg or "fp8" in msg
    assert "w{W}a{A}" in msg or "fp8 schemes" in msg


def test_hopper_set_contents():
    names = {str(s) for s in HOPPER_SCHEMES}
    for required in [
        "bf16",
        "w8a16_g-1_sym",
        "w4a16_g-1_asym",
        "w4a16_g128_asym",
        "w3a16_g128_asym",
        "w2a16_g128_asym",
        "w8a8_g-1_sym",
        "w8a8_g-1_sym_fp8",
        "w4a8_g-1_sym",
        "w4a4_g-1_sym",
    ]:
        assert required in names
    assert all(s.weight_only for s in scheme_set("weight_only"))
    assert all(s.fmt == "fp8" and s.a_bits == 8 for s in scheme_set("fp8"))  # fp8 activations throughout
    assert len(scheme_set("w4a16_g128_asym,w8a8_g-1_sym")) == 2
    with pytest.raises(ValueError, match="unknown scheme set"):
        scheme_set("nonsense")
