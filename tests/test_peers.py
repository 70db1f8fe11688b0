"""The benchmark's peers on CPU: vLLM's skip path and its int4 layout and API adapter (against a fake vLLM
that multiplies by the weights the layout describes), routing for whole layers, the row columns."""

import sys
import types

import pytest
import torch

from mxmoe.bench import peers
from mxmoe.bench.cases import expert_loads
from mxmoe.kernels import pack


def _experts(e: int, n: int, k: int, scheme: str = peers.VLLM_INT4_SCHEME, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [pack(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), scheme) for _ in range(e)]


def test_vllm_peers_are_skipped_with_one_line_when_vllm_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ModuleNotFoundError
    note = peers.vllm_fused_experts()
    assert isinstance(note, str) and note.startswith("vLLM peers skipped") and "\n" not in note
    calls, why = peers.vllm_layer_peers(None, None, None, None, None, ([], []))
    assert calls == {} and why == note


@pytest.mark.parametrize("k", [256, 320])  # 320: a shorter last group of 128
def test_int4_layout_holds_our_codes_exactly(k):
    pws = _experts(3, 24, k)
    q, scales, group = peers.vllm_int4_layout(pws, torch.float32)
    assert q.shape == (3, 24, k // 2) and q.dtype == torch.uint8 and scales.shape == (3, 24, -(-k // 128))
    assert group == 128
    u = pws[1].int_weight().q + 8  # [N, K] codes 1..15
    assert torch.equal(q[1].int() & 15, u[:, 0::2]) and torch.equal(q[1].int() >> 4, u[:, 1::2])  # even k: low nibble
    ours = torch.stack([pw.dequantize() for pw in pws])  # [E, N, K]
    assert torch.equal(peers.vllm_int4_dequantize(q, scales, group), ours)
    q16, s16, _ = peers.vllm_int4_layout(pws, torch.float16)  # our grouped scales are fp16 already: exact
    assert torch.equal(peers.vllm_int4_dequantize(q16, s16, group), ours)
    qb, sb, _ = peers.vllm_int4_layout(pws, torch.bfloat16)  # vLLM in bf16: scales lose 3 mantissa bits
    torch.testing.assert_close(peers.vllm_int4_dequantize(qb, sb, group), ours, rtol=2**-8, atol=0)


@pytest.mark.parametrize(
    "scheme, k, match",
    [
        ("w4a16_g128_asym", 256, "symmetric 4-bit grouped"),
        ("w4a16_g-1_sym", 256, "symmetric 4-bit grouped"),
        ("w8a16_g-1_sym", 256, "symmetric 4-bit grouped"),
        ("w4a16_g128_sym", 257, "must be even"),
    ],
)
def test_int4_layout_rejects_what_vllm_cannot_hold(scheme, k, match):
    with pytest.raises(ValueError, match=match):
        peers.vllm_int4_layout(_experts(2, 8, k, scheme), torch.float32)


def _fake_vllm(monkeypatch, new_api: bool) -> list:
    """A vllm whose fused_experts computes the layer in float32 from the weights it is handed (dequantizing
    int4 with ``vllm_int4_dequantize``); returns the list of keyword arguments of each call."""
    seen = []

    def layer(x, w1, w2, topk_weights, topk_ids, scales=None):
        if scales is not None:
            s1, s2, group = scales
            w1, w2 = peers.vllm_int4_dequantize(w1, s1, group), peers.vllm_int4_dequantize(w2, s2, group)
        return peers.reference_layer(x, topk_ids, topk_weights, w1, w2)

    if new_api:

        def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, quant_config=None):
            seen.append({"quant_config": quant_config})
            qc = quant_config
            scales = None if qc is None else (qc["w1_scale"], qc["w2_scale"], qc["block_shape"][1])
            return layer(hidden_states, w1, w2, topk_weights, topk_ids, scales)

    else:

        def fused_experts(
            hidden_states,
            w1,
            w2,
            topk_weights,
            topk_ids,
            inplace=False,
            use_int4_w4a16=False,
            w1_scale=None,
            w2_scale=None,
            block_shape=None,
        ):
            seen.append({"use_int4_w4a16": use_int4_w4a16, "block_shape": block_shape})
            scales = (w1_scale, w2_scale, block_shape[1]) if use_int4_w4a16 else None
            return layer(hidden_states, w1, w2, topk_weights, topk_ids, scales)

    names = ["vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.fused_moe"]
    for name in names + ["vllm.model_executor.layers.fused_moe.config"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm.model_executor.layers.fused_moe"].fused_experts = fused_experts
    sys.modules["vllm.model_executor.layers.fused_moe.config"].int4_w4a16_moe_quant_config = (
        lambda w1_scale, w2_scale, w1_zp, w2_zp, block_shape: dict(
            w1_scale=w1_scale, w2_scale=w2_scale, w1_zp=w1_zp, w2_zp=w2_zp, block_shape=block_shape
        )
    )
    return seen


@pytest.mark.parametrize("new_api", [False, True], ids=["kwargs-api", "quant-config-api"])
def test_vllm_adapter_runs_our_weights_through_either_api(monkeypatch, new_api):
    seen = _fake_vllm(monkeypatch, new_api)
    e, h, inter, tokens, top_k = 8, 256, 128, 6, 2
    w1, w2 = torch.randn(e, 2 * inter, h), torch.randn(e, h, inter)  # [E, 2I, H], [E, H, I]
    gu = [pack(w, peers.VLLM_INT4_SCHEME) for w in w1]
    dn = [pack(w, peers.VLLM_INT4_SCHEME) for w in w2]
    idx = peers.routed_ids(expert_loads(tokens, e, top_k), tokens, top_k)  # [T, k]
    wts = torch.softmax(torch.randn(tokens, top_k), dim=1)
    x = torch.randn(tokens, h)
    calls, note = peers.vllm_layer_peers(x, idx, wts, w1, w2, (gu, dn))
    assert note is None and set(calls) == {peers.VLLM_BF16, peers.VLLM_INT4}
    torch.testing.assert_close(calls[peers.VLLM_BF16](), peers.reference_layer(x, idx, wts, w1, w2))
    ours = peers.reference_layer(
        x, idx, wts, torch.stack([pw.dequantize() for pw in gu]), torch.stack([pw.dequantize() for pw in dn])
    )
    torch.testing.assert_close(calls[peers.VLLM_INT4](), ours)  # float32 scales here: the same weights
    if new_api:
        assert seen[-1]["quant_config"]["block_shape"] == [0, 128] and seen[-1]["quant_config"]["w1_zp"] is None
    else:
        assert seen[-1] == {"use_int4_w4a16": True, "block_shape": [0, 128]}


def test_torch_bf16_layer_peer_matches_the_float32_layer():
    e, h, inter, tokens, top_k = 8, 64, 32, 10, 2
    rows = expert_loads(tokens, e, top_k)
    idx = peers.routed_ids(rows, tokens, top_k)
    wts = torch.softmax(torch.randn(tokens, top_k), dim=1)
    w1, w2 = torch.randn(e, 2 * inter, h).bfloat16(), torch.randn(e, h, inter).bfloat16()
    x = torch.randn(tokens, h).bfloat16()
    layer = peers.torch_layer_peers(x, idx, wts, w1, w2)[peers.BF16_PEER]()
    assert peers.rel_err(layer, peers.reference_layer(x, idx, wts, w1, w2)) < 2e-2  # bf16 GEMM outputs


def test_routed_ids_give_every_expert_its_rows_and_tokens_distinct_experts():
    tokens, top_k = 16, 4
    rows = expert_loads(tokens, 60, top_k)
    idx = peers.routed_ids(rows, tokens, top_k)  # [T, k]
    assert idx.shape == (tokens, top_k) and idx.dtype == torch.int32
    assert torch.bincount(idx.reshape(-1).long(), minlength=60).tolist() == rows
    assert all(len(set(r)) == top_k for r in idx.tolist())
    with pytest.raises(ValueError, match="sum to tokens x top_k"):
        peers.routed_ids([3, 1], 2, 2)


def test_ratios_and_moved_bytes():
    rows = [
        {"v": peers.BF16_PEER, "ms": 2.0},
        {"v": peers.FP8_PEER, "ms": 1.0, "ms_with_act_quant": 1.5},
        {"v": "ours_w4a8", "ms": 0.8, "ms_with_act_quant": 1.0},
        {"v": "ours_w4a16", "ms": 1.2},
        {"v": "broken", "error": "x"},
    ]
    peers.add_ratios(rows, "v", "ms")
    assert rows[2]["speedup_vs_torch_bf16"] == 2.5 and rows[2]["speedup_vs_torch_fp8"] == 1.25
    assert rows[2]["speedup_vs_torch_fp8_with_act_quant"] == 1.5  # 1.5 / 1.0: both quantize in the call
    assert rows[3]["speedup_vs_torch_fp8_with_act_quant"] == 1.25  # weight-only: nothing to quantize
    assert rows[1]["speedup_vs_torch_fp8"] == 1.0 and "speedup_vs_torch_bf16" not in rows[4]
    pws = _experts(2, 16, 256, "w4a8_g128_sym_fp8") + _experts(1, 16, 256, "w4a16_g128_asym")
    got = peers.ours_bytes(pws, [3, 0, 2], 16, 256)
    assert got == pws[0].nbytes + pws[2].nbytes + 3 * (256 + 4 * 2) + 2 * 2 * 256 + 2 * 16 * 5
    assert peers.peer_bytes(peers.BF16_PEER, [3, 0, 2], 16, 256) == 2 * 2 * 16 * 256 + 2 * 5 * 256 + 2 * 5 * 16
    assert peers.moved_fraction(3_000_000, 1.0, 3000.0) == pytest.approx(1e-3)
