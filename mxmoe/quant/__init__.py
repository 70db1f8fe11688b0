"""The accuracy path ("fake quant"): quantizers that every accuracy number in mxmoe uses."""

from mxmoe.quant.rtn import IntWeight, quantize_activation, quantize_weight, quantize_weight_int

__all__ = ["IntWeight", "quantize_activation", "quantize_weight", "quantize_weight_int"]
