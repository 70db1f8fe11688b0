"""Random-weight copies of the paper's models at full size, built on the GPU in seconds, with skewed routing.

``build_random(name)`` instantiates a paper model (``mxmoe.models.paper``) from its public config
directly on the target device (the modules are created under a device context: no CPU copy of the
weights exists), then draws every weight from N(0, initializer_range²), each matrix from its own
generator seeded by the seed and the parameter's name (norm weights 1, biases 0). With
``device_map`` the model is spread over several devices: built with meta weights, each weight
created and drawn on its own device, accelerate's hooks installed; the weights are the same as on
one device, and ``drop_expert_weights`` / ``restore_expert_weights`` free a layer's bf16 experts
once packed and draw them again when needed. Kernel time does not depend on weight values, so such a model times
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
import zlib

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


def install_biased_routers(blocks: list, biases: "list | None" = None) -> None:
    """Give every block's router a fixed logit bias (``biases[i]``, default zeros) on the router's device,
    and the biased forward (``_biased_router_forward``)."""
    for i, b in enumerate(blocks):
        router = b.router
        if getattr(router, "topk_method", "greedy") != "greedy" and getattr(router, "num_group", 1) != 1:
            raise ValueError(f"{b.name}: group-limited routing is not supported by the biased router")
        if not hasattr(router, "weight") or not hasattr(router, "top_k"):
            raise ValueError(f"{b.name}: router {type(router).__name__} is not a transformers-5 top-k router")
        bias = torch.zeros(b.num_experts) if biases is None else biases[i].detach().float()
        router.register_buffer("mxmoe_bias", bias.to(router.weight.device).clone(), persistent=False)
        router.forward = types.MethodType(_biased_router_forward, router)


def copy_routing(src, dst) -> None:
    """Give ``dst`` (built with ``skew=0``) the fitted router biases of ``src`` (same config): the same
    routing, on each of ``dst``'s routers' own device."""
    from mxmoe.models.blocks import moe_blocks

    biases = [b.router.mxmoe_bias for b in moe_blocks(src)]
    install_biased_routers(moe_blocks(dst), biases)
    dst.mxmoe_routing = getattr(src, "mxmoe_routing", None)


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
    install_biased_routers(blocks)
    for _ in range(rounds):
        xs = router_inputs(model, blocks, input_ids)
        for i, (b, x) in enumerate(zip(blocks, xs)):
            bias = calibrate_bias(
                torch.as_tensor(shares[i]), b.top_k, x, b.router.weight, bias=b.router.mxmoe_bias if _ else None
            )
            b.router.mxmoe_bias.copy_(bias)


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s draw: the same wherever (and on whichever device) it is drawn."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def init_param_(name: str, p: torch.Tensor, std: float, seed: int) -> None:
    """Draw one parameter in place on its device: a matrix N(0, std²) from its own seeded generator
    (``param_seed``), a norm weight 1, a bias 0; a meta tensor is left alone."""
    if p.device.type == "meta":
        return
    if p.dim() >= 2:
        p.normal_(0.0, std, generator=torch.Generator(device=p.device).manual_seed(param_seed(seed, name)))
    elif "norm" in name or name.endswith("layernorm.weight"):
        p.fill_(1.0)
    else:
        p.zero_()


@torch.no_grad()
def init_random_(model, std: float, seed: int) -> None:
    """Draw every parameter in place on its device (``init_param_``): matrices N(0, std²), norm weights 1,
    biases 0. Each matrix has its own generator, so the weights do not depend on the placement."""
    for name, p in model.named_parameters():
        init_param_(name, p, std, seed)


def _set_tensor(model, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    """Replace parameter (or buffer) ``name`` of ``model`` by ``value`` (a parameter keeps requires_grad)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if buffer:
        module._buffers[leaf] = value
    else:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)


@torch.no_grad()
def materialize(config, dtype: torch.dtype, device_map, std: float, seed: int):
    """A model of ``config`` whose every parameter is created directly on its device under ``device_map``
    and drawn there (``init_param_``), dispatched with accelerate's hooks (``placement.dispatch``).

    The modules are first built with weights on the meta device (accelerate's ``init_empty_weights``;
    buffers such as the rotary frequencies are real), so no device ever holds more than its share.
    ``device_map``: accelerate-style {module name: device}, or a list of devices to split the decoder
    layers over (``placement.layer_device_map``). A module mapped to "meta" keeps meta weights.
    """
    from mxmoe.models.placement import device_of, dispatch, layer_device_map

    model = _empty(config, dtype)
    if not isinstance(device_map, dict):
        device_map = layer_device_map(model, list(device_map))
    _fill(model, lambda name: device_of(name, device_map), std, seed)
    return dispatch(model, device_map)


def _empty(config, dtype: torch.dtype):
    """A model of ``config`` with meta weights (accelerate's ``init_empty_weights``; buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _fill(model, device_of, std: float, seed: int, draw_on=None) -> None:
    """Create every parameter of ``model`` on ``device_of(name)`` and draw it (``init_param_``) there, or on
    ``draw_on`` and then move it (a model held in CPU memory drawn at GPU speed); buffers go to their device."""
    for name, p in list(model.named_parameters()):
        home = device_of(name)
        t = torch.empty(p.shape, dtype=p.dtype, device=draw_on if draw_on is not None and home.type != "meta" else home)
        init_param_(name, t, std, seed)
        _set_tensor(model, name, t.to(home))
    for name, b in list(model.named_buffers()):
        _set_tensor(model, name, b.to(device_of(name)), buffer=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def drop_expert_weights(block) -> None:
    """Free one MoE block's fused routed-expert tensors (after they were packed): they become meta
    tensors of the same shape, and ``restore_expert_weights`` draws them again where they were."""
    experts = block.experts
    for attr in ("gate_up_proj", "down_proj"):
        p = getattr(experts, attr)
        if p.device.type == "meta":
            continue
        homes = getattr(experts, "mxmoe_home", {})
        homes[attr] = (p.device, p.dtype)
        experts.mxmoe_home = homes
        experts._parameters[attr] = torch.nn.Parameter(
            torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
        )


@torch.no_grad()
def restore_expert_weights(block, std: float, seed: int) -> bool:
    """Draw again, on their device, the routed-expert tensors ``drop_expert_weights`` freed (the same
    values: ``init_param_`` seeds each tensor by its name). Returns True when something was restored."""
    experts = block.experts
    done = False
    for attr, (device, dtype) in dict(getattr(experts, "mxmoe_home", {})).items():
        p = getattr(experts, attr)
        if p.device.type != "meta":
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        init_param_(f"{block.name}.experts.{attr}", t, std, seed)
        experts._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        done = True
    return done


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
    device_map=None,
    draw_on=None,
    **overrides,
):
    """A random-weight paper model at full size on ``device``, in eval mode, with imposed skewed routing.

    ``name``: a paper model (``mxmoe.models.paper.MODEL_CONFIGS``, the paper's and the larger ones) or a
    ``tiny-*`` zoo config; ``overrides`` replace config fields (e.g. ``num_hidden_layers=2`` for a
    scaled-down copy). ``device_map`` spreads the model over several devices instead of ``device``: a
    list of devices (the decoder layers split in balanced contiguous runs,
    ``mxmoe.models.placement.layer_device_map``) or an accelerate device map; every weight is created
    on its own device (``materialize``) and accelerate's hooks move the activations. Weights do not
    depend on the placement (each matrix is drawn from its own seeded generator). ``draw_on`` draws every
    weight on that device and moves it to ``device``: a model held in CPU memory, larger than the GPU,
    built at GPU speed (no hooks: ``mxmoe.quant.layerwise`` streams its layers to the GPU).
    ``skew=None`` imposes the ``measured`` profile (the embedded model's: ``mxmoe.stages.routing.embedded_profile``); a number R imposes a Zipf-like
    profile with max/min R; ``skew=0`` leaves the routers unbiased (random routers route with their
    own, uncontrolled, skew). The bias is fitted on random tokens of ``calib_shape`` (batch, length).
    Returns (model, routing) where routing = ``target_profile``'s dict (None when skew=0), also kept
    as ``model.mxmoe_routing``; ``model.mxmoe_init`` keeps the seed and scale that
    ``restore_expert_weights`` needs. The experts implementation is transformers' ``grouped_mm``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from mxmoe.models.blocks import moe_blocks
    from mxmoe.models.paper import MODEL_CONFIGS, paper_config
    from mxmoe.models.placement import as_device, input_device
    from mxmoe.models.zoo import _TINY_COMMON, TINY_CONFIGS

    if name in MODEL_CONFIGS:
        config = paper_config(name, **overrides)
    elif name in TINY_CONFIGS:
        model_type, extra = TINY_CONFIGS[name]
        config = AutoConfig.for_model(model_type, **{**_TINY_COMMON, **extra, **overrides})
    else:
        raise ValueError(
            f"build_random takes a paper model ({', '.join(MODEL_CONFIGS)}) or a tiny config "
            f"({', '.join(TINY_CONFIGS)}), got {name!r}"
        )
    std = float(getattr(config, "initializer_range", 0.02))
    places = list(device_map.values()) if isinstance(device_map, dict) else list(device_map or [device])
    places += [draw_on] if draw_on is not None else []
    if any(as_device(d).type == "cuda" for d in places) and not torch.cuda.is_available():
        raise RuntimeError("build_random on a CUDA device needs a CUDA GPU; pass device='cpu' for a small config")
    if device_map is not None:
        model = materialize(config, dtype, device_map, std, seed)
        device = input_device(model)
    elif draw_on is not None:
        device = torch.device(device)
        model = _empty(config, dtype)
        _fill(model, lambda _: device, std, seed, draw_on=torch.device(draw_on))
    else:
        device = torch.device(device)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        init_random_(model, std, seed)
    model.eval()
    model.mxmoe_init = {"seed": seed, "std": std}
    routing = None
    if skew != 0:
        blocks = moe_blocks(model)
        routing = target_profile(blocks[0].num_experts, len(blocks), measured=measured, ratio=skew, seed=routing_seed)
        g = torch.Generator(device=device).manual_seed(routing_seed)
        ids = torch.randint(0, config.vocab_size, calib_shape, generator=g, device=device)  # [B, S] random tokens
        impose_routing(model, routing, ids)
    model.mxmoe_routing = routing
    return model, routing
