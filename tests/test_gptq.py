import time
import warnings

import pytest
import torch

from mxmoe.quant import quantize_weight_int
from mxmoe.quant.gptq import (
    GPTQWeight,
    HessianAccumulator,
    InsufficientCalibration,
    gptq_quantize,
    gptq_quantize_batched,
)

SCHEMES = [
    "w4a16_g128_asym",
    "w3a16_g128_asym",
    "w2a16_g128_asym",
    "w4a16_g-1_asym",
    "w8a8_g-1_sym",
    "w4a4_g128_sym",
    "w8a8_g-1_sym_fp8",
    "w4a8_g128_sym_fp8",
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
    if s.fp8_weight:
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
    if s.fp8_weight:
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


@pytest.mark.parametrize(
    "scheme",
    ["w4a16_g128_asym", "w3a16_g128_asym", "w4a4_g128_sym", "w8a8_g-1_sym", "w8a8_g-1_sym_fp8", "w4a8_g128_sym_fp8"],
)
def test_kernel_packs_gptq_codes_exactly(setup, scheme):
    from mxmoe.kernels import pack

    w, x, _ = setup
    out = gptq_quantize(w, hessian_of(x), scheme)
    stored = pack(out).int_weight()
    assert torch.equal(stored.q.to(out.q.dtype), out.q)
    # the kernel stores grouped scales and zeros in fp16: the dequantized weights agree to that rounding
    torch.testing.assert_close(stored.dequantize(), out.dequantize(), rtol=2e-3, atol=2e-3 * w.abs().max().item())


@pytest.mark.parametrize("group", [-1, 128])
def test_w4a8_fp8_gets_the_integer_schemes_gptq_codes(setup, group):
    """Integer codes on fp8 tensor cores: GPTQ rounds onto the same sym grid as the int8 scheme, code for code."""
    w, x, _ = setup
    h = hessian_of(x)
    fp8, int8 = gptq_quantize(w, h, f"w4a8_g{group}_sym_fp8"), gptq_quantize(w, h, f"w4a8_g{group}_sym")
    assert fp8.q.dtype == torch.int32 and torch.equal(fp8.q, int8.q) and torch.equal(fp8.scale, int8.scale)
    assert torch.equal(fp8.q.float().to(torch.float8_e4m3fn).float(), fp8.q.float())


def batch_instance(k: int = 200, n: int = 16):
    """Weights [7, n, k] and Hessians of experts that differ: normal, dead inputs, too few tokens,
    all inputs dead, indefinite (needs damping retries), hopeless (no damping helps)."""
    w = torch.randn(7, n, k, generator=torch.Generator().manual_seed(10))
    xs = [
        correlated(300, k, 11, basis_seed=1),
        correlated(260, k, 12, basis_seed=2),
        correlated(280, k, 13),
        correlated(8, k, 14),
        torch.zeros(40, k),
        correlated(300, k, 15, basis_seed=3),
        torch.randn(40, k),
    ]
    xs[2][:, [0, 5, k - 70, k - 1]] = 0  # dead inputs, two in the shorter last g128 group when k = 200
    hs = [hessian_of(x) for x in xs]
    evals, evecs = torch.linalg.eigh(hs[5].H.double())
    evals[0] = -0.005 * hs[5].H.diagonal().mean()  # slightly indefinite: retries until the damping covers it
    hs[5].H = (evecs @ torch.diag(evals) @ evecs.T).float()
    hs[6].H.fill_(0).diagonal().fill_(-1.0)  # hopeless: LinAlgError
    return w, hs


def run_recording(fn):
    """fn()'s result (or the exception it raised) and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            out = fn()
        except (InsufficientCalibration, torch.linalg.LinAlgError) as e:
            out = e
    return out, [str(r.message) for r in rec]


@pytest.mark.parametrize(
    "scheme,act_order,static_groups",
    [
        ("w4a16_g128_asym", True, True),
        ("w4a16_g128_asym", False, False),
        ("w3a16_g128_sym", False, True),
        ("w2a16_g64_asym", False, False),
        ("w4a16_g-1_asym", True, True),
        ("w8a8_g-1_sym", False, True),
        ("w8a8_g-1_sym_fp8", True, True),
        ("w8a8_g-1_sym_fp8", False, False),
    ],
)
def test_batched_equals_per_expert(scheme, act_order, static_groups):
    w, hs = batch_instance()
    kw = dict(
        act_order=act_order, static_groups=static_groups, blocksize=64, percdamp=1e-6, min_tokens=20, max_damp_retries=6
    )
    batched, warned = run_recording(lambda: gptq_quantize_batched(w, hs, scheme, **kw))
    assert len(batched) == len(hs)
    expected_warnings = []
    for e, h in enumerate(hs):
        ref, ref_warned = run_recording(lambda: gptq_quantize(w[e], h, scheme, **kw))
        expected_warnings += ref_warned
        out = batched[e]
        assert type(out) is type(ref), (e, out, ref)
        if isinstance(ref, Exception):
            assert str(out) == str(ref)
            continue
        assert torch.equal(out.q, ref.q) and out.q.dtype == ref.q.dtype, e
        torch.testing.assert_close(out.scale, ref.scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.zero, ref.zero, rtol=1e-6, atol=1e-7)
        assert out.loss == pytest.approx(ref.loss, rel=1e-6)
        assert (out.percdamp, out.dead_inputs, out.tokens, out.scheme) == (
            ref.percdamp,
            ref.dead_inputs,
            ref.tokens,
            ref.scheme,
        )
    assert sorted(warned) == sorted(expected_warnings)
    kinds = [GPTQWeight] * 3 + [InsufficientCalibration] * 2 + [GPTQWeight, torch.linalg.LinAlgError]
    assert all(isinstance(o, t) for o, t in zip(batched, kinds))
    assert batched[2].dead_inputs == 4
    if batched[2].scheme.symmetric:  # a zeroed column is exactly on a symmetric grid
        assert torch.all(batched[2].dequantize()[:, [0, 5, 130, 199]] == 0)
    assert batched[0].percdamp == 1e-6 and 1e-2 <= batched[5].percdamp <= 1e-1


def test_batched_rejects_bad_input():
    w, hs = batch_instance(k=40)
    with pytest.raises(ValueError, match="E, N, K"):
        gptq_quantize_batched(w[0], hs[:1], "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="7 weights but 2"):
        gptq_quantize_batched(w, hs[:2], "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="K=12"):
        gptq_quantize_batched(w[:, :, :12], hs, "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize_batched(w, hs, "w4a16_g128_asym", act_order=True, static_groups=False)
    out = gptq_quantize_batched(w[3:5], hs[3:5], "w4a16_g-1_asym", min_tokens=20)  # nothing left to batch
    assert all(isinstance(r, InsufficientCalibration) for r in out)


def test_batched_timing_against_per_expert():
    """32 experts of [32, 576]: one batched call against 32 calls (printed, not asserted; run with -s)."""
    torch.set_num_threads(1)
    e, n, k = 32, 32, 576
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(20))
    hs = [hessian_of(correlated(200, k, 30 + i)) for i in range(e)]
    t0 = time.perf_counter()
    batched = gptq_quantize_batched(w, hs, "w4a16_g128_asym")
    t1 = time.perf_counter()
    single = [gptq_quantize(w[i], hs[i], "w4a16_g128_asym") for i in range(e)]
    t2 = time.perf_counter()
    assert all(torch.equal(b.q, s.q) for b, s in zip(batched, single))
    print(
        f"\nGPTQ of {e} experts [{n}, {k}] w4a16_g128_asym on CPU (1 thread): batched {t1 - t0:.2f} s, "
        f"per expert {t2 - t1:.2f} s ({(t2 - t1) / (t1 - t0):.1f}x)"
    )


MIXED = [
    "w4a16_g128_asym",
    "w3a16_g128_sym",
    "w2a16_g64_asym",
    "w4a16_g-1_asym",
    "w8a8_g-1_sym",
    "w8a8_g-1_sym_fp8",
    "w4a4_g32_sym",
    "w4a8_g128_sym_fp8",
]


@pytest.mark.parametrize("act_order,static_groups", [(True, True), (False, True), (False, False)])
def test_mixed_scheme_batch_equals_single_scheme_calls(act_order, static_groups):
    """Every scheme on every expert of batch_instance (K=200: shorter last g128 group, dead inputs, too few
    tokens, damping retries, hopeless) in one shuffled batch, each expert's Hessian shared by its schemes."""
    w, hs = batch_instance()
    kw = dict(
        act_order=act_order, static_groups=static_groups, blocksize=64, percdamp=1e-6, min_tokens=20, max_damp_retries=6
    )
    jobs = [(e, s) for s in MIXED for e in range(len(hs))]
    order = torch.randperm(len(jobs), generator=torch.Generator().manual_seed(3)).tolist()
    jobs = [jobs[i] for i in order]
    batched, warned = run_recording(
        lambda: gptq_quantize_batched(
            torch.stack([w[e] for e, _ in jobs]), [hs[e] for e, _ in jobs], [s for _, s in jobs], **kw
        )
    )
    expected_warnings = set()
    for (e, s), out in zip(jobs, batched):
        ref, ref_warned = run_recording(lambda: gptq_quantize(w[e], hs[e], s, **kw))
        expected_warnings.update(ref_warned)
        assert type(out) is type(ref), (e, s, out, ref)
        if isinstance(ref, Exception):
            assert str(out) == str(ref)
            continue
        assert torch.equal(out.q, ref.q) and out.q.dtype == ref.q.dtype, (e, s)
        assert torch.equal(out.scale, ref.scale) and torch.equal(out.zero, ref.zero), (e, s)
        assert out.loss == pytest.approx(ref.loss, rel=1e-6)
        assert (out.percdamp, out.dead_inputs, out.tokens, out.scheme) == (
            ref.percdamp,
            ref.dead_inputs,
            ref.tokens,
            ref.scheme,
        )
    assert set(warned) == expected_warnings != set()  # once per distinct Hessian, not once per scheme


def test_mixed_schemes_reject_bad_input():
    w, hs = batch_instance(k=40)
    with pytest.raises(ValueError, match="7 weights but 2 schemes"):
        gptq_quantize_batched(w, hs, ["w4a16_g-1_asym"] * 2)
    with pytest.raises(ValueError, match="bf16"):
        gptq_quantize_batched(w, hs, ["w4a16_g-1_asym"] * 6 + ["bf16"])


def test_mixed_batch_timing_against_per_scheme_calls():
    """32 experts [32, 576] × 12 schemes: one mixed batch against 12 single-scheme calls (printed; run with -s)."""
    from mxmoe.schemes import scheme_set

    torch.set_num_threads(1)
    schemes = [s for s in scheme_set("hopper") if not s.is_full_precision]
    e, n, k = 32, 32, 576
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(20))
    hs = [hessian_of(correlated(200, k, 30 + i)) for i in range(e)]
    t0 = time.perf_counter()
    mixed = gptq_quantize_batched(w.repeat(len(schemes), 1, 1), hs * len(schemes), [s for s in schemes for _ in hs])
    t1 = time.perf_counter()
    single = [r for s in schemes for r in gptq_quantize_batched(w, hs, s)]
    t2 = time.perf_counter()
    assert all(torch.equal(a.q, b.q) for a, b in zip(mixed, single))
    print(
        f"\nGPTQ of {e} experts [{n}, {k}] x {len(schemes)} schemes on CPU (1 thread): one mixed batch "
        f"{t1 - t0:.2f} s, one call per scheme {t2 - t1:.2f} s ({(t2 - t1) / (t1 - t0):.1f}x)"
    )
