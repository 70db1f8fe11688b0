"""Kernel-vs-reference cases run under the Triton interpreter in a child process.

``python tests/kernel_interp_cases.py`` (with TRITON_INTERPRET=1) prints one JSON object:
{"seed": int, "cases": {name: {"rel": float, "row_rel": float, "finite": bool}}}. test_kernels.py
runs it once and asserts on every case; the inputs are fresh random draws each run (seed reported).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from mxmoe.kernels import TileConfig, group_gemm, pack, quantize_activations, reference_group_gemm  # noqa: E402
from mxmoe.kernels.group_gemm import ExpertGroup  # noqa: E402
from mxmoe.kernels.moe import attach_packed_experts, moe_experts_forward, register_experts_implementation, route  # noqa: E402
from mxmoe.quant import quantize_weight_int  # noqa: E402
from mxmoe.schemes import HOPPER_SCHEMES, Scheme  # noqa: E402

# outside the Hopper set: the unsigned 8-bit weight-only path; symmetric 4-bit weight-only (no zero point);
# integer codes on fp8 tensor cores (w4a8 fp8 per channel and per 128-group, and a 3-bit code: two planes)
EXTRA = [
    Scheme.parse(s)
    for s in ("w8a16_g128_asym", "w4a16_g128_sym", "w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8", "w3a8_g128_sym_fp8")
]
W4A8_FP8_MIXED = [
    "w4a8_g128_sym_fp8",
    "w8a8_g-1_sym_fp8",
    "w4a8_g-1_sym_fp8",
    "bf16",
    "w4a4_g128_sym",
    "w4a16_g128_asym",
]
MIXED = ["w4a16_g128_asym", "w8a8_g-1_sym", "bf16", "w4a4_g128_sym", "w8a8_g-1_sym_fp8", "w3a16_g128_asym"]


def _offsets(rows: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int32)


def _compare(x, offsets, packed, ref=None, result=None, **kw) -> dict:
    y = (group_gemm(x, offsets, packed, **kw) if result is None else result).float()  # [T, N]
    r = reference_group_gemm(x, offsets, packed) if ref is None else ref
    row_err = (y - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-6)  # [T]
    return {
        "rel": float((y - r).norm() / r.norm()),
        "row_rel": float(row_err.max()),
        "finite": bool(torch.isfinite(y).all()),
    }


def _weights(n: int, k: int, count: int) -> list[torch.Tensor]:
    # outlier channels make per-channel and per-group scales differ
    return [torch.randn(n, k) * torch.rand(n, 1) * (1 + 4 * (torch.rand(1, k) > 0.97)) for _ in range(count)]


def main() -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    cases = {}
    # every scheme alone: K not a multiple of the 128 group, N not a multiple of the tile, a 0-row expert
    for s in HOPPER_SCHEMES + tuple(EXTRA):
        rows = [3, 0, 37]
        pws = [pack(w, s) for w in _weights(80, 576, len(rows))]
        cases[str(s)] = _compare(torch.randn(sum(rows), 576), _offsets(rows), pws)
    # one launch mixing six schemes, experts with 0 and 1 rows; fp32 and fp16 activations
    rows = [0, 1, 40, 5, 33, 2]
    pws = [pack(w, s) for w, s in zip(_weights(80, 576, len(rows)), MIXED)]
    x = torch.randn(sum(rows), 576)
    cases["mixed_fp32"] = _compare(x, _offsets(rows), pws)
    cases["mixed_fp16"] = _compare(x.half(), _offsets(rows), pws)
    cases["mixed_per_scheme_launches"] = _compare(x, _offsets(rows), pws, mode="per_scheme")
    cases["mixed_unified_kernel"] = _compare(x, _offsets(rows), pws, mode="unified")
    group = ExpertGroup(pws)  # activations quantized beforehand, as the token gather hands them over
    x_q = quantize_activations(x, _offsets(rows), group)
    cases["mixed_given_x_q"] = _compare(x, _offsets(rows), group, reference_group_gemm(x, _offsets(rows), pws), x_q=x_q)
    # integer codes on fp8 tensor cores beside the int8, bf16 and weight-only paths, 0- and 1-row experts
    rows = [1, 0, 40, 5, 33, 2]
    pws = [pack(w, s) for w, s in zip(_weights(80, 576, len(rows)), W4A8_FP8_MIXED)]
    x = torch.randn(sum(rows), 576)
    cases["mixed_w4a8_fp8"] = _compare(x, _offsets(rows), pws)
    cases["mixed_w4a8_fp8_unified_kernel"] = _compare(x, _offsets(rows), pws, mode="unified")
    # plain (x W^T) tiles for weight-only packed schemes (the default swaps them) beside other paths; fp8 weight-only
    plain = ["w4a16_g-1_asym", "w3a16_g128_asym", "w8a16_g-1_sym", "w8a16_g-1_sym_fp8", "w2a16_g128_asym"]
    rows = [0, 3, 34, 1, 9, 5, 2]
    pws = [pack(w, s) for w, s in zip(_weights(80, 576, len(rows)), plain + ["bf16", "w8a8_g-1_sym"])]
    configs = {s: TileConfig(32, 64, 128, 1, swap_ab=False) for s in plain}
    cases["unswapped_mixed"] = _compare(torch.randn(sum(rows), 576), _offsets(rows), pws, configs=configs)
    # 128-row transposed tiles of grouped weight-only schemes: the per-block scales load at the point of use
    # (tiles of <= 64 rows, the default here, load them one block ahead)
    tall = ["w4a16_g128_asym", "w2a16_g128_asym"]
    rows_tall = [0, 130, 1]
    pws_tall = [pack(w, s) for w, s in zip(_weights(80, 576, len(rows_tall)), tall + tall[:1])]
    cases["tall_swapped_grouped"] = _compare(
        torch.randn(sum(rows_tall), 576),
        _offsets(rows_tall),
        pws_tall,
        configs={s: TileConfig(128, 32, 128, 1, swap_ab=True) for s in tall},
    )
    pws[3] = pack(_weights(80, 576, 1)[0], "w8a16_g-1_sym_fp8")
    cases["swapped_mixed_fp8_weight_only"] = _compare(torch.randn(sum(rows), 576), _offsets(rows), pws)
    # bf16 tiles loaded through tensor descriptors (TMA on the GPU): K = 200 ends inside a K tile, N = 72 inside an
    # output tile, rows of the next expert and past the last one read as zeros; beside a weight-only slot
    rows = [0, 1, 37, 5, 3]
    pws = [pack(w, s) for w, s in zip(_weights(72, 200, len(rows)), ["bf16"] * 4 + ["w4a16_g-1_asym"])]
    configs = {"bf16": TileConfig(32, 32, 64, 1, tma=True)}
    cases["bf16_tma"] = _compare(torch.randn(sum(rows), 200), _offsets(rows), pws, configs=configs)
    # x a transposed view off a 16-byte boundary ([T, K] with strides (1, T)): copied contiguous, then aligned
    x = torch.randn(201, sum(rows))[1:].t()
    cases["bf16_tma_misaligned_transposed_x"] = _compare(x, _offsets(rows), pws, configs=configs)
    # K = 32: shorter than a K tile and than the group
    rows = [1, 0, 6]
    pws = [pack(w, s) for w, s in zip(_weights(48, 32, 3), ["w4a16_g128_asym", "w8a8_g-1_sym", "w4a4_g128_sym"])]
    cases["k32_mixed"] = _compare(torch.randn(sum(rows), 32), _offsets(rows), pws)
    pws = [pack(w, s) for w, s in zip(_weights(48, 32, 3), ["w4a8_g128_sym_fp8", "bf16", "w4a8_g-1_sym_fp8"])]
    cases["k32_w4a8_fp8"] = _compare(torch.randn(sum(rows), 32), _offsets(rows), pws)
    # N = 40 (fragment-order 4-bit codes pad N to 48 rows; a tile past them reads nothing) and K = 320 (padded to 384),
    # swapped and plain tiles
    rows = [5, 0, 12, 1]
    w4 = ["w4a16_g128_asym", "w4a16_g-1_sym", "w4a16_g-1_asym", "bf16"]
    pws = [pack(w, s) for w, s in zip(_weights(40, 320, len(rows)), w4)]
    x = torch.randn(sum(rows), 320)
    cases["w4a16_ragged_n"] = _compare(x, _offsets(rows), pws)
    configs = {s: TileConfig(32, 32, 128, 1, swap_ab=False) for s in w4[:3]}
    cases["w4a16_ragged_n_unswapped"] = _compare(x, _offsets(rows), pws, configs=configs)
    # already-quantized weights (as GPTQ hands them over): codes moved off the RTN choice run as given
    rows, ints = [4, 9], []
    for w, s in zip(_weights(64, 256, 2), ["w3a16_g128_asym", "w4a8_g-1_sym"]):
        iw = quantize_weight_int(w, Scheme.parse(s))
        lo, hi = (0, 7) if s.startswith("w3") else (-7, 7)
        iw.q = (iw.q + torch.randint(-1, 2, iw.q.shape, dtype=iw.q.dtype)).clamp(lo, hi)
        ints.append(iw)
    x = torch.randn(sum(rows), 256)
    ref = torch.cat([xe.float() @ iw.dequantize().t() for xe, iw in zip((x[:4], x[4:]), ints)])
    ref[4:] = reference_group_gemm(x, _offsets(rows), [pack(iw) for iw in ints])[4:]  # w4a8 quantizes x
    cases["intweight"] = _compare(x, _offsets(rows), [pack(iw) for iw in ints], ref)
    # GPTQ-like codes of a w4a8 fp8 scheme run as given: the reference dequantizes exactly these codes
    ints = []
    for w in _weights(64, 256, 2):
        iw = quantize_weight_int(w, Scheme.parse("w4a8_g128_sym_fp8"))
        iw.q = (iw.q + torch.randint(-1, 2, iw.q.shape, dtype=iw.q.dtype)).clamp(-7, 7)
        ints.append(iw)
    pws = [pack(iw) for iw in ints]
    cases["intweight_w4a8_fp8"] = _compare(x, _offsets(rows), pws)
    # a routed MoE experts forward (mixed schemes per expert) against the same steps on the reference
    e, h, inter, tokens, top_k = 6, 128, 96, 9, 2
    mix = ["w4a16_g128_asym", "w8a8_g-1_sym", "bf16", "w4a4_g-1_sym", "w3a16_g128_asym", "w8a8_g-1_sym_fp8"]
    gu = [pack(w, s) for w, s in zip(_weights(2 * inter, h, e), mix)]
    dn = [pack(w, s) for w, s in zip(_weights(h, inter, e), mix[::-1])]
    hidden = torch.randn(tokens, h)
    idx = torch.stack([torch.randperm(e)[:top_k] for _ in range(tokens)])  # [T, k], expert 5 may get no token
    wts = torch.softmax(torch.randn(tokens, top_k), dim=1)
    out = moe_experts_forward(hidden, idx, wts, ExpertGroup(gu), ExpertGroup(dn))
    order, offs = route(idx, e)
    hh = reference_group_gemm(hidden[order // top_k], offs, gu)
    oo = reference_group_gemm(F.silu(hh[:, :inter]) * hh[:, inter:], offs, dn)
    ref = torch.zeros(tokens, h).index_add_(0, order // top_k, oo * wts.reshape(-1)[order, None])
    cases["moe_experts_forward"] = _compare(hidden, None, None, ref, result=out)
    cases.update(_transformers_cases())
    json.dump({"seed": seed, "cases": cases}, sys.stdout)


def _transformers_cases() -> dict:
    """A tiny random Qwen2-MoE run through the 'mxmoe' experts implementation vs eager / the reference."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from mxmoe.models import moe_blocks

    cfg = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # bf16-representable weights: the all-bf16 allocation then packs them exactly
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ids = torch.randint(0, 64, (1, 12))
    register_experts_implementation()

    def reference(self, hidden, idx, wts):
        gu, dn = self.mxmoe_groups
        order, offs = route(idx, len(gu))
        h = reference_group_gemm(hidden[order // idx.shape[1]], offs, gu.packed)
        o = reference_group_gemm(self._apply_gate(h), offs, dn.packed)
        return torch.zeros_like(hidden).index_add_(0, order // idx.shape[1], o * wts.reshape(-1)[order, None])

    ALL_EXPERTS_FUNCTIONS.register("mxmoe_reference", reference)
    out = {}
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(ids).logits[0]
        for b in moe_blocks(model):
            attach_packed_experts(b, [("bf16",) * 3] * b.num_experts)
        model.set_experts_implementation("mxmoe")
        out["hf_qwen2moe_bf16_vs_eager"] = _compare(None, None, None, eager, result=model(ids).logits[0])
        mix = ["w4a16_g128_asym", "w8a8_g-1_sym", "w4a4_g-1_sym", "bf16"]
        for b in moe_blocks(model):
            attach_packed_experts(b, [(s, s, mix[(e + 1) % 4]) for e, s in enumerate(mix)])
        got = model(ids).logits[0]
        model.set_experts_implementation("mxmoe_reference")
        out["hf_qwen2moe_mixed_vs_reference"] = _compare(None, None, None, model(ids).logits[0], result=got)
        # the quantized experts really ran: their logits move away from the float model's
        out["hf_qwen2moe_mixed_vs_reference"]["vs_eager"] = float((got - eager).norm() / eager.norm())
    return out


if __name__ == "__main__":
    main()
