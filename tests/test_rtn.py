import pytest
import torch

from mxmoe.quant import quantize_activation, quantize_weight, quantize_weight_int
from mxmoe.quant.rtn import FP8_MAX


def test_asym_grid_by_hand():
    w = torch.tensor([[0.0, 0.4, 1.6, 3.0, 10.0, 10.0, 10.0, 10.0]])
    # group 1: min 0, max 3, 2 bits -> s = 1, q = round(x) = [0, 0, 2, 3]; group 2 is constant: kept, no NaN
    out = quantize_weight(w, "w2a16_g4_asym")
    assert out.tolist() == [[0.0, 0.0, 2.0, 3.0, 10.0, 10.0, 10.0, 10.0]]
    iw = quantize_weight_int(w, "w2a16_g4_asym")
    assert iw.q.tolist() == [[0, 0, 2, 3, 0, 0, 0, 0]] and iw.scale.tolist() == [[1.0, 0.0]]


def test_sym_grid_by_hand():
    w = torch.tensor([[-7.0, 3.4, 0.0, 7.0]])  # absmax 7, 4 bits: levels ±7, s = 1
    assert quantize_weight(w, "w4a16_g-1_sym").tolist() == [[-7.0, 3.0, 0.0, 7.0]]
    assert quantize_weight_int(w, "w4a16_g-1_sym").q.tolist() == [[-7, 3, 0, 7]]


def test_all_zero_rows_and_groups_never_nan():
    w = torch.zeros(3, 256)
    for s in ("w4a16_g128_asym", "w4a4_g128_sym", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8", "w2a16_g128_asym"):
        out = quantize_weight(w, s)
        assert torch.equal(out, w), s
        assert torch.equal(quantize_activation(w, s), w), s


def test_last_group_shorter_when_group_does_not_divide_k():
    torch.manual_seed(0)
    w = torch.randn(4, 576)  # SmolLM2 hidden size: 4.5 groups of 128
    iw = quantize_weight_int(w, "w4a16_g128_asym")
    assert iw.scale.shape == (4, 5)
    tail = quantize_weight(w[:, 512:], "w4a16_g64_asym")  # the last group sees only its own 64 values
    torch.testing.assert_close(quantize_weight(w, "w4a16_g128_asym")[:, 512:], tail)


def test_grouped_scales_are_stored_in_fp16():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    iw = quantize_weight_int(w, "w3a16_g128_asym")
    assert torch.equal(iw.scale, iw.scale.half().float()) and torch.equal(iw.zero, iw.zero.half().float())


def test_activation_per_token_and_per_group():
    x = torch.tensor([[127.0, -63.7, 1.0, 0.2], [1.0, 0.5, 0.25, 0.0]])
    assert quantize_activation(x, "w8a8_g-1_sym")[0].tolist() == [127.0, -64.0, 1.0, 0.0]
    grouped = quantize_activation(x, "w4a4_g2_sym")  # groups [127, -63.7] and [1, 0.2]: scales 127/7 and 1/7
    assert grouped[0, 2].item() == 1.0 and grouped[0, 3].item() == pytest.approx(1 / 7)
    assert torch.equal(quantize_activation(x, "w4a16_g128_asym"), x)


def test_fp8_with_group_is_rejected():
    with pytest.raises(ValueError, match="per-channel"):
        quantize_weight(torch.ones(2, 2), "w8a16_g128_sym_fp8")


def test_activation_with_no_tokens():
    x = torch.zeros(0, 576)
    assert quantize_activation(x, "w4a4_g128_sym").shape == (0, 576)


@pytest.mark.parametrize("group", [-1, 128])
def test_w4a8_fp8_weight_grid_is_the_integer_grid_and_exact_in_e4m3(group):
    """The weight of w4a8_g{G}_sym_fp8 is the w4a8_g{G}_sym grid; its codes survive a round trip through e4m3."""
    w = torch.randn(16, 320, generator=torch.Generator().manual_seed(2)) * torch.rand(16, 1)
    iw = quantize_weight_int(w, f"w4a8_g{group}_sym_fp8")
    ref = quantize_weight_int(w, f"w4a8_g{group}_sym")
    assert iw.q.dtype == torch.int32 and torch.equal(iw.q, ref.q) and torch.equal(iw.scale, ref.scale)
    assert int(iw.q.abs().max()) == 7
    assert torch.equal(iw.q.float().to(torch.float8_e4m3fn).float(), iw.q.float())
    codes = torch.arange(-15, 16, dtype=torch.float32)  # every code up to 5 bits is exact in e4m3
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)
    assert torch.equal(quantize_weight(w, f"w4a8_g{group}_sym_fp8"), quantize_weight(w, f"w4a8_g{group}_sym"))


def test_fp8_activations_per_token_and_per_group():
    """fp8 activations: e4m3 with s = absmax / 448 per token (g-1) or per token and group (g > 0)."""
    x = torch.tensor([[448.0, 1.0, 3.0, 0.1], [2.0, -4.0, 0.0, 0.0]])
    per_token = quantize_activation(x, "w4a8_g-1_sym_fp8")
    assert torch.equal(per_token, quantize_activation(x, "w8a8_g-1_sym_fp8"))
    assert per_token[0, :2].tolist() == [448.0, 1.0] and per_token[1, 1].item() == -4.0
    grouped = quantize_activation(x, "w4a8_g2_sym_fp8")  # groups [448, 1] and [3, 0.1]: scales 1 and 3/448
    s = 3.0 / FP8_MAX
    want = torch.tensor(0.1 / s).to(torch.float8_e4m3fn).float() * s
    assert grouped[0, 2].item() == pytest.approx(3.0) and grouped[0, 3].item() == pytest.approx(want.item())
    assert per_token[0, 3].item() != pytest.approx(grouped[0, 3].item())  # the group's own scale is finer
    assert torch.equal(quantize_activation(torch.zeros(3, 256), "w4a8_g128_sym_fp8"), torch.zeros(3, 256))
