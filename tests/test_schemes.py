import pytest

from mxmoe.schemes import BF16, HOPPER_SCHEMES, Scheme, scheme_set


@pytest.mark.parametrize(
    "text", [str(s) for s in HOPPER_SCHEMES] + ["w3a8_g64_asym", "w8a16_g-1_sym_fp8", "w1a16_g32_asym"]
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
    assert len(scheme_set("w4a16_g128_asym,w8a8_g-1_sym")) == 2
    with pytest.raises(ValueError, match="unknown scheme set"):
        scheme_set("nonsense")
