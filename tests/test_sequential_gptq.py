import warnings

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
    report = quantize_model_gptq(
        q, CALIB, uniform_scheme_map(q, "w4a4_g-1_sym"), hadamard=True, min_tokens=4, progress=False
    )
    out = logits(q)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    assert report.summary()["rotation"] == {"seed": 0, "kind": "hadamard"}


def _per_expert_layer(b, experts, plan, report, rotate_down, min_tokens, gptq_kw, int_weights=None, codes_device=None):
    """The expert-by-expert reference: gate, up, then down of one expert before the next one."""
    from mxmoe.quant.apply import set_block_weight
    from mxmoe.quant.experts import expert_weights, hessian_of, intermediate, quantize_block
    from mxmoe.quant.hadamard import apply_online_hadamard
    from mxmoe.schemes import BF16

    for tokens in experts:
        schemes = {n: plan.get((b.layer, tokens.expert, n), BF16) for n in ("gate", "up", "down")}
        if all(s.is_full_precision for s in schemes.values()):
            continue
        w, hessian = expert_weights(b, tokens.expert), hessian_of(tokens.x)
        for name in ("gate", "up", "down"):
            if schemes[name].is_full_precision:
                continue
            if name == "down":
                h = intermediate(tokens.x, w, schemes)  # [T, I] from the quantized gate/up
                hessian = hessian_of(apply_online_hadamard(h) if rotate_down and h.shape[0] else h)
            q = quantize_block(w[name], schemes[name], hessian, min_tokens, **gptq_kw)
            if q.how == "rtn-fallback":
                report.rtn_fallbacks.append(
                    {
                        "layer": b.layer,
                        "expert": tokens.expert,
                        "block": name,
                        "tokens": int(tokens.x.shape[0]),
                        "reason": q.reason,
                    }
                )
            else:
                report.gptq_blocks += 1
            w[name] = q.weight.dequantize()
            set_block_weight(b, tokens.expert, name, w[name])


@pytest.mark.parametrize("hadamard", [False, True])
def test_batched_layers_equal_expert_by_expert(monkeypatch, hadamard):
    import mxmoe.quant.experts as experts
    import mxmoe.quant.sequential as seq
    from mxmoe.models import moe_blocks
    from mxmoe.quant.apply import block_weight, expert_ids

    choice = ["w3a16_g-1_asym", "w4a8_g16_sym", "bf16", "w3a16_g-1_asym", "w8a8_g-1_sym_fp8", "w4a16_g128_asym"]
    pick = torch.Generator().manual_seed(5)
    scheme_map = {
        k: choice[int(torch.randint(len(choice), (1,), generator=pick))] for k in uniform_scheme_map(fresh(), "bf16")
    }
    calls = []  # the schemes of each batched GPTQ
    real = experts.gptq_quantize_batched
    monkeypatch.setattr(experts, "gptq_quantize_batched", lambda w, h, s, **k: calls.append(s) or real(w, h, s, **k))
    expected_calls = 0  # one per (layer, gate+up or down, weight shape) with a quantized block
    for b in moe_blocks(fresh()):
        for names in (("gate", "up"), ("down",)):
            expected_calls += len(
                {
                    tuple(block_weight(b, e, n).shape)
                    for e in expert_ids(b)
                    for n in names
                    if scheme_map[b.layer, e, n] != "bf16"
                }
            )
    models, reports = [], []
    for layer_fn in (seq._quantize_layer, _per_expert_layer):
        monkeypatch.setattr(seq, "_quantize_layer", layer_fn)
        m = fresh()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports.append(
                quantize_model_gptq(m, CALIB[:2], scheme_map, hadamard=hadamard, min_tokens=12, progress=False)
            )
        models.append(m)
        if layer_fn is not _per_expert_layer:
            batched_calls = list(calls)
    batched, ref = reports
    assert len(batched_calls) == expected_calls and any(len(set(map(str, c))) > 2 for c in batched_calls)
    assert batched.gptq_blocks == ref.gptq_blocks > 0 and batched.rtn_fallbacks == ref.rtn_fallbacks != []
    for b, rb in zip(moe_blocks(models[0]), moe_blocks(models[1])):
        for e in expert_ids(b):
            for name in ("gate", "up", "down"):
                assert torch.equal(block_weight(b, e, name), block_weight(rb, e, name)), (b.layer, e, name)
    torch.testing.assert_close(logits(models[0]), logits(models[1]), rtol=0, atol=0)


def test_one_layer_with_stored_inputs_equals_a_fresh_calibration_forward(monkeypatch):
    """The proxy check quantizes one layer of many copies with many schemes: the layer's inputs are computed once."""
    from mxmoe.models.blocks import BLOCKS, moe_blocks
    from mxmoe.quant import sequential
    from mxmoe.quant.apply import expert_ids

    def one_layer(model, layer, scheme):
        b = next(b for b in moe_blocks(model) if b.layer == layer)
        return {(layer, e, n): scheme for e in expert_ids(b) for n in BLOCKS}

    inputs = {}
    for layer, scheme in ((1, "w3a16_g-1_asym"), (1, "w4a8_g-1_sym"), (0, "w3a16_g-1_asym")):
        fresh_run, stored = fresh(), fresh()
        kw = dict(hadamard=True, seed=1, min_tokens=4, progress=False)
        quantize_model_gptq(fresh_run, CALIB, one_layer(fresh_run, layer, scheme), **kw)
        had_inputs = layer in inputs
        if had_inputs:  # no calibration forward: the stored inputs are used
            monkeypatch.setattr(sequential, "LayerwiseRunner", lambda *a, **k: pytest.fail("ran the windows again"))
        quantize_model_gptq(stored, CALIB, one_layer(stored, layer, scheme), layer_inputs=inputs, **kw)
        monkeypatch.undo()
        assert list(inputs) == [layer]  # one layer's inputs kept at a time
        torch.testing.assert_close(logits(stored), logits(fresh_run), rtol=0, atol=0)
        assert had_inputs == (scheme == "w4a8_g-1_sym")
