"""The accuracy path ("fake quant"): quantizers that every accuracy number in mxmoe uses."""

from mxmoe.quant.gptq import GPTQWeight, HessianAccumulator, InsufficientCalibration, gptq_quantize
from mxmoe.quant.rtn import IntWeight, quantize_activation, quantize_weight, quantize_weight_int

__all__ = [
    "GPTQWeight",
    "HessianAccumulator",
    "InsufficientCalibration",
    "IntWeight",
    "gptq_quantize",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_int",
]
