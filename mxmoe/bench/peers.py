"""The peers our kernel is timed against in the same run, and the columns every benchmark row carries.

GEMM peers (one grouped GEMM: rows grouped by expert, weights [E, N, K]):

* ``torch_grouped_bf16``: ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch);
* ``torch_scaled_grouped_fp8``: ``torch._scaled_grouped_mm`` on rowwise e4m3 weights and activations
  with fast accumulation, as torchao's fp8 MoE path calls it. Timed twice: with the activations
  quantized beforehand (the GEMM alone, like our launch handed quantized rows) and quantizing them
  inside the timed call (``..._with_act_quant``, like ``group_gemm`` on plain rows).

Layer peers (a routed experts layer: gate_up GEMM, SiLU(gate)·up, down GEMM, weighted combine), because
vLLM's fused-MoE kernels are built and called as a whole layer:

* the two torch peers chained with mxmoe's routing, SiLU and combine kernels (``torch_layer_peers``);
* ``vllm_fused_moe_bf16`` and ``vllm_fused_moe_int4_w4a16_g128``:
  ``vllm.model_executor.layers.fused_moe.fused_experts`` when ``vllm`` imports on the machine (skipped
  with a one-line note otherwise). Its int4 weights are our ``w4a16_g128_sym`` codes in vLLM's GPTQ
  layout (``vllm_int4_layout``): vLLM multiplies by the weights our kernel does, up to its scales being
  stored in the activation dtype.

Columns (``moved_fraction``, ``add_ratios``): time; speedup over torch bf16 and over torch fp8 (the GEMMs
alone, and with activation quantization on both sides); the bytes a call must move (weights of the
experts that have rows, activation rows read, output rows written) as a fraction of the copy bandwidth
measured in the same run; relative error against float32 math on the bf16 weights.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from mxmoe.kernels.moe import combine, fp8_grouped_mm, fused_silu_mul, quantize_fp8_rows, route_with_inverse
from mxmoe.kernels.pack import PACK_K, PackedWeight

BF16_PEER, FP8_PEER = "torch_grouped_bf16", "torch_scaled_grouped_fp8"
VLLM_BF16, VLLM_INT4 = "vllm_fused_moe_bf16", "vllm_fused_moe_int4_w4a16_g128"
VLLM_INT4_SCHEME = "w4a16_g128_sym"  # our scheme whose codes vLLM's int4 w4a16 path runs unchanged


def grouped_mm() -> Callable:
    """torch's bf16 grouped GEMM: ``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` before it."""
    return getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def gemm_peers(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> dict:
    """{name: (gemm_alone, with_act_quant or None)} callables of the torch peers for one grouped GEMM.

    x: [T, K] bf16 rows grouped by expert; w: [E, N, K] bf16; ends: [E] int32 cumulative row ends.
    The fp8 peer is left out where torch has no ``_scaled_grouped_mm``.
    """
    mm = grouped_mm()
    out = {BF16_PEER: (lambda: mm(x, w.transpose(1, 2), offs=ends), None)}
    if hasattr(torch, "_scaled_grouped_mm"):
        wq, sw = quantize_fp8_rows(w)  # [E, N, K] e4m3, [E, N]
        xq, sx = quantize_fp8_rows(x)  # [T, K] e4m3, [T]
        out[FP8_PEER] = (
            lambda: torch._scaled_grouped_mm(
                xq, wq.transpose(1, 2), sx, sw, offs=ends, out_dtype=torch.bfloat16, use_fast_accum=True
            ),
            lambda: fp8_grouped_mm(x, wq, sw, ends),
        )
    return out


def peer_bytes(name: str, rows: "list[int]", n: int, k: int) -> int:
    """Bytes a torch GEMM peer must move: weights of the experts with rows, activations in, bf16 out.

    bf16: 2-byte weights and activations; fp8: 1-byte weights plus a float32 scale per output channel,
    1-byte activations plus a float32 scale per row (quantized beforehand)."""
    active, t = sum(1 for r in rows if r), sum(rows)
    if name == FP8_PEER:
        return active * (n * k + 4 * n) + t * (k + 4) + 2 * t * n
    return active * 2 * n * k + 2 * t * k + 2 * t * n


def ours_bytes(packed: "list[PackedWeight]", rows: "list[int]", n: int, k: int) -> int:
    """Bytes our launch must move: packed codes, scales and zeros of the experts with rows; activation rows as
    the kernel reads them (bf16 for weight-only experts, 8-bit codes and float32 scales, one per row or per
    128-long group, for weight-activation experts); bf16 output rows."""
    weights = sum(pw.nbytes for pw, r in zip(packed, rows) if r)
    groups = -(-k // PACK_K)

    def row_bytes(s) -> int:
        return 2 * k if s.weight_only else k + 4 * (groups if s.group_size > 0 else 1)

    return weights + sum(r * row_bytes(pw.scheme) for pw, r in zip(packed, rows)) + 2 * n * sum(rows)


def moved_fraction(nbytes: int, ms: float, copy_gbps: float) -> float:
    """``nbytes`` moved in ``ms`` milliseconds as a fraction of the copy bandwidth (GB/s, read + write)."""
    return nbytes / (ms / 1e3) / (copy_gbps * 1e9)


def exact_gemm(x: torch.Tensor, rows: "list[int]", w: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM in float32 on the given weights: ``y[r] = x[r] @ w_e^T`` for the ``rows[e]`` rows of
    expert e (in order). x: [T, K]; w: [E, N, K]; returns [T, N] float32."""
    parts = [xe.float() @ w[e].float().t() for e, xe in enumerate(x.split(list(rows)))]  # each [rows_e, N]
    return torch.cat(parts)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``y`` against ``ref`` (both cast to float32)."""
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def add_ratios(rows: "list[dict]", name_key: str, time_key: str) -> None:
    """Speedups over the torch peers of one case, in place; rows without a time get none.

    ``speedup_vs_torch_bf16`` and ``speedup_vs_torch_fp8``: the peer's time over the row's, neither side
    quantizing activations in the timed call; ``speedup_vs_torch_fp8_with_act_quant``: torch fp8 quantizing
    its activations inside the call against the row's ``<time_key>_with_act_quant`` (its plain time when
    it has nothing to quantize: bf16 and weight-only schemes).
    """
    peers = {r[name_key]: r for r in rows if r.get(time_key)}
    bf16, fp8 = peers.get(BF16_PEER, {}), peers.get(FP8_PEER, {})
    fp8_q = fp8.get(f"{time_key}_with_act_quant")
    for r in rows:
        t = r.get(time_key)
        if not t:
            continue
        if bf16:
            r["speedup_vs_torch_bf16"] = bf16[time_key] / t
        if fp8:
            r["speedup_vs_torch_fp8"] = fp8[time_key] / t
        if fp8_q:
            r["speedup_vs_torch_fp8_with_act_quant"] = fp8_q / r.get(f"{time_key}_with_act_quant", t)


# ---- whole routed-experts layers (vLLM's unit) --------------------------------------------------------


def reference_layer(
    x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The experts layer in float32 on the given weights: ``out[t] = sum_j wts[t, j] down_e(silu(g) * u)``.

    x: [T, H]; idx, wts: [T, k] expert ids and weights; w1: [E, 2I, H] (gate rows, then up rows);
    w2: [E, H, I]. Returns [T, H] float32."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    inter = w2.shape[2]
    for e in range(w1.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)  # [m_e] each
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w1[e].float().t()  # [m_e, 2I]
        a = F.silu(h[:, :inter]) * h[:, inter:]  # [m_e, I]
        out.index_add_(0, tok, (a @ w2[e].float().t()) * wts[tok, slot].float()[:, None])
    return out


def torch_layer_peers(
    x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> dict:
    """{name: callable} of the torch peers as whole layers (routing, gate_up, SiLU·up, down, combine).

    Shapes as in ``reference_layer`` (bf16 tensors on the GPU). The fp8 layer quantizes each GEMM's
    activations inside the call, as our layer (``moe_experts_forward``) does."""
    mm = grouped_mm()
    k = idx.shape[1]

    def layer(gemm1: Callable, gemm2: Callable) -> torch.Tensor:
        order, inv, offsets = route_with_inverse(idx, w1.shape[0])
        ends = offsets[1:]  # [E]
        h = gemm1(x[order // k], ends)  # [T*k, 2I]
        return combine(gemm2(fused_silu_mul(h), ends), wts, order, inv, x.dtype)  # [T, H]

    def bf16(w: torch.Tensor) -> Callable:
        return lambda a, ends: mm(a, w.transpose(1, 2), offs=ends)

    out = {BF16_PEER: lambda: layer(bf16(w1), bf16(w2))}
    if hasattr(torch, "_scaled_grouped_mm"):
        (q1, s1), (q2, s2) = quantize_fp8_rows(w1), quantize_fp8_rows(w2)  # [E, N, K] e4m3, [E, N]
        out[FP8_PEER] = lambda: layer(
            lambda a, ends: fp8_grouped_mm(a, q1, s1, ends), lambda a, ends: fp8_grouped_mm(a, q2, s2, ends)
        )
    return out


def routed_ids(rows: "list[int]", tokens: int, top_k: int, device=None) -> torch.Tensor:
    """Expert ids [T, k] int32 that give expert e exactly ``rows[e]`` tokens, each token k distinct experts.

    The slots of expert 0, then expert 1, ... fill the columns of a [k, T] table: an expert's run of at most
    T slots never wraps onto the same token twice. Raises ValueError unless ``sum(rows) == tokens * top_k``
    and every expert has at most ``tokens`` rows."""
    if sum(rows) != tokens * top_k or max(rows) > tokens:
        raise ValueError(
            f"rows per expert must sum to tokens x top_k = {tokens * top_k} with at most {tokens} each, "
            f"got sum {sum(rows)}, max {max(rows)}"
        )
    seq = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))  # [T*k] expert of each slot
    return seq.reshape(top_k, tokens).t().contiguous().to(device=device, dtype=torch.int32)


# ---- vLLM's fused MoE ----------------------------------------------------------------------------------


def vllm_fused_experts() -> "Callable | str":
    """vLLM's ``fused_experts``, or a one-line note saying why the vLLM peers are skipped here."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as err:  # noqa: BLE001 - ImportError, or a vllm that fails to initialise on this machine
        first = (str(err).splitlines() or [""])[0][:160]
        return f"vLLM peers skipped: vllm is not importable here ({type(err).__name__}: {first})"
    return fused_experts


def vllm_int4_layout(packed: "list[PackedWeight]", dtype: torch.dtype) -> "tuple[torch.Tensor, torch.Tensor, int]":
    """Our symmetric 4-bit grouped experts in vLLM's int4 w4a16 (GPTQ, no zero point) layout.

    packed: E PackedWeights of one ``w4a16_g{G}_sym`` scheme, each [N, K]. Returns qweight [E, N, K / 2]
    uint8 (the code ``u = q + 8`` of input k in the low nibble of byte k // 2 for even k, the high nibble for
    odd k), scales [E, N, ceil(K / G)] in ``dtype`` and G. vLLM's kernel computes ``(u - 8) * scale``, our
    ``q * scale``: the same weights when the scales keep their value in ``dtype`` (float32 or float16 do).
    """
    s = packed[0].scheme
    if any(pw.scheme != s for pw in packed) or s.w_bits != 4 or not s.symmetric or s.group_size <= 0:
        raise ValueError(
            f"vLLM's int4 w4a16 layout holds one symmetric 4-bit grouped scheme (e.g. '{VLLM_INT4_SCHEME}'), "
            f"got {sorted({str(pw.scheme) for pw in packed})}"
        )
    if packed[0].k % 2:
        raise ValueError(f"vLLM packs two 4-bit codes per byte along K: K = {packed[0].k} must be even")
    ints = [pw.int_weight() for pw in packed]
    u = torch.stack([iw.q for iw in ints]) + 8  # [E, N, K] codes 1..15
    qweight = (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)  # [E, N, K/2]
    scales = torch.stack([iw.scale for iw in ints]).to(dtype)  # [E, N, groups]
    return qweight.contiguous(), scales.contiguous(), s.group_size


def vllm_int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The weights [E, N, K] float32 vLLM's int4 w4a16 kernel multiplies by (``fused_moe_kernel_gptq_awq``
    without zero points: ``((byte >> 4 (k % 2)) & 15) - 8`` times the scale of group ``k // group``)."""
    e, n, half = qweight.shape
    b = qweight.to(torch.int32)
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(e, n, 2 * half)  # [E, N, K]
    scale = scales.float().repeat_interleave(group, dim=-1)[..., : 2 * half]  # [E, N, K]
    return (codes - 8).float() * scale


def vllm_call(fused_experts: Callable, x, w1, w2, wts, idx, int4: "tuple | None" = None) -> Callable:
    """A no-argument call of vLLM's ``fused_experts`` on one layer, for either of its APIs.

    x [T, H], w1 [E, 2I, H], w2 [E, H, I], wts/idx [T, k] (float32 / int32); ``int4``: (w1_scale, w2_scale,
    group) with w1, w2 in ``vllm_int4_layout``. vLLM 0.11 and later take a ``quant_config``
    (``int4_w4a16_moe_quant_config``); earlier versions take ``use_int4_w4a16`` and the scales as keywords.
    """
    if int4 is None:
        return lambda: fused_experts(x, w1, w2, wts, idx)
    s1, s2, group = int4
    if "quant_config" in inspect.signature(fused_experts).parameters:
        from vllm.model_executor.layers.fused_moe.config import int4_w4a16_moe_quant_config

        qc = int4_w4a16_moe_quant_config(w1_scale=s1, w2_scale=s2, w1_zp=None, w2_zp=None, block_shape=[0, group])
        return lambda: fused_experts(x, w1, w2, wts, idx, quant_config=qc)
    return lambda: fused_experts(
        x, w1, w2, wts, idx, use_int4_w4a16=True, w1_scale=s1, w2_scale=s2, block_shape=[0, group]
    )


def vllm_layer_peers(
    x: torch.Tensor,
    idx: torch.Tensor,
    wts: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    int4: "tuple[list[PackedWeight], list[PackedWeight]]",
) -> "tuple[dict, str | None]":
    """({name: callable}, note) of vLLM's fused-MoE layer in bf16 and int4 w4a16 g128, or ({}, the skip note).

    Shapes as in ``reference_layer``; ``int4``: the (gate_up, down) experts packed in ``VLLM_INT4_SCHEME``."""
    fused = vllm_fused_experts()
    if isinstance(fused, str):
        return {}, fused
    q1, s1, group = vllm_int4_layout(int4[0], x.dtype)
    q2, s2, _ = vllm_int4_layout(int4[1], x.dtype)
    wts, idx = wts.float(), idx.to(torch.int32)
    return {
        VLLM_BF16: vllm_call(fused, x, w1, w2, wts, idx),
        VLLM_INT4: vllm_call(fused, x, q1.to(x.device), q2.to(x.device), wts, idx, (s1, s2, group)),
    }, None
