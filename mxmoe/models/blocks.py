"""One view over the MoE blocks of every supported Hugging Face family.

``moe_blocks(model)`` returns a :class:`MoEBlock` per sparse layer (dense layers are skipped).
Each gives the router, top-k, the routed experts as [out, in] matrices per linear block
(gate, up, down) and the shared experts. Two storage layouts are read and written:

* fused (transformers 5): ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``;
* per expert (transformers 4, remote code): ``experts`` is a ModuleList of MLPs with
  ``gate_proj/up_proj/down_proj`` (Qwen, DeepSeek, OLMoE) or ``w1/w3/w2`` (Mixtral).

Reading and writing expert weights goes through this view only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mxmoe.errors import NotMoEModel

BLOCKS = ("gate", "up", "down")
SUPPORTED = (
    "MixtralSparseMoeBlock (Mixtral)",
    "Qwen2MoeSparseMoeBlock (Qwen1.5-MoE, Qwen2-MoE)",
    "Qwen3MoeSparseMoeBlock (Qwen3-MoE)",
    "OlmoeSparseMoeBlock (OLMoE)",
    "DeepseekV2Moe (DeepSeek-V2)",
    "DeepseekV3MoE (DeepSeek-V3)",
)
_PER_EXPERT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def mlp_linear(mlp: nn.Module, block: str) -> nn.Linear:
    """The gate, up or down nn.Linear of a per-expert MLP module (names differ between families)."""
    for attr in _PER_EXPERT_NAMES[block]:
        if hasattr(mlp, attr):
            return getattr(mlp, attr)
    raise NotMoEModel(f"expert MLP {type(mlp).__name__} has none of {_PER_EXPERT_NAMES[block]}")


@dataclass
class MoEBlock:
    """A view of one sparse MoE layer: router, routed experts and shared experts."""

    layer: int  # index of the decoder layer that holds the block
    name: str  # module path, e.g. "model.layers.3.mlp"
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    hidden_size: int
    expert_width: int
    shared: list[nn.Module] = field(default_factory=list)  # shared-expert MLPs (gate/up/down Linear)
    shared_gate: nn.Module | None = None  # Qwen2-MoE's sigmoid gate on the shared expert

    @property
    def fused(self) -> bool:
        """True for the transformers-5 layout (3-D expert tensors)."""
        return hasattr(self.experts, "gate_up_proj")

    def expert_weight(self, e: int, block: str) -> torch.Tensor:
        """Weight [out, in] of routed expert ``e``'s block ('gate' | 'up' | 'down'); a view when fused."""
        self._check(e, block)
        if not self.fused:
            return mlp_linear(self.experts[e], block).weight
        if block == "down":
            return self.experts.down_proj[e]  # [H, I]
        gate_up = self.experts.gate_up_proj[e]  # [2I, H]
        return gate_up[: self.expert_width] if block == "gate" else gate_up[self.expert_width :]

    @torch.no_grad()
    def set_expert_weight(self, e: int, block: str, w: torch.Tensor) -> None:
        """Overwrite routed expert ``e``'s block with ``w`` [out, in] (same shape; dtype/device follow the model)."""
        target = self.expert_weight(e, block)
        if tuple(w.shape) != tuple(target.shape):
            raise ValueError(
                f"layer {self.layer} expert {e} {block}: weight shape {tuple(w.shape)} != {tuple(target.shape)}"
            )
        target.copy_(w.to(dtype=target.dtype, device=target.device))

    def shared_weight(self, s: int, block: str) -> torch.Tensor:
        """Weight [out, in] of shared expert ``s``'s block."""
        return mlp_linear(self.shared[s], block).weight

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of tokens ``x[T, H]``: (weights [T, k] float, expert indices [T, k] long), as the model does it.

        ``x`` is cast to the router's dtype first (float32 calibration inputs into a bf16 model route as its own
        activations would)."""
        out = self.router(x.to(_param_dtype(self.router, x.dtype)))
        if isinstance(out, tuple):
            if not out[0].is_floating_point():  # DeepSeek remote code: (indices, weights, aux_loss)
                return out[1].float(), out[0].long()
            return out[1].float(), out[2].long()  # transformers 5: (logits, weights, indices)
        probs = F.softmax(out.float(), dim=-1)  # transformers 4: the gate is a Linear giving logits
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self.module, "norm_topk_prob", "Mixtral" in type(self.module).__name__):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Unweighted output [T, H] of routed expert ``e`` on tokens ``x[T, H]`` (SiLU-gated MLP)."""
        w_gate, w_up, w_down = (self.expert_weight(e, b) for b in BLOCKS)
        h = F.silu(x @ w_gate.T.to(x.dtype)) * (x @ w_up.T.to(x.dtype))  # [T, I]
        return h @ w_down.T.to(x.dtype)  # [T, H]

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output [T, H] of all shared experts on ``x[T, H]``, including Qwen2-MoE's sigmoid gate (0 if none)."""
        out = torch.zeros_like(x)
        for mlp in self.shared:
            out = out + mlp(x)
        if self.shared_gate is not None:
            out = self.shared_gate_value(x).to(out.dtype) * out
        return out

    def shared_gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's sigmoid shared-expert gate [T, 1] (float) on tokens ``x[T, H]`` cast to the gate's dtype;
        ones when the block has no shared gate."""
        if self.shared_gate is None:
            return torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return torch.sigmoid(self.shared_gate(x.to(_param_dtype(self.shared_gate, x.dtype))).float())

    def _check(self, e: int, block: str) -> None:
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if not 0 <= e < self.num_experts:
            raise IndexError(f"layer {self.layer} has {self.num_experts} experts; expert {e} is out of range")


def _layer_index(name: str) -> int:
    found = re.findall(r"layers\.(\d+)\.", name + ".")
    return int(found[-1]) if found else -1


def _as_block(name: str, module: nn.Module) -> MoEBlock | None:
    experts = getattr(module, "experts", None)
    router = getattr(module, "gate", None) or getattr(module, "router", None)
    if experts is None or router is None or not isinstance(router, nn.Module):
        return None
    if hasattr(experts, "gate_up_proj"):
        e, two_i, h = experts.gate_up_proj.shape
        if tuple(experts.down_proj.shape) != (e, h, two_i // 2):
            raise NotMoEModel(
                f"{name}: expert tensors gate_up_proj {tuple(experts.gate_up_proj.shape)} and "
                f"down_proj {tuple(experts.down_proj.shape)} are not in the [E, 2I, H] / [E, H, I] layout"
            )
        width = two_i // 2
    elif isinstance(experts, nn.ModuleList) and len(experts) > 0:
        e = len(experts)
        width, h = mlp_linear(experts[0], "gate").weight.shape
    else:
        return None
    top_k = (
        getattr(router, "top_k", None) or getattr(module, "top_k", None) or getattr(module, "num_experts_per_tok", None)
    )
    if top_k is None:
        raise NotMoEModel(f"{name}: cannot find the router's top-k")
    shared = []
    for attr in ("shared_expert", "shared_experts", "shared_mlp"):
        if getattr(module, attr, None) is not None:
            shared.append(getattr(module, attr))
    return MoEBlock(
        _layer_index(name),
        name,
        module,
        router,
        experts,
        e,
        int(top_k),
        h,
        width,
        shared,
        getattr(module, "shared_expert_gate", None),
    )


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every sparse MoE block of ``model`` in layer order; raises NotMoEModel when there is none."""
    blocks = []
    for name, module in model.named_modules():
        block = _as_block(name, module)
        if block is not None:
            blocks.append(block)
    if not blocks:
        raise NotMoEModel(
            f"{type(model).__name__} has no Mixture-of-Experts block that mxmoe can read. Supported: "
            f"{'; '.join(SUPPORTED)} — fused (transformers 5) or per-expert (transformers 4) expert layouts."
        )
    return sorted(blocks, key=lambda b: b.layer)


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``module``'s first parameter (``default`` when it has none)."""
    p = next(module.parameters(), None)
    return p.dtype if p is not None else default
