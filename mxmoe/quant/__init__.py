"""The accuracy path ("fake quant"): quantizers that every accuracy number in mxmoe uses."""

from mxmoe.quant.gptq import GPTQWeight, HessianAccumulator, InsufficientCalibration, gptq_quantize
from mxmoe.quant.hadamard import (
    Rotation,
    apply_online_hadamard,
    hadamard_factors,
    hadamard_matrix,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    rotate_model,
)
from mxmoe.quant.rtn import IntWeight, quantize_activation, quantize_weight, quantize_weight_int

__all__ = [
    "GPTQWeight",
    "HessianAccumulator",
    "InsufficientCalibration",
    "IntWeight",
    "Rotation",
    "apply_online_hadamard",
    "gptq_quantize",
    "hadamard_factors",
    "hadamard_matrix",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_int",
    "random_hadamard_matrix",
    "random_orthogonal_matrix",
    "rotate_model",
]
