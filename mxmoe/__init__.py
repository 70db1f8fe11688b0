"""mxmoe: mixed-precision quantization for Mixture-of-Experts models (MxMoE, ICML 2025) on Hopper GPUs.

``mxmoe.quantize(model, tokenizer, wbits=3.25, out=DIR)`` and ``mxmoe.load_quantized(DIR)`` are
imported on first use, so ``import mxmoe`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {"quantize": ("mxmoe.pipeline", "quantize"), "load_quantized": ("mxmoe.checkpoint", "load_quantized")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """Import ``quantize`` / ``load_quantized`` from their modules when first asked for."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mxmoe' has no attribute {name!r}")
