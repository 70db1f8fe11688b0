"""The grouped GEMM the kernel must compute, in plain torch: the accuracy path's definition."""

from __future__ import annotations

import torch

from mxmoe.kernels.pack import PackedWeight
from mxmoe.quant.rtn import quantize_activation


def reference_group_gemm(x: torch.Tensor, offsets: torch.Tensor, packed: "list[PackedWeight]") -> torch.Tensor:
    """``y[r] = quant_e(x[r]) @ W_e^T`` for rows ``offsets[e] <= r < offsets[e+1]``, float32 out.

    W_e is the dequantized stored weight of expert e; activations are fake-quantized with the same
    ``quantize_activation`` the accuracy path uses (identity for 16-bit activations); all math in
    float32. x: [T, K], offsets: [E+1], returns y: [T, N].
    """
    offs = [int(v) for v in offsets.tolist()]
    n = packed[0].n
    y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    for e, pw in enumerate(packed):
        lo, hi = offs[e], offs[e + 1]
        if hi == lo:
            continue
        xe = quantize_activation(x[lo:hi].float(), pw.scheme)  # [m_e, K]
        y[lo:hi] = xe @ pw.dequantize().to(x.device).t()  # [m_e, N]
    return y
