"""Named models: the embedded smollm2-moe, tiny random MoEs of every family, and the paper's models.

* ``smollm2-moe`` — built locally from SmolLM2-135M: ``smollm2-moe-tf`` (training-free,
  :mod:`mxmoe.models.moefy`) or ``smollm2-moe-v2`` (every FFN carved, healed files merged);
  see :mod:`mxmoe.models.smollm2`.
* ``tiny-<family>`` — random-weight MoEs (seeded, seconds to build) for tests and the smoke profile.
* paper models — Hugging Face ids with their MoE shapes and full-size configs (one table,
  :mod:`mxmoe.models.paper`), so kernels and random-weight copies run on the real shapes even where
  the weights cannot be downloaded.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# The paper's models live in mxmoe.models.paper (one table for the package); re-exported here.
from mxmoe.models.paper import PAPER_CONFIGS, PAPER_MODELS, MoEShape  # noqa: F401

_TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Tiny random configs of every supported family: (model_type, extra config).
TINY_CONFIGS = {
    "tiny-mixtral": ("mixtral", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "tiny-qwen2-moe": (
        "qwen2_moe",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            qkv_bias=True,
            norm_topk_prob=False,
        ),
    ),
    "tiny-qwen3-moe": (
        "qwen3_moe",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
        ),
    ),
    "tiny-olmoe": ("olmoe", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "tiny-deepseek-v2": (
        "deepseek_v2",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
        ),
    ),
    "tiny-deepseek-v3": (
        "deepseek_v3",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=2,
            topk_group=1,
        ),
    ),
}


def tiny_model(name: str, seed: int = 0):
    """A random-weight MoE of one family (see TINY_CONFIGS), deterministic for a seed, in fp32 eval mode."""
    model_type, extra = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **{**_TINY_COMMON, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # routers and 3-D expert tensors start as zeros/empty in transformers 5
        for name_, p in model.named_parameters():
            if p.dim() >= 2 and (p.abs().sum() == 0 or not torch.isfinite(p).all()):
                p.normal_(0.0, 0.02)
    return model.eval()


def zoo_names() -> list[str]:
    """Every name that load_model accepts besides HF ids and local paths."""
    return ["smollm2-moe", "smollm2-moe-tf", "smollm2-moe-v2", *TINY_CONFIGS, *PAPER_MODELS]
