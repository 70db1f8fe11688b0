"""Random-weight copies of the paper's models at full size, built on the GPU in seconds, with skewed routing.

``build_random(name)`` instantiates a paper model (``mxmoe.models.paper``) from its public config
directly on the target device (the modules are created under a device context: no CPU copy of the
weights exists), then draws every weight from N(0, initializer_range²) with one seeded generator
(norm weights 1, biases 0). Kernel time does not depend on weight values, so such a model times
like the real one; what it cannot show is accuracy (see the notebook's section on random weights).

**Imposed routing skew.** A random router routes nearly uniformly, and the paper's point is that
real routing is skewed. Each MoE layer's router gets a fixed logit bias (``route_bias``) so that the
share of tokens per expert follows a target profile, by default the *measured* WikiText-2 profile of
the embedded smollm2-moe (``mxmoe.stages.routing.embedded_profile``): layer ``l`` takes the
sorted shares of embedded layer ``l mod 4``, interpolated to the model's expert count and assigned to
experts in a seeded random order. ``target_profile(..., ratio=R)`` instead gives a Zipf-like profile
with max/min share R. The bias is fitted on the routers' inputs for random tokens (a few
fixed-point steps on log shares, two passes over the model); the profile actually reached in a
forward is what the benchmark records.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F


def target_profile(
    num_experts: int, moe_layers: int, *, measured: "dict | None" = None, ratio: "float | None" = None, seed: int = 0
) -> dict:
    """Target share of routed tokens per expert, [moe_layers, num_experts] (rows sum to 1), and how it was made.

    ``measured``: a measured profile {'counts' [L', E'], 'source'} (``mxmoe.stages.routing.embedded_profile``),
    each target layer taking the sorted shares of one measured layer (module doc); ``ratio=R``: shares proportional
    to (e + 1)^-a with a chosen so that max/min = R (R = 1: uniform). Experts get the shares in a
    seeded random order per layer. Returns {'shares', 'kind', 'source', 'max_over_min' per layer}.
    """
    if num_experts < 1 or moe_layers < 1:
        raise ValueError(f"need at least one expert and one MoE layer, got {num_experts} experts, {moe_layers} layers")
    rng = np.random.default_rng(seed)
    rows = []
    if ratio is None:
        if measured is None:
            raise ValueError("give a measured routing profile (measured=) or a max/min ratio (ratio=)")
        emb = measured
        for layer in range(moe_layers):
            src = np.sort(emb["counts"][layer % len(emb["counts"])])[::-1]  # descending shares of one embedded layer
            src = np.maximum(
                src, src[src > 0].min() if (src > 0).any() else 1.0
            )  # an unused expert keeps the rarest share
            q = np.linspace(0.0, 1.0, len(src))
            rows.append(np.interp(np.linspace(0.0, 1.0, num_experts), q, src))
        kind, source = "measured", emb["source"]
    else:
        if ratio < 1:
            raise ValueError(f"max/min ratio must be >= 1, got {ratio}")
        a = math.log(ratio) / math.log(num_experts) if num_experts > 1 else 0.0
        rows = [(np.arange(num_experts) + 1.0) ** -a for _ in range(moe_layers)]
        kind, source = "ratio", f"zipf, max/min {ratio:g}"
    shares = np.stack([r[rng.permutation(num_experts)] for r in rows])  # [L, E]
    shares = shares / shares.sum(1, keepdims=True)
    return {
        "shares": shares,
        "kind": kind,
        "source": source,
        "max_over_min": (shares.max(1) / shares.min(1)).round(2).tolist(),
    }


@torch.no_grad()
def calibrate_bias(
    shares: torch.Tensor,
    top_k: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: "torch.Tensor | None" = None,
    steps: int = 60,
) -> torch.Tensor:
    """Logit bias [E] so that top-k routing of the router inputs ``x`` [T, H] through ``weight`` [E, H]
    hits ``shares`` [E]: damped fixed-point steps b += log(target) - log(reached), from ``bias``."""
    logits0 = x.float() @ weight.float().t()  # [T, E]
    target = shares.to(weight.device, torch.float32)  # [E]
    spread = logits0.std(0).mean().clamp_min(1e-6)  # how far one token's logits move: the step's scale
    if bias is None:  # cancel each expert's mean logit, then tilt by the log shares
        bias = torch.log(target) * spread - logits0.mean(0)  # [E]
    bias = bias.float().clone()
    for _ in range(steps):
        idx = torch.topk(logits0 + bias, top_k, dim=-1).indices  # [T, k]
        reached = torch.zeros_like(target).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=x.device))
        reached = (reached + 0.5) / (reached.sum() + 0.5 * len(target))  # [E] smoothed shares
        bias += 0.3 * (torch.log(target) - torch.log(reached)) * spread
    return bias


@torch.no_grad()
def router_inputs(model, blocks: list, input_ids: torch.Tensor, max_rows: int = 8192) -> list:
    """Inputs [T', H] of every block's router in one forward of ``input_ids`` (at most ``max_rows`` rows each)."""
    seen: list = [None] * len(blocks)

    def grab(i):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[i] = x[:max_rows].detach().clone()

        return hook

    handles = [b.router.register_forward_pre_hook(grab(i)) for i, b in enumerate(blocks)]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _biased_router_forward(self, hidden_states: torch.Tensor):
    """Router forward with a fixed logit bias; same outputs as transformers 5's top-k routers
    (logits, top-k weights, top-k indices): softmax over experts, top-k, optional renormalisation
    (norm_topk_prob; Mixtral always), DeepSeek's routed_scaling_factor."""
    x = hidden_states.reshape(-1, self.weight.shape[1])  # [T, H]
    if getattr(self, "topk_method", None) is not None:  # DeepSeek-V2: fp32 router
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
    else:
        logits = F.linear(x, self.weight)  # [T, E]
    logits = logits + self.mxmoe_bias.to(logits.dtype)
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_v, top_i = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
    if getattr(self, "norm_topk_prob", "Mixtral" in type(self).__name__):
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    top_v = top_v * getattr(self, "routed_scaling_factor", 1.0)
    if hasattr(self, "norm_topk_prob"):  # Qwen / OLMoE routers hand back weights in the logits' dtype
        top_v = top_v.to(logits.dtype)
    return logits, top_v, top_i


def impose_routing(model, profile: dict, input_ids: torch.Tensor, rounds: int = 2) -> None:
    """Give every MoE layer's router the fixed logit bias that reproduces ``profile['shares']``.

    The bias is fitted on the routers' actual inputs for ``input_ids`` (random tokens will do), in
    ``rounds`` passes: each pass runs one forward with the biases so far and refits every layer's
    bias on the inputs it saw (a bias changes the routing and so the next layers' inputs).
    """
    from mxmoe.models.blocks import moe_blocks

    blocks = moe_blocks(model)
    shares = profile["shares"]
    if len(shares) != len(blocks) or shares.shape[1] != blocks[0].num_experts:
        raise ValueError(
            f"profile is [{len(shares)}, {shares.shape[1]}], the model has {len(blocks)} MoE layers "
            f"of {blocks[0].num_experts} experts"
        )
    for b in blocks:
        router = b.router
        if getattr(router, "topk_method", "greedy") != "greedy" and getattr(router, "num_group", 1) != 1:
            raise ValueError(f"{b.name}: group-limited routing is not supported by the biased router")
        if not hasattr(router, "weight") or not hasattr(router, "top_k"):
            raise ValueError(f"{b.name}: router {type(router).__name__} is not a transformers-5 top-k router")
        router.register_buffer("mxmoe_bias", torch.zeros(b.num_experts, device=router.weight.device), persistent=False)
        router.forward = types.MethodType(_biased_router_forward, router)
    for _ in range(rounds):
        xs = router_inputs(model, blocks, input_ids)
        for i, (b, x) in enumerate(zip(blocks, xs)):
            bias = calibrate_bias(
                torch.as_tensor(shares[i]), b.top_k, x, b.router.weight, bias=b.router.mxmoe_bias if _ else None
            )
            b.router.mxmoe_bias.copy_(bias)


@torch.no_grad()
def init_random_(model, std: float, seed: int) -> None:
    """Draw every parameter in place on its device: matrices N(0, std²), norm weights 1, biases 0."""
    g = {}
    for name, p in model.named_parameters():
        dev = p.device
        if dev not in g:
            g[dev] = torch.Generator(device=dev).manual_seed(seed)
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=g[dev])
        elif "norm" in name or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_random(
    name: str,
    device="cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    *,
    skew: "float | None" = None,
    measured: "dict | None" = None,
    routing_seed: int = 0,
    calib_shape: tuple = (8, 1024),
    **overrides,
):
    """A random-weight paper model at full size on ``device``, in eval mode, with imposed skewed routing.

    ``name``: a paper model (``mxmoe.models.paper.PAPER_CONFIGS``) or a ``tiny-*`` zoo config;
    ``overrides`` replace config fields (e.g. ``num_hidden_layers=2`` for a scaled-down copy).
    ``skew=None`` imposes the ``measured`` profile (the embedded model's: ``mxmoe.stages.routing.embedded_profile``); a number R imposes a Zipf-like
    profile with max/min R; ``skew=0`` leaves the routers unbiased (random routers route with their
    own, uncontrolled, skew). The bias is fitted on random tokens of ``calib_shape`` (batch, length).
    Returns (model, routing) where routing = ``target_profile``'s dict (None when skew=0), also kept
    as ``model.mxmoe_routing``. The experts implementation is transformers' ``grouped_mm``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from mxmoe.models.blocks import moe_blocks
    from mxmoe.models.paper import PAPER_CONFIGS, paper_config
    from mxmoe.models.zoo import _TINY_COMMON, TINY_CONFIGS

    if name in PAPER_CONFIGS:
        config = paper_config(name, **overrides)
    elif name in TINY_CONFIGS:
        model_type, extra = TINY_CONFIGS[name]
        config = AutoConfig.for_model(model_type, **{**_TINY_COMMON, **extra, **overrides})
    else:
        raise ValueError(
            f"build_random takes a paper model ({', '.join(PAPER_CONFIGS)}) or a tiny config "
            f"({', '.join(TINY_CONFIGS)}), got {name!r}"
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("build_random(device='cuda') needs a CUDA GPU; pass device='cpu' for a small config")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_random_(model, float(getattr(config, "initializer_range", 0.02)), seed)
    model.eval()
    routing = None
    if skew != 0:
        blocks = moe_blocks(model)
        routing = target_profile(blocks[0].num_experts, len(blocks), measured=measured, ratio=skew, seed=routing_seed)
        g = torch.Generator(device=device).manual_seed(routing_seed)
        ids = torch.randint(0, config.vocab_size, calib_shape, generator=g, device=device)  # [B, S] random tokens
        impose_routing(model, routing, ids)
    model.mxmoe_routing = routing
    return model, routing
