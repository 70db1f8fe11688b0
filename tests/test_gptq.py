import pytest
import torch

from mxmoe.quant import quantize_weight_int
from mxmoe.quant.gptq import GPTQWeight, HessianAccumulator, InsufficientCalibration, gptq_quantize

SCHEMES = [
    "w4a16_g128_asym",
    "w3a16_g128_asym",
    "w2a16_g128_asym",
    "w4a16_g-1_asym",
    "w8a8_g-1_sym",
    "w4a4_g128_sym",
    "w8a8_g-1_sym_fp8",
]


def correlated(t: int, k: int, seed: int, rank: int = 8, basis_seed: int = 0) -> torch.Tensor:
    """Low-rank + noise activations with uneven channel scales, x: [T, K]; tokens differ by seed."""
    gb = torch.Generator().manual_seed(basis_seed)
    basis = torch.randn(rank, k, generator=gb)  # [r, K]
    channel = 1 + 4 * torch.rand(k, generator=gb)  # [K]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rank, generator=g) @ basis + 0.1 * torch.randn(t, k, generator=g)
    return x * channel


def hessian_of(x: torch.Tensor, chunk: int = 100) -> HessianAccumulator:
    h = HessianAccumulator(x.shape[1])
    for c in x.split(chunk):
        h.add(c)
    return h


@pytest.fixture(scope="module")
def setup():
    k, n = 200, 48  # K=200: with g128 the last group is 72 long
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return w, correlated(600, k, 1), correlated(600, k, 2)


def test_hessian_running_mean_matches_direct():
    x = correlated(250, 40, 3)
    h = hessian_of(x, chunk=64)
    assert h.tokens == 250
    torch.testing.assert_close(h.H, 2 / 250 * x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_beats_rtn_on_correlated_inputs(setup, scheme):
    w, x, x_held = setup
    h = hessian_of(x)
    wq = gptq_quantize(w, h, scheme).dequantize()
    wr = quantize_weight_int(w, scheme).dequantize()
    ref, ref_held = x @ w.T, x_held @ w.T
    err_g, err_r = (x @ wq.T - ref).norm(), (x @ wr.T - ref).norm()
    held_g, held_r = (x_held @ wq.T - ref_held).norm(), (x_held @ wr.T - ref_held).norm()
    assert err_g < 0.8 * err_r, (scheme, float(err_g), float(err_r))
    assert held_g < 0.8 * held_r, (scheme, float(held_g), float(held_r))  # not just fitting the calibration set


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
def test_output_is_on_the_rtn_grid(setup, scheme, act_order):
    w, x, _ = setup
    out = gptq_quantize(w, hessian_of(x), scheme, act_order=act_order, blocksize=64)
    rtn = quantize_weight_int(w, scheme)
    assert isinstance(out, GPTQWeight) and out.q.shape == w.shape and out.q.dtype == rtn.q.dtype
    assert out.scale.shape == rtn.scale.shape and out.zero.shape == rtn.zero.shape
    s = out.scheme
    if s.fmt == "fp8":
        assert torch.equal(out.q, out.q.to(torch.float8_e4m3fn).float())
    elif s.symmetric:
        assert out.q.abs().max() <= 2 ** (s.w_bits - 1) - 1
    else:
        assert out.q.min() >= 0 and out.q.max() <= 2**s.w_bits - 1
    # re-quantizing the dequantized weight with the returned scales gives back the same codes
    g = s.effective_group(w.shape[1])
    scale = out.scale.repeat_interleave(g, 1)[:, : w.shape[1]]
    zero = out.zero.repeat_interleave(g, 1)[:, : w.shape[1]]
    deq = out.dequantize()
    if s.fmt == "fp8":
        again = (deq / scale).to(torch.float8_e4m3fn).float()
    else:
        again = torch.round((deq - zero) / scale).to(torch.int32)
    assert torch.equal(again, out.q)
    if act_order or s.group_size < 0:
        # static groups: each group's grid is RTN's on the original weight (no dead inputs here)
        torch.testing.assert_close(out.scale, rtn.scale, rtol=0, atol=0)
        torch.testing.assert_close(out.zero, rtn.zero, rtol=0, atol=0)
    assert out.tokens == 600 and out.dead_inputs == 0 and out.loss > 0


def test_dynamic_groups_without_act_order_differ_from_static(setup):
    w, x, _ = setup
    h = hessian_of(x)
    dyn = gptq_quantize(w, h, "w3a16_g128_asym", act_order=False, static_groups=False)
    sta = gptq_quantize(w, h, "w3a16_g128_asym", act_order=False, static_groups=True)
    rtn = quantize_weight_int(w, "w3a16_g128_asym")
    torch.testing.assert_close(dyn.scale[:, 0], rtn.scale[:, 0])  # first group starts before any update
    assert not torch.equal(dyn.scale[:, 1], rtn.scale[:, 1])  # later groups see the corrected weight
    assert torch.equal(sta.scale, rtn.scale)


def test_act_order_needs_static_groups(setup):
    w, x, _ = setup
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, hessian_of(x), "w4a16_g128_asym", act_order=True, static_groups=False)


def test_zero_tokens_raise_insufficient_calibration():
    h = HessianAccumulator(16)
    h.add(torch.zeros(0, 16))
    with pytest.raises(InsufficientCalibration, match="got 0"):
        gptq_quantize(torch.randn(4, 16), h, "w4a16_g-1_asym")


def test_min_tokens_threshold():
    h = hessian_of(correlated(10, 16, 4))
    with pytest.raises(InsufficientCalibration, match="at least 32"):
        gptq_quantize(torch.randn(4, 16), h, "w4a16_g-1_asym", min_tokens=32)
    assert gptq_quantize(torch.randn(4, 16), h, "w4a16_g-1_asym", min_tokens=10).tokens == 10


def test_all_zero_inputs_raise_insufficient_calibration():
    h = hessian_of(torch.zeros(50, 16))
    with pytest.raises(InsufficientCalibration, match="all 16 inputs are zero"):
        gptq_quantize(torch.randn(4, 16), h, "w4a16_g-1_asym")


def test_dead_inputs_are_zeroed_and_counted():
    x = correlated(300, 32, 5)
    x[:, [3, 17]] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(6))
    out = gptq_quantize(w, hessian_of(x), "w4a16_g-1_sym")
    assert out.dead_inputs == 2
    assert torch.all(out.dequantize()[:, [3, 17]] == 0)
    assert torch.isfinite(out.dequantize()).all()


def test_indefinite_hessian_retries_with_more_damping():
    h = hessian_of(correlated(300, 32, 7))
    evals, evecs = torch.linalg.eigh(h.H.double())
    evals[0] = -0.005 * h.H.diagonal().mean()  # slightly indefinite, diagonal still positive
    h.H = (evecs @ torch.diag(evals) @ evecs.T).float()
    w = torch.randn(8, 32)
    with pytest.warns(UserWarning, match="Cholesky failed"):
        out = gptq_quantize(w, h, "w4a16_g-1_asym", percdamp=1e-6, max_damp_retries=6)
    assert 1e-2 <= out.percdamp <= 1e-1 and torch.isfinite(out.dequantize()).all()


def test_hopeless_hessian_raises_linalg_error():
    h = HessianAccumulator(8)
    h.add(torch.randn(20, 8))
    h.H.fill_(0).diagonal().fill_(-1.0)
    with pytest.raises(torch.linalg.LinAlgError, match="use RTN"), pytest.warns(UserWarning):
        gptq_quantize(torch.randn(4, 8), h, "w4a16_g-1_asym", max_damp_retries=1)


def test_bad_inputs_have_clear_errors():
    h = hessian_of(correlated(50, 16, 8))
    with pytest.raises(ValueError, match="K=12"):
        gptq_quantize(torch.randn(4, 12), h, "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="bf16"):
        gptq_quantize(torch.randn(4, 16), h, "bf16")
    with pytest.raises(ValueError, match="input width"):
        h.add(torch.randn(3, 12))


def test_lazy_batches_do_not_change_the_result(setup):
    w, x, _ = setup
    h = hessian_of(x)
    a = gptq_quantize(w, h, "w4a16_g128_asym", blocksize=16)
    b = gptq_quantize(w, h, "w4a16_g128_asym", blocksize=w.shape[1])  # one block: no lazy updates
    assert (a.q != b.q).float().mean() < 1e-3  # float summation order may flip a rare tie
    assert abs(a.loss - b.loss) < 1e-3 * b.loss


@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w3a16_g128_asym", "w4a4_g128_sym", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8"])
def test_kernel_packs_gptq_codes_exactly(setup, scheme):
    from mxmoe.kernels import pack

    w, x, _ = setup
    out = gptq_quantize(w, hessian_of(x), scheme)
    stored = pack(out).int_weight()
    assert torch.equal(stored.q.to(out.q.dtype), out.q)
    # the kernel stores grouped scales and zeros in fp16: the dequantized weights agree to that rounding
    torch.testing.assert_close(stored.dequantize(), out.dequantize(), rtol=2e-3, atol=2e-3 * w.abs().max().item())
