"""Models: ``load_model(name)`` for zoo names, HF ids and local paths; ``moe_blocks(model)``."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mxmoe.env import default_device
from mxmoe.errors import ModelNotFound
from mxmoe.models import smollm2
from mxmoe.models.blocks import BLOCKS, MoEBlock, moe_blocks
from mxmoe.models.zoo import PAPER_MODELS, TINY_CONFIGS, tiny_model, zoo_names

__all__ = ["BLOCKS", "MoEBlock", "default_device", "load_model", "moe_blocks", "zoo_names"]


def _from_pretrained(path: str, dtype: torch.dtype, device: torch.device, device_map=None):
    if device_map is not None:  # accelerate places the weights while they load, hooks move activations
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_model(name: str, dtype: torch.dtype = torch.float32, build: bool = True, device=None, device_map=None):
    """(model, tokenizer) for a zoo name ('smollm2-moe[-tf|-v2]', 'tiny-<family>', paper names), an HF id or a local path.

    The model is placed on ``device`` (default: ``default_device()``), or, for a Hugging Face id or a
    local folder, over several GPUs with ``device_map`` (``"auto"`` or an accelerate device map, as
    ``from_pretrained`` takes it; every mxmoe stage runs on such a model). smollm2-moe is built into the
    cache on first use (minutes on a CPU); tiny models have no tokenizer (None). Unknown names raise
    ModelNotFound listing what is accepted.
    """
    device = torch.device(device) if device is not None else default_device()
    if name in smollm2.NAMES:
        recipe = smollm2.recipe(name)
        if not smollm2.is_built(recipe) and not build:
            flag = "" if name == smollm2.NAME else f" --recipe {name}"
            raise ModelNotFound(
                f"{name} is not built yet: run `mxmoe model build{flag}` (about 10 minutes on 2 CPU cores)"
            )
        return _from_pretrained(str(smollm2.build(recipe)), dtype, device)
    if name in TINY_CONFIGS:
        return tiny_model(name).to(device, dtype), None
    hf_id = PAPER_MODELS[name][0] if name in PAPER_MODELS else name
    if Path(hf_id).expanduser().exists():
        return _from_pretrained(str(Path(hf_id).expanduser()), dtype, device, device_map)
    if "/" not in hf_id:
        raise ModelNotFound(
            f"unknown model {name!r}: use a zoo name ({', '.join(zoo_names())}), "
            f"a Hugging Face id like 'Qwen/Qwen1.5-MoE-A2.7B', or a local checkpoint folder"
        )
    try:
        return _from_pretrained(hf_id, dtype, device, device_map)
    except OSError as e:
        raise ModelNotFound(
            f"could not load {hf_id!r} from the Hugging Face hub or its cache ({str(e).splitlines()[0][:200]}); "
            "check the id, your network, or pass a local checkpoint folder"
        ) from None
