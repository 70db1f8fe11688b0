"""Triton mixed-precision grouped GEMM for MoE experts (Hopper), its packing and its reference.

Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU.
"""

from mxmoe.kernels.act_quant import QuantizedRows
from mxmoe.kernels.configs import TileConfig
from mxmoe.kernels.group_gemm import ExpertGroup, group_gemm, quantize_activations
from mxmoe.kernels.moe import attach_packed_experts, moe_experts_forward, register_experts_implementation
from mxmoe.kernels.pack import PackedWeight, pack
from mxmoe.kernels.reference import reference_group_gemm

__all__ = [
    "ExpertGroup",
    "PackedWeight",
    "QuantizedRows",
    "TileConfig",
    "attach_packed_experts",
    "group_gemm",
    "moe_experts_forward",
    "pack",
    "quantize_activations",
    "reference_group_gemm",
    "register_experts_implementation",
]
