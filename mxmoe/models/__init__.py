"""Models: ``load_model(name)`` for zoo names, HF ids and local paths; ``moe_blocks(model)``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mxmoe.errors import ModelNotFound
from mxmoe.models.blocks import BLOCKS, MoEBlock, moe_blocks
from mxmoe.models.zoo import PAPER_MODELS, TINY_CONFIGS, tiny_model, zoo_names

__all__ = ["BLOCKS", "MoEBlock", "default_device", "load_model", "moe_blocks", "zoo_names"]


def default_device() -> torch.device:
    """Where models are loaded and quantized: $MXMOE_DEVICE if set, else the first CUDA GPU, else the CPU."""
    return torch.device(os.environ.get("MXMOE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def _from_pretrained(path: str, dtype: torch.dtype, device: torch.device):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_model(name: str, dtype: torch.dtype = torch.float32, build: bool = True, device=None):
    """(model, tokenizer) for a zoo name ('smollm2-moe', 'tiny-<family>', paper names), an HF id or a local path.

    A local path holding an mxmoe checkpoint (``mxmoe.json``) loads through ``mxmoe.load_quantized``.
    The model is placed on ``device`` (default: ``default_device()``). smollm2-moe is built into the
    cache on first use (minutes on a CPU); tiny models have no tokenizer (None). Unknown names raise
    ModelNotFound listing what is accepted.
    """
    device = torch.device(device) if device is not None else default_device()
    if name == "smollm2-moe":
        from mxmoe.models import smollm2

        if not smollm2.is_built() and not build:
            raise ModelNotFound("smollm2-moe is not built yet: run `mxmoe model build` (about 10 minutes on 2 CPU cores)")
        return _from_pretrained(str(smollm2.build()), dtype, device)
    if name in TINY_CONFIGS:
        return tiny_model(name).to(device, dtype), None
    hf_id = PAPER_MODELS[name][0] if name in PAPER_MODELS else name
    if Path(hf_id).expanduser().exists():
        from mxmoe.checkpoint import is_checkpoint, load_quantized, load_tokenizer

        if is_checkpoint(Path(hf_id).expanduser()):  # bf16 on a GPU: what the kernel takes
            return load_quantized(hf_id, device, dtype if device.type == "cpu" else None), load_tokenizer(hf_id)
        return _from_pretrained(str(Path(hf_id).expanduser()), dtype, device)
    if "/" not in hf_id:
        raise ModelNotFound(f"unknown model {name!r}: use a zoo name ({', '.join(zoo_names())}), "
                            f"a Hugging Face id like 'Qwen/Qwen1.5-MoE-A2.7B', or a local checkpoint folder")
    try:
        return _from_pretrained(hf_id, dtype, device)
    except OSError as e:
        raise ModelNotFound(f"could not load {hf_id!r} from the Hugging Face hub or its cache ({str(e).splitlines()[0][:200]}); "
                            "check the id, your network, or pass a local checkpoint folder") from None
