
import pytest
import torch
from tiny import fresh

from mxmoe.quant.apply import apply_schemes, uniform_scheme_map
from mxmoe.quant.sequential import quantize_model_gptq

torch.set_num_threads(1)  # tiny tensors: a second thread only spins on the shared 2-core machine

CALIB = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(2))


def logits(model, ids=CALIB):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_gptq_error_below_rtn():
    ref = logits(fresh())
    rtn, gptq = fresh(), fresh()
    s = "w3a16_g-1_asym"
    apply_schemes(rtn, uniform_scheme_map(rtn, s))
    report = quantize_model_gptq(gptq, CALIB, uniform_scheme_map(gptq, s), min_tokens=4, progress=False)
    assert report.gptq_blocks > 0.8 * 2 * 9 * 3  # most of 2 layers x 9 experts x 3 blocks
    err_rtn, err_gptq = ((logits(m) - ref).pow(2).mean().item() for m in (rtn, gptq))
    assert err_gptq < 0.8 * err_rtn


def test_too_few_tokens_fall_back_to_rtn_counted():
    ids = CALIB[:1, :6]  # 6 tokens: every expert (shared too) has fewer than 16
    rtn, gptq = fresh(), fresh()
    s = "w4a8_g16_sym"
    apply_schemes(rtn, uniform_scheme_map(rtn, s))
    with pytest.warns(UserWarning, match="RTN"):
        report = quantize_model_gptq(gptq, ids, uniform_scheme_map(gptq, s), min_tokens=16, progress=False)
    assert report.gptq_blocks == 0 and len(report.rtn_fallbacks) == 2 * 9 * 3
    assert any(f["tokens"] == 0 for f in report.rtn_fallbacks)  # 6 tokens x top-2 cannot reach all 8 experts
    torch.testing.assert_close(logits(gptq), logits(rtn))


def test_hadamard_keeps_full_precision_and_quantizes():
    ref = logits(fresh())
    fp = fresh()
    report = quantize_model_gptq(fp, CALIB, uniform_scheme_map(fp, "bf16"), hadamard=True, seed=3, progress=False)
    assert report.rotation.seed == 3 and report.gptq_blocks == 0
    torch.testing.assert_close(logits(fp), ref, rtol=1e-4, atol=1e-4)
    q = fresh()
    report = quantize_model_gptq(q, CALIB, uniform_scheme_map(q, "w4a4_g-1_sym"), hadamard=True, min_tokens=4,
                                 progress=False)
    out = logits(q)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    assert report.summary()["rotation"] == {"seed": 0, "kind": "hadamard"}
