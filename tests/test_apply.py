import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from test_models import LegacyMixtralSparseMoeBlock

import mxmoe.quant.apply as apply_module
from mxmoe.errors import MxMoEError
from mxmoe.models import moe_blocks
from mxmoe.models.zoo import tiny_model
from mxmoe.quant import quantize_activation, quantize_weight, quantize_weight_int
from mxmoe.quant.apply import (
    BadBlockKey,
    UnsupportedScheme,
    apply_schemes,
    block_weight,
    expert_ids,
    scheme_map_from_rows,
    scheme_map_to_rows,
    set_block_weight,
    shared_key,
    uniform_scheme_map,
)
from mxmoe.schemes import Scheme

torch.set_num_threads(1)  # tiny tensors: a second thread only spins on the shared 2-core machine


@functools.lru_cache(maxsize=None)
def _built(name):
    return tiny_model(name)


def fresh(name):
    """A private copy of a tiny model (building one takes seconds)."""
    return copy.deepcopy(_built(name))


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_all_bf16_keeps_logits(name):
    ref = logits(fresh(name))
    model = fresh(name)
    report = apply_schemes(model, uniform_scheme_map(model, "bf16"))
    assert report.blocks_per_scheme == {}
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)


def test_online_hadamard_in_full_precision_keeps_logits():
    ref = logits(fresh("tiny-qwen2-moe"))
    model = fresh("tiny-qwen2-moe")
    apply_schemes(model, {}, online_hadamard=True)
    torch.testing.assert_close(logits(model), ref, rtol=1e-4, atol=1e-4)


def test_weight_only_equals_replaced_weights():
    s = "w3a16_g16_asym"
    manual = fresh("tiny-qwen2-moe")
    for b in moe_blocks(manual):
        for e in expert_ids(b):
            for n in ("gate", "up", "down"):
                set_block_weight(b, e, n, quantize_weight(block_weight(b, e, n), s))
    model = fresh("tiny-qwen2-moe")
    report = apply_schemes(model, uniform_scheme_map(model, s))
    assert report.blocks_per_scheme == {s: 2 * 9 * 3}  # 2 layers x (8 routed + 1 shared) x 3 blocks
    torch.testing.assert_close(logits(model), logits(manual), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(fresh("tiny-qwen2-moe")), atol=1e-3)


def test_given_int_weights_are_used():
    model = fresh("tiny-mixtral")
    b = moe_blocks(model)[0]
    s = Scheme.parse("w4a16_g-1_sym")
    iw = quantize_weight_int(torch.zeros_like(block_weight(b, 2, "up")), s)  # all-zero weight on the grid
    report = apply_schemes(model, {(b.layer, 2, "up"): s}, weights={(b.layer, 2, "up"): iw})
    assert report.from_int_weights == 1
    assert torch.count_nonzero(b.expert_weight(2, "up")) == 0


def manual_block(b, x, plan):
    """MoE block output [T, H] from the (already quantized) weights, quantizing each block's input by hand."""
    bf16 = Scheme.parse("bf16")

    def mlp(e, v):
        sg, su, sd = (plan.get((b.layer, e, n), bf16) for n in ("gate", "up", "down"))
        wg, wu, wd = (block_weight(b, e, n) for n in ("gate", "up", "down"))
        h = F.silu(quantize_activation(v, sg) @ wg.T) * (quantize_activation(v, su) @ wu.T)
        return quantize_activation(h, sd) @ wd.T

    weights, idx = b.route(x)
    out = mlp(shared_key(0), x)
    out = torch.sigmoid(b.shared_gate(x)) * out
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], idx[t]):
            out[t] += w * mlp(int(e), x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("dense_max", [apply_module.DENSE_EXPERTS_MAX_NEURONS, 0], ids=["masked-dense", "per-expert"])
def test_activation_quantization_per_block(dense_max, monkeypatch):
    """Both experts paths (every expert masked by its routing weight; the routed experts one by one) compute what
    quantizing each block's input by hand does."""
    monkeypatch.setattr(apply_module, "DENSE_EXPERTS_MAX_NEURONS", dense_max)
    model = fresh("tiny-qwen2-moe")
    b = moe_blocks(model)[1]
    x = torch.randn(10, b.hidden_size, generator=torch.Generator().manual_seed(3))
    used = {int(e) for e in b.route(x)[1].flatten()}
    e0, e1 = sorted(used)[:2]
    plan = {
        (b.layer, e0, "gate"): Scheme.parse("w8a4_g-1_sym"),
        (b.layer, e0, "up"): Scheme.parse("w8a8_g-1_sym"),
        (b.layer, e0, "down"): Scheme.parse("w4a4_g16_sym"),
        (b.layer, e1, "down"): Scheme.parse("w8a16_g-1_sym"),
        (b.layer, shared_key(0), "up"): Scheme.parse("w8a4_g-1_sym"),
    }
    apply_schemes(model, plan)
    with torch.no_grad():
        got = b.module(x[None])[0]
        expected = manual_block(b, x, plan)
        weight_only = manual_block(b, x, {})  # same quantized weights, no activation quantization
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - weight_only).norm() > 1e-3 * weight_only.norm()


def test_both_experts_paths_agree_with_online_rotation_and_unrouted_experts(monkeypatch):
    model = fresh("tiny-qwen2-moe")
    b = moe_blocks(model)[0]
    x = torch.randn(3, b.hidden_size, generator=torch.Generator().manual_seed(5))  # 3 tokens x top-2: experts idle
    assert len({int(e) for e in b.route(x)[1].flatten()}) < b.num_experts
    plan = {k: Scheme.parse("w4a4_g16_sym") for k in uniform_scheme_map(model, "w4a4_g16_sym") if k[2] == "down"}
    plan.update(
        {(b.layer, 1, "gate"): Scheme.parse("w8a8_g-1_sym"), (b.layer, 2, "up"): Scheme.parse("w8a8_g-1_sym_fp8")}
    )
    apply_schemes(model, plan, online_hadamard=True)
    outs = []
    for dense_max in (apply_module.DENSE_EXPERTS_MAX_NEURONS, 0):
        monkeypatch.setattr(apply_module, "DENSE_EXPERTS_MAX_NEURONS", dense_max)
        with torch.no_grad():
            outs.append(b.module(x[None])[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_per_expert_layout_hooks():
    torch.manual_seed(0)
    block = LegacyMixtralSparseMoeBlock()
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].block_sparse_moe = block
    x = torch.randn(7, 16)
    orig_down = block.experts[1].w2.weight.detach().clone()
    with torch.no_grad():
        before = block(x)
    plan = {(0, 1, "down"): Scheme.parse("w4a4_g-1_sym")}
    apply_schemes(model, plan)
    (b,) = moe_blocks(model)
    with torch.no_grad():
        got = block(x)
        h = F.silu(x @ block.experts[1].w1.weight.T) * (x @ block.experts[1].w3.weight.T)
        direct = block.experts[1].w2.weight @ quantize_activation(h, plan[(0, 1, "down")])[0]
    torch.testing.assert_close(block.experts[1](x)[0], direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(b.expert_weight(1, "down"), quantize_weight(orig_down, plan[(0, 1, "down")]))


@pytest.mark.parametrize(
    "key, err",
    [
        ((7, 0, "gate"), "not an MoE layer"),
        ((1, 8, "gate"), "out of range"),
        ((1, 0, "o_proj"), "block must be"),
        ((1, "shared3", "up"), "shared"),
        ((1, 0), "tuples"),
    ],
)
def test_bad_keys_are_rejected_before_any_change(key, err):
    model = fresh("tiny-qwen2-moe")
    ref = logits(model)
    with pytest.raises(BadBlockKey, match=err):
        apply_schemes(model, {(0, 0, "gate"): "w4a16_g-1_asym", key: "w4a16_g-1_asym"})
    torch.testing.assert_close(logits(model), ref)


def test_unsupported_scheme_and_double_apply():
    model = fresh("tiny-mixtral")
    with pytest.raises(UnsupportedScheme, match="at least 2 bits"):
        apply_schemes(model, {(0, 0, "gate"): "w1a16_g-1_sym"})
    apply_schemes(model, {(0, 0, "gate"): "w2a16_g-1_asym"})
    with pytest.raises(MxMoEError, match="already"):
        apply_schemes(model, {})


def test_scheme_map_rows_round_trip():
    model = fresh("tiny-qwen2-moe")
    smap = {(1, 3, "down"): Scheme.parse("w4a4_g-1_sym"), (0, "shared0", "gate"): Scheme.parse("w8a8_g-1_sym_fp8")}
    rows = json.loads(json.dumps(scheme_map_to_rows(smap)))
    assert scheme_map_from_rows(rows) == smap
    apply_schemes(model, scheme_map_from_rows(rows))
    with pytest.raises(BadBlockKey, match="fields"):
        scheme_map_from_rows([{"layer": 0, "expert": 1}])
