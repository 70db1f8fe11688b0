"""mxmoe: mixed-precision quantization for Mixture-of-Experts models (MxMoE, ICML 2025) on Hopper GPUs."""

__version__ = "0.1.0"
