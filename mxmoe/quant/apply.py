"""Fake-quantize a whole MoE model with one scheme per linear block (the accuracy path of MxMoE).

A *scheme map* is ``{(layer, expert, block): Scheme | str}``:

* ``layer`` — the decoder layer index of an MoE block (``MoEBlock.layer``, not its rank among MoE
  layers; dense layers of DeepSeek are not addressable);
* ``expert`` — a routed expert index ``0..E-1``, or ``"shared0"``, ``"shared1"``, ... for the
  block's shared experts (``shared_key(s)``);
* ``block`` — ``"gate"``, ``"up"`` or ``"down"``.

Missing keys stay full precision. ``apply_schemes`` quantizes every listed weight once, in place
(RTN, or the given ``IntWeight`` such as GPTQ output), and quantizes the input activations of each
block on the fly with ``quantize_activation`` and that block's scheme. Attention, routers, norms,
embeddings and dense MLPs stay in full precision. Routed experts of the transformers-5 fused layout
run through a registered experts implementation (``EXPERTS_IMPL``); per-expert layouts and shared
experts get forward pre-hooks on their ``nn.Linear`` modules.

With ``online_hadamard=True`` the input of every down_proj is rotated online
(``apply_online_hadamard``) and the down weights by the same matrix first, so full precision is
unchanged and the activation outliers of the intermediate width are spread before quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mxmoe.errors import MxMoEError
from mxmoe.models.blocks import BLOCKS, MoEBlock, mlp_linear, moe_blocks
from mxmoe.quant.hadamard import apply_online_hadamard, hadamard_factors
from mxmoe.quant.rtn import IntWeight, quantize_activation, quantize_weight, quantize_weight_int
from mxmoe.schemes import BF16, Scheme

EXPERTS_IMPL = "mxmoe_fake_quant"
# routed experts x width up to which every expert runs on every token, masked by its routing weight (smollm2-moe:
# 32 x 32): a few GEMMs and no host synchronisation per layer, instead of a loop over the experts that got tokens
DENSE_EXPERTS_MAX_NEURONS = 8192
SHARED_PREFIX = "shared"


class UnsupportedScheme(MxMoEError):
    """A scheme the fake quantizer cannot run (e.g. a 1-bit symmetric grid)."""


class BadBlockKey(MxMoEError):
    """A scheme-map key names a layer, expert or block the model does not have."""


def shared_key(s: int) -> str:
    """The expert id of shared expert ``s`` in a scheme map: ``"shared{s}"``."""
    return f"{SHARED_PREFIX}{s}"


def expert_ids(block: MoEBlock) -> list:
    """Every expert id of one MoE block: routed ``0..E-1`` then ``"shared0"``, ..."""
    return list(range(block.num_experts)) + [shared_key(s) for s in range(len(block.shared))]


def block_weight(block: MoEBlock, expert, name: str) -> torch.Tensor:
    """Weight [out, in] of a routed (int) or shared ("sharedN") expert's linear block."""
    if isinstance(expert, str):
        return mlp_linear(block.shared[_shared_index(block, expert)], name).weight
    return block.expert_weight(expert, name)


@torch.no_grad()
def set_block_weight(block: MoEBlock, expert, name: str, w: torch.Tensor) -> None:
    """Overwrite a routed or shared expert's block weight with ``w`` [out, in] (same shape)."""
    if isinstance(expert, str):
        target = block_weight(block, expert, name)
        if tuple(w.shape) != tuple(target.shape):
            raise ValueError(
                f"layer {block.layer} {expert} {name}: weight shape {tuple(w.shape)} != {tuple(target.shape)}"
            )
        target.copy_(w.to(dtype=target.dtype, device=target.device))
    else:
        block.set_expert_weight(expert, name, w)


def _shared_index(block: MoEBlock, expert: str) -> int:
    suffix = expert[len(SHARED_PREFIX) :] if expert.startswith(SHARED_PREFIX) else ""
    if not suffix.isdigit() or int(suffix) >= len(block.shared):
        raise BadBlockKey(
            f"layer {block.layer}: expert {expert!r} is not one of the {len(block.shared)} shared "
            f"experts ({', '.join(shared_key(s) for s in range(len(block.shared))) or 'none'})"
        )
    return int(suffix)


def blocks_by_layer(model: nn.Module) -> dict[int, MoEBlock]:
    """The model's MoE blocks keyed by decoder layer index."""
    return {b.layer: b for b in moe_blocks(model)}


def check_key(blocks: dict[int, MoEBlock], key) -> tuple:
    """Validate a ``(layer, expert, block)`` key against the model; raises BadBlockKey."""
    if not (isinstance(key, tuple) and len(key) == 3):
        raise BadBlockKey(f"scheme-map keys are (layer, expert, block) tuples, got {key!r}")
    layer, expert, name = key
    if layer not in blocks:
        raise BadBlockKey(f"layer {layer!r} is not an MoE layer of this model; MoE layers: {sorted(blocks)}")
    if name not in BLOCKS:
        raise BadBlockKey(f"block must be one of {BLOCKS}, got {name!r} in key {key!r}")
    b = blocks[layer]
    if isinstance(expert, str):
        _shared_index(b, expert)
    elif not (isinstance(expert, int) and 0 <= expert < b.num_experts):
        raise BadBlockKey(f"layer {layer} has {b.num_experts} routed experts; expert {expert!r} is out of range")
    return key


def check_scheme(s: "Scheme | str") -> Scheme:
    """Parse ``s`` and make sure the fake quantizer runs it; raises UnsupportedScheme."""
    try:
        s = Scheme.parse(s)
        if not s.is_full_precision:
            quantize_weight_int(torch.ones(1, 8), s)  # the grid's own checks (e.g. 1-bit symmetric)
    except ValueError as e:
        raise UnsupportedScheme(f"scheme {s!s}: {e}") from None
    return s


def uniform_scheme_map(model: nn.Module, scheme: "Scheme | str", shared: bool = True) -> dict:
    """The same scheme for every routed (and, when ``shared``, shared) expert block of every MoE layer."""
    s = check_scheme(scheme)
    out = {}
    for b in moe_blocks(model):
        ids = expert_ids(b) if shared else range(b.num_experts)
        out.update({(b.layer, e, name): s for e in ids for name in BLOCKS})
    return out


def scheme_map_to_rows(scheme_map: dict) -> list[dict]:
    """A scheme map as JSON-ready rows ``{"layer", "expert", "block", "scheme"}`` (for results/*/alloc files)."""
    return [
        {"layer": k[0], "expert": k[1], "block": k[2], "scheme": str(Scheme.parse(s))} for k, s in scheme_map.items()
    ]


def scheme_map_from_rows(rows: list) -> dict:
    """The scheme map back from ``scheme_map_to_rows`` output; schemes are parsed and checked."""
    try:
        return {(int(r["layer"]), r["expert"], r["block"]): check_scheme(r["scheme"]) for r in rows}
    except (KeyError, TypeError) as e:
        raise BadBlockKey(f"scheme-map rows need layer, expert, block and scheme fields: {e}") from None


@dataclass
class AppliedQuantization:
    """What ``apply_schemes`` did: blocks quantized per scheme, and which came from given IntWeights."""

    blocks_per_scheme: dict = field(default_factory=dict)  # str(scheme) -> count of quantized blocks
    from_int_weights: int = 0
    online_hadamard: bool = False


def _act_key(s: Scheme) -> tuple:
    """Two schemes with the same key quantize activations identically."""
    return (16,) if s.a_bits >= 16 else (s.a_bits, s.group_size, s.fmt)


def fake_quant_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward (transformers-5 fused layout) with per-expert, per-block activation fake quant.

    hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]. Weights are already quantized in
    place; ``self._mxmoe_act[e]`` holds expert e's (gate, up, down) schemes (bf16 when unset) and
    ``self._mxmoe_hadamard`` whether the down input is rotated online. Small experts (``num_experts``
    x width <= ``DENSE_EXPERTS_MAX_NEURONS``) run masked-dense (``_masked_dense_forward``), larger ones
    expert by expert (``_per_expert_forward``): the same function either way.
    """
    act = getattr(self, "_mxmoe_act", None)
    schemes = act if act is not None else [(BF16, BF16, BF16)] * self.num_experts
    rotate = getattr(self, "_mxmoe_hadamard", False)
    if self.num_experts * self.down_proj.shape[-1] <= DENSE_EXPERTS_MAX_NEURONS:
        return _masked_dense_forward(self, hidden_states, top_k_index, top_k_weights, schemes, rotate)
    return _per_expert_forward(self, hidden_states, top_k_index, top_k_weights, schemes, rotate)


def _act_groups(schemes: list, block: int) -> dict[tuple, list[int]]:
    """Experts by how they quantize the input of ``block`` (0 gate, 1 up, 2 down): {_act_key: expert ids}."""
    groups: dict[tuple, list[int]] = {}
    for e, s in enumerate(schemes):
        groups.setdefault(_act_key(s[block]), []).append(e)
    return groups


def _masked_dense_forward(self, hidden_states, top_k_index, top_k_weights, schemes, rotate) -> torch.Tensor:
    """Every expert on every token, the down input scaled by the token's routing weight for that expert (0 when
    not routed): one GEMM per projection and activation scheme, no host synchronisation."""
    T, H = hidden_states.shape
    E, width = self.num_experts, self.down_proj.shape[-1]  # I
    routing = torch.zeros(T, E + 1, dtype=torch.float32, device=hidden_states.device)
    routing = routing.scatter_add(1, top_k_index, top_k_weights.float())[:, :E]  # [T, E]; column E: dropped slots
    gate_up = hidden_states.new_empty(T, E, 2, width)  # [T, E, 2, I]
    for block in (0, 1):
        for ids in _act_groups(schemes, block).values():
            x = quantize_activation(hidden_states, schemes[ids[0]][block])  # [T, H]
            w = self.gate_up_proj[ids, block * width : (block + 1) * width]  # [e, I, H]
            gate_up[:, ids, block] = F.linear(x, w.reshape(-1, H)).view(T, len(ids), width)
    h = self.act_fn(gate_up[:, :, 0]) * gate_up[:, :, 1]  # [T, E, I]
    if rotate:
        h = apply_online_hadamard(h)
    for ids in _act_groups(schemes, 2).values():
        if schemes[ids[0]][2].a_bits < 16:
            h[:, ids] = quantize_activation(h[:, ids], schemes[ids[0]][2])  # per token and expert, as the loop
    h = (h * routing[:, :, None]).to(hidden_states.dtype)
    down = self.down_proj.transpose(1, 2).reshape(E * width, H)  # [E·I, H]
    return h.reshape(T, E * width) @ down  # [T, H]


def _per_expert_forward(self, hidden_states, top_k_index, top_k_weights, schemes, rotate) -> torch.Tensor:
    """The experts that got tokens, one after another (a host synchronisation per expert)."""
    width = self.down_proj.shape[-1]  # I
    out = torch.zeros_like(hidden_states)  # [T, H]
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E+1, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == self.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        x = hidden_states[tok]  # [t, H]
        sg, su, sd = schemes[e]
        if _act_key(sg) == _act_key(su):
            gate, up = F.linear(quantize_activation(x, sg), self.gate_up_proj[e]).chunk(2, dim=-1)  # [t, I] each
        else:
            gate = F.linear(quantize_activation(x, sg), self.gate_up_proj[e, :width])
            up = F.linear(quantize_activation(x, su), self.gate_up_proj[e, width:])
        h = self.act_fn(gate) * up  # [t, I]
        if rotate:
            h = apply_online_hadamard(h)
        y = F.linear(quantize_activation(h, sd), self.down_proj[e])  # [t, H]
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPL not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPL, fake_quant_experts_forward)


def _hook_linear(linear: nn.Linear, scheme: Scheme, rotate: bool) -> None:
    """Quantize (after rotating, when ``rotate``) the input of ``linear`` on every call; nothing for bf16."""
    if scheme.a_bits < 16 or rotate:
        linear.register_forward_pre_hook(_input_hook(scheme, rotate))


def _input_hook(scheme: Scheme, rotate: bool):
    def hook(module, args):
        x = apply_online_hadamard(args[0]) if rotate else args[0]
        return (quantize_activation(x, scheme), *args[1:])

    return hook


def _check_fused(b: MoEBlock) -> None:
    for attr in ("has_bias", "is_transposed"):
        if getattr(b.experts, attr, False):
            raise MxMoEError(f"layer {b.layer}: experts with {attr}=True are not supported by the fake quantizer")
    if getattr(b.experts, "is_concatenated", True) is False:
        raise MxMoEError(f"layer {b.layer}: interleaved gate/up experts are not supported by the fake quantizer")


@torch.no_grad()
def rotate_down_inputs(model: nn.Module) -> None:
    """Rotate every routed and shared down_proj weight by the online Hadamard of its input width, in place.

    ``W ← W·H/√I``, so ``apply_online_hadamard(h) @ Wᵀ`` equals the original ``h @ W_origᵀ``.
    """
    for b in moe_blocks(model):
        for e in expert_ids(b):
            w = block_weight(b, e, "down")
            if hadamard_factors(w.shape[1]) is None:
                raise MxMoEError(
                    f"layer {b.layer} expert {e}: no Hadamard matrix of order {w.shape[1]} for the "
                    "online down_proj rotation; run without online_hadamard"
                )
            set_block_weight(b, e, "down", apply_online_hadamard(w.float()))


def validate_scheme_map(model: nn.Module, scheme_map: dict) -> tuple[dict, dict]:
    """(MoE blocks by layer, {key: Scheme}) after checking every key, scheme and expert layout.

    Raises BadBlockKey, UnsupportedScheme, or MxMoEError when the model is already fake-quantized
    or its experts use a layout the fake quantizer cannot run.
    """
    if getattr(model, "_mxmoe_applied", False):
        raise MxMoEError("this model is already fake-quantized; load a fresh copy to apply another scheme map")
    blocks = blocks_by_layer(model)
    plan = {check_key(blocks, k): check_scheme(s) for k, s in scheme_map.items()}
    for b in blocks.values():
        if b.fused:
            _check_fused(b)
    return blocks, plan


def install_activation_quant(model: nn.Module, plan: dict, online_hadamard: bool = False) -> None:
    """Quantize every block's input on the fly per ``plan`` (validated), rotating down inputs if asked.

    Fused routed experts get the registered experts implementation; per-expert and shared experts
    get pre-hooks on their Linear modules. Marks the model as fake-quantized.
    """
    fused = False
    for b in moe_blocks(model):
        routed_schemes = [tuple(plan.get((b.layer, e, n), BF16) for n in BLOCKS) for e in range(b.num_experts)]
        if b.fused:
            b.experts._mxmoe_act = routed_schemes
            b.experts._mxmoe_hadamard = online_hadamard
            fused = True
        else:
            for e, schemes in enumerate(routed_schemes):
                for n, s in zip(BLOCKS, schemes):
                    _hook_linear(mlp_linear(b.experts[e], n), s, online_hadamard and n == "down")
        for si in range(len(b.shared)):
            for n in BLOCKS:
                s = plan.get((b.layer, shared_key(si), n), BF16)
                _hook_linear(mlp_linear(b.shared[si], n), s, online_hadamard and n == "down")
    if fused:
        _register()
        model.set_experts_implementation(EXPERTS_IMPL)
    model._mxmoe_applied = True


@torch.no_grad()
def apply_schemes(
    model: nn.Module, scheme_map: dict, *, weights: "dict | None" = None, online_hadamard: bool = False
) -> AppliedQuantization:
    """Fake-quantize ``model`` in place with one scheme per (layer, expert, block); returns what was done.

    ``weights`` optionally gives an ``IntWeight`` (e.g. GPTQ output) for some keys; its scheme must
    equal the map's, and it must quantize the weight as the model holds it (after the down rotation
    when ``online_hadamard``). Other keys are quantized with RTN. Every key and scheme is checked
    before the model is touched (BadBlockKey, UnsupportedScheme). A model can be quantized once.
    """
    blocks, plan = validate_scheme_map(model, scheme_map)
    weights = weights or {}
    for k, iw in weights.items():
        if k not in plan or not isinstance(iw, IntWeight) or iw.scheme != plan[k]:
            raise MxMoEError(
                f"given weight for {k!r} must be an IntWeight of the mapped scheme "
                f"{plan.get(k, 'missing')}, got {getattr(iw, 'scheme', type(iw).__name__)}"
            )
    if online_hadamard:
        rotate_down_inputs(model)
    report = AppliedQuantization(online_hadamard=online_hadamard)
    for (layer, e, name), s in plan.items():
        if s.is_full_precision:
            continue
        b = blocks[layer]
        if (layer, e, name) in weights:
            w = weights[(layer, e, name)].dequantize()
            report.from_int_weights += 1
        else:
            w = quantize_weight(block_weight(b, e, name).float(), s)
        set_block_weight(b, e, name, w)
        report.blocks_per_scheme[str(s)] = report.blocks_per_scheme.get(str(s), 0) + 1
    install_activation_quant(model, plan, online_hadamard)
    return report
