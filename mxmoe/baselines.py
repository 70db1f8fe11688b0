"""Named quantization configurations (the paper's baselines) and how a model is quantized with one.

A configuration is a uniform scheme for every expert block (routed and shared) plus a method:

* ``fp16``          full precision (the model as loaded; fp32 on CPU);
* ``gptq*-3.25``    GPTQ* = GPTQ + random Hadamard rotation, w3 g128 asym (3.25 bits, paper Table 1);
* ``gptq*-2.25``    the same at w2 g128 asym (2.25 bits);
* ``quarot-w4a4``   QuaRot-style W4A4: rotation + GPTQ per-channel symmetric weights, 4-bit per-token activations;
* ``w8a8``, ``w4a16``  uniform RTN baselines (Figure 5), ``rtn-w<w>a<a>`` the Table 4 grid;
* ``w8a8-fp8``      fp8 (e4m3) weights per channel and activations per token, RTN: what torch's fp8 grouped GEMM
                    serves on Hopper;
* ``w4a8-fp8``      rotation + GPTQ per-channel symmetric 4-bit weights, run as e4m3 with fp8 activations.

An allocation (``mxmoe.allocate``) is evaluated through the same function with its scheme map in place
of the uniform one, so every row of Table 1 is quantized and measured by the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from mxmoe.errors import MxMoEError
from mxmoe.models.blocks import moe_blocks
from mxmoe.quant.apply import apply_schemes, block_weight, check_scheme, uniform_scheme_map
from mxmoe.quant.hadamard import rotate_model
from mxmoe.quant.sequential import quantize_model_gptq
from mxmoe.schemes import Scheme

METHODS = ("fp", "rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every expert block: one ``scheme`` (unless a scheme map is given), ``method``, rotation."""

    label: str
    scheme: "str | None" = "bf16"  # None: the scheme map passed to ``quantize`` decides (an allocation)
    method: str = "fp"  # "fp" | "rtn" | "gptq"
    hadamard: bool = False  # random Hadamard rotation of the residual stream + online on down_proj inputs
    seed: int = 0  # rotation seed

    def __post_init__(self):
        if self.method not in METHODS:
            raise MxMoEError(f"config {self.label!r}: method must be one of {METHODS}, got {self.method!r}")
        if self.scheme is not None:
            check_scheme(self.scheme)

    def as_dict(self) -> dict:
        """JSON-ready fields, stored with every result of this configuration."""
        return asdict(self)


BASELINES = {
    "fp16": QuantConfig("fp16"),
    "gptq*-3.25": QuantConfig("gptq*-3.25", "w3a16_g128_asym", "gptq", hadamard=True),
    "gptq*-2.25": QuantConfig("gptq*-2.25", "w2a16_g128_asym", "gptq", hadamard=True),
    "quarot-w4a4": QuantConfig("quarot-w4a4", "w4a4_g-1_sym", "gptq", hadamard=True),
    "w8a8": QuantConfig("w8a8", "w8a8_g-1_sym", "rtn"),
    "w4a16": QuantConfig("w4a16", "w4a16_g128_asym", "rtn"),
    "w8a8-fp8": QuantConfig("w8a8-fp8", "w8a8_g-1_sym_fp8", "rtn"),
    "w4a8-fp8": QuantConfig("w4a8-fp8", "w4a8_g-1_sym_fp8", "gptq", hadamard=True),
}


def baseline(name: str, **overrides) -> QuantConfig:
    """A named configuration (see BASELINES), fields optionally replaced (e.g. ``seed=1``)."""
    if name not in BASELINES:
        raise MxMoEError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return replace(BASELINES[name], **overrides)


def allocation_config(label: str, seed: int = 0) -> QuantConfig:
    """An MxMoE allocation, quantized as in the paper: GPTQ after a random Hadamard rotation (scheme map given)."""
    return QuantConfig(label, None, "gptq", hadamard=True, seed=seed)


def rotated_uniform_config(w_bits: int, a_bits: int) -> QuantConfig:
    """Table 5 row: uniform w<b>a<b> per-channel symmetric, GPTQ after rotation (QuaRot-style)."""
    return QuantConfig(f"rotated-w{w_bits}a{a_bits}", f"w{w_bits}a{a_bits}_g-1_sym", "gptq", hadamard=True)


def rtn_grid_config(w_bits: int, a_bits: int) -> QuantConfig:
    """Table 4 cell: RTN, per-channel symmetric weights, per-token symmetric activations, no rotation."""
    return QuantConfig(f"rtn-w{w_bits}a{a_bits}", f"w{w_bits}a{a_bits}_g-1_sym", "rtn")


def average_bits(model, scheme_map: dict) -> tuple[float, float]:
    """(weight bits, activation bits) averaged over the mapped expert parameters, with the paper's accounting."""
    blocks = {b.layer: b for b in moe_blocks(model)}
    sizes = {k: block_weight(blocks[k[0]], k[1], k[2]).numel() for k in scheme_map}  # parameters per block
    total = sum(sizes.values())
    w = sum(sizes[k] * check_scheme(s).bits_per_weight for k, s in scheme_map.items()) / total
    a = sum(sizes[k] * check_scheme(s).a_bits for k, s in scheme_map.items()) / total
    return w, a


@torch.no_grad()
def quantize(
    model,
    config: QuantConfig,
    calib: "torch.Tensor | None" = None,
    scheme_map: "dict | None" = None,
    progress: bool = True,
    layer_inputs: "dict | None" = None,
) -> dict:
    """Quantize ``model`` in place per ``config`` (or per ``scheme_map`` with the config's method).

    ``calib`` [n, seqlen] calibration windows are required by GPTQ; ``layer_inputs`` goes to
    ``quantize_model_gptq`` (calls that quantize one layer of copies of one model). Returns a JSON-ready
    report: the config, the parameter-weighted weight/activation bits and, for GPTQ, its fallbacks and time.
    """
    if scheme_map is None:
        if config.scheme is None:
            raise MxMoEError(f"config {config.label!r} has no uniform scheme: pass its allocation as scheme_map")
        if config.method == "fp":
            return {"config": config.as_dict(), "w_bits": 16.0, "a_bits": 16.0}
        scheme_map = uniform_scheme_map(model, config.scheme)
    scheme_map = {k: Scheme.parse(s) for k, s in scheme_map.items()}
    w_bits, a_bits = average_bits(model, scheme_map)
    report = {"config": config.as_dict(), "w_bits": w_bits, "a_bits": a_bits}
    if config.method == "gptq":
        if calib is None:
            raise MxMoEError(f"config {config.label!r} uses GPTQ: pass calibration windows (calib=...)")
        report["gptq"] = quantize_model_gptq(
            model,
            calib,
            scheme_map,
            hadamard=config.hadamard,
            seed=config.seed,
            progress=progress,
            layer_inputs=layer_inputs,
        ).summary()
    else:
        if config.hadamard:
            rotate_model(model, config.seed)
        apply_schemes(model, scheme_map, online_hadamard=config.hadamard)
    return report
