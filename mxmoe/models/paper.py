"""The paper's models: one table of their Hugging Face ids, MoE shapes and full-size configs.

``PAPER_MODELS[name] = (hf_id, MoEShape)`` is what the kernel benchmarks and the allocation read;
``PAPER_CONFIGS[name] = (model_type, fields)`` holds the public config values that instantiate the
full-size model with transformers 5 (``paper_config(name)``), so a random-weight copy of each model
can be built without downloading anything (``mxmoe.models.random_init.build_random``).
``LARGE_MODELS`` / ``LARGE_CONFIGS`` hold models that are not in the paper (Qwen3-235B-A22B), in the
same format, for the multi-GPU benchmark; ``MODEL_CONFIGS`` and ``MODEL_SHAPES`` join both.

Every value comes from the model's ``config.json`` on the Hugging Face hub, as quoted in the source
named beside each entry. Fields not listed take transformers' defaults for the model type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    """The shape of one MoE layer as the kernels see it."""

    num_experts: int
    hidden: int
    expert_width: int
    top_k: int
    shared_width: int = 0  # total width of the shared experts (0: none)
    moe_layers: int = 0


# Paper models (Table 2 and the kernel benchmarks).
PAPER_MODELS = {
    "qwen1.5-moe": ("Qwen/Qwen1.5-MoE-A2.7B", MoEShape(60, 2048, 1408, 4, 4 * 1408, 24)),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", MoEShape(64, 2048, 1408, 6, 2 * 1408, 26)),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", MoEShape(8, 4096, 14336, 2, 0, 32)),
    "qwen2-57b": ("Qwen/Qwen2-57B-A14B", MoEShape(64, 3584, 2560, 8, 20480, 28)),
    "olmoe": ("allenai/OLMoE-1B-7B-0924", MoEShape(64, 2048, 1024, 8, 0, 16)),
    "qwen3-30b": ("Qwen/Qwen3-30B-A3B", MoEShape(128, 2048, 768, 8, 0, 48)),
}

# Full-size configs: (model_type, config fields). Sources (each model's config.json):
# (DeepSeek-V2-Lite's YaRN rope scaling, factor 40, is left out: it changes no shape and no kernel.)
PAPER_CONFIGS = {
    # huggingface.co/MaziyarPanahi/Qwen1.5-MoE-A2.7B-Wikihow config.json (_name_or_path Qwen/Qwen1.5-MoE-A2.7B)
    "qwen1.5-moe": (
        "qwen2_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_experts=60,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            qkv_bias=True,
        ),
    ),
    # huggingface.co/nicoboss/DeepSeek-V2-Lite-Chat-Uncensored config.json and
    # TechxGenus/DeepSeek-V2-Lite-Chat-AWQ config.json (both from deepseek-ai/DeepSeek-V2-Lite-Chat)
    "deepseek-v2-lite": (
        "deepseek_v2",
        dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            moe_intermediate_size=1408,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            moe_layer_freq=1,
            norm_topk_prob=False,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=163840,
            tie_word_embeddings=False,
        ),
    ),
    # huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1 config.json (same architecture as v0.1 base)
    "mixtral-8x7b": (
        "mixtral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    # huggingface.co/zhoukz/qwen2-57b-a14b-4bit config.json (_name_or_path Qwen/Qwen2-57B-A14B)
    "qwen2-57b": (
        "qwen2_moe",
        dict(
            vocab_size=151936,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            moe_intermediate_size=2560,
            shared_expert_intermediate_size=20480,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            qkv_bias=True,
        ),
    ),
    # huggingface.co/allenai/OLMoE-1B-7B-0924 config.json (revision c1b31da)
    "olmoe": (
        "olmoe",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen/Qwen3-30B-A3B config.json as quoted in public configs (vLLM integration tests; slime's
    # scripts/models/qwen3-30B-A3B.sh gives the same layers, heads, KV groups, widths and experts)
    "qwen3-30b": (
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
        ),
    ),
}


# Models that are NOT in the paper: today's MoEs that do not fit one GPU, benchmarked over several
# GPUs (``mxmoe.bench.multi_gpu``). Same format as the paper's tables; the paper's tables, kernel
# benchmark cases and notebooks do not read these.
LARGE_MODELS = {
    "qwen3-235b": ("Qwen/Qwen3-235B-A22B", MoEShape(128, 4096, 1536, 8, 0, 94)),
}
LARGE_CONFIGS = {
    # Qwen/Qwen3-235B-A22B config.json (transformers 4.51 release config; slime's
    # scripts/models/qwen3-235B-A22B.sh gives the same layers, heads, KV groups, widths, experts, vocab
    # and rotary base)
    "qwen3-235b": (
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=1536,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
            attention_bias=False,
        ),
    ),
}
MODEL_CONFIGS = {**PAPER_CONFIGS, **LARGE_CONFIGS}  # every full-size config build_random can instantiate
MODEL_SHAPES = {**PAPER_MODELS, **LARGE_MODELS}


def paper_config(name: str, **overrides):
    """The transformers config of a paper model (or a ``LARGE_CONFIGS`` model) ``name`` at full size;
    ``overrides`` replace fields (e.g. ``num_hidden_layers=2`` for a scaled-down copy). Raises
    ValueError for an unknown name."""
    from transformers import AutoConfig

    if name not in MODEL_CONFIGS:
        raise ValueError(
            f"unknown paper model {name!r}; the paper's models are {', '.join(PAPER_CONFIGS)}"
            f" (larger models, not in the paper: {', '.join(LARGE_CONFIGS)})"
        )
    model_type, fields = MODEL_CONFIGS[name]
    return AutoConfig.for_model(model_type, **{**fields, **overrides})
