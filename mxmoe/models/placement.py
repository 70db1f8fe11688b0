"""Where the parts of a model spread over several devices live and run (accelerate's big-model placement).

A model placed with a *device map* (``{"model.embed_tokens": 0, "model.layers.0": 0, ...}``, what
``from_pretrained(..., device_map="auto")`` or ``layer_device_map`` gives) and dispatched by
accelerate carries an ``AlignDevicesHook`` on each placed module: the hook moves the module's inputs
to its *execution device* before its forward. mxmoe's stages never assume one device: they ask
``execution_device(module)`` where a module runs (the hook's device, else the device of its
weights), send token ids to ``input_device(model)`` (the input embeddings' device) and move what a
layer needs with ``move``. The same code runs a model on one device, where every answer is that device.

``layer_device_map`` splits a decoder's layers over devices in contiguous runs balanced by weight
bytes (embeddings with the first layers, final norm and LM head with the last ones); ``dispatch``
installs accelerate's hooks for such a map.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mxmoe.errors import MxMoEError


def as_device(d) -> torch.device:
    """A device map value (GPU index, 'cuda:1', 'cpu', 'meta' or a torch.device) as a torch.device."""
    if isinstance(d, torch.device):
        return d
    if isinstance(d, int):
        return torch.device("cuda", d)
    return torch.device(d)


def hook_device(module: nn.Module) -> "torch.device | None":
    """The execution device of accelerate's hook on ``module`` (also inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or [hook]:
        d = getattr(h, "execution_device", None)
        if d is not None:
            return as_device(d)
    return None


def execution_device(module: nn.Module, default=None) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first
    parameter or buffer that holds memory, else that of a meta one, else ``default`` (else the CPU)."""
    d = hook_device(module)
    if d is not None:
        return d
    meta = None
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
        meta = meta or t.device
    for t in module.buffers():
        if t.device.type != "meta":
            return t.device
        meta = meta or t.device
    return meta or as_device(default or "cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: where the input embeddings run."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(emb if emb is not None else model)


def model_devices(model: nn.Module) -> "list[torch.device]":
    """The devices ``model`` is placed on, in module order: its device map's (when dispatched) or those of
    its parameters and buffers that hold memory."""
    found: list = []
    dmap = getattr(model, "hf_device_map", None)
    values = [as_device(v) for v in dmap.values()] if isinstance(dmap, dict) else []
    values += [t.device for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"]
    for d in values:
        if d not in found:
            found.append(d)
    return found


def is_multi_device(model: nn.Module) -> bool:
    """True when ``model`` is spread over more than one device."""
    return len(model_devices(model)) > 1


def move(obj, device: torch.device):
    """``obj`` with every tensor it holds (in tuples, lists and dicts, recursively) on ``device``; other
    objects (caches, None, numbers) are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (``model.model.layers``) of a Hugging Face causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: not a Hugging Face decoder")
    return layers


def _bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers at their dtype (meta tensors count as if materialised)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def split_contiguous(sizes: "list[int]", parts: int) -> "list[int]":
    """The part (0..parts-1) of each item when ``sizes`` are cut into ``parts`` non-empty contiguous runs
    whose largest sum is as small as possible (dynamic programming over cut points). Raises MxMoEError
    when there are fewer items than parts."""
    n = len(sizes)
    if parts < 1:
        raise MxMoEError(f"need at least one device, got {parts}")
    if n < parts:
        raise MxMoEError(f"{n} decoder layers cannot fill {parts} devices (one layer at least per device)")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i items in p parts
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                v = max(best[p - 1][j], prefix[i] - prefix[j])
                if v < best[p][i]:
                    best[p][i], cut[p][i] = v, j
    out, i = [0] * n, n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        out[j:i] = [p - 1] * (i - j)
        i = j
    return out


def placement_units(model: nn.Module) -> "list[tuple[str, nn.Module, str]]":
    """The modules a device map places, in the order activations flow: (name, module, kind) with kind
    'head' (everything of ``model.model`` before the layers, and modules without weights such as the
    rotary embedding), 'layer' (each decoder layer) or 'tail' (the final norm, the LM head)."""
    layers = decoder_layers(model)
    base = model.model
    prefix = next(n for n, m in model.named_modules() if m is base)
    layer_prefix = next(n for n, m in model.named_modules() if m is layers)
    head, tail, seen_layers = [], [], False
    for name, child in base.named_children():
        if child is layers:
            seen_layers = True
        elif seen_layers and any(True for _ in child.parameters()):
            tail.append((f"{prefix}.{name}", child, "tail"))
        else:
            head.append((f"{prefix}.{name}", child, "head"))
    tail += [(name, child, "tail") for name, child in model.named_children() if child is not base]
    return head + [(f"{layer_prefix}.{i}", layer, "layer") for i, layer in enumerate(layers)] + tail


def layer_device_map(model: nn.Module, devices, layer_bytes: "list[int] | None" = None) -> dict:
    """An accelerate device map that spreads ``model``'s decoder layers over ``devices`` in contiguous runs.

    ``devices``: GPU indices, device strings or torch.devices (repeats allowed, e.g. two CPU placements
    in a test). Runs are balanced by bytes: each layer's ``layer_bytes`` (default: its weights at their
    dtype, meta weights included), plus the 'head' units of ``placement_units`` (input embeddings,
    rotary embedding) on the first device and the 'tail' ones (final norm, LM head) on the last. Keys
    are module names; values are ``torch.device``s.
    """
    devices = [as_device(d) for d in devices]
    units = placement_units(model)
    layers = [u for u in units if u[2] == "layer"]
    sizes = list(layer_bytes) if layer_bytes is not None else [_bytes(m) for _, m, _ in layers]
    if len(sizes) != len(layers):
        raise MxMoEError(f"{len(sizes)} layer sizes for {len(layers)} decoder layers")
    sizes[0] += sum(_bytes(m) for _, m, k in units if k == "head")  # the embeddings run with the first layer
    sizes[-1] += sum(_bytes(m) for _, m, k in units if k == "tail")  # the norm and the LM head with the last
    parts = split_contiguous(sizes, len(devices))
    part = {name: parts[i] for i, (name, _, _) in enumerate(layers)}
    return {name: devices[part.get(name, 0 if kind == "head" else parts[-1])] for name, _, kind in units}


def device_of(name: str, device_map: dict) -> torch.device:
    """The device of parameter or module ``name`` under ``device_map`` (its longest matching module prefix)."""
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise MxMoEError(f"{name} is not covered by the device map (keys: {', '.join(list(device_map)[:6])}, ...)")
    return as_device(device_map[best])


def _accelerate_value(d):
    """A device as accelerate's device maps write it: a GPU index, or 'cpu' / 'meta' / 'disk'."""
    d = as_device(d) if not (isinstance(d, str) and d == "disk") else d
    if isinstance(d, torch.device):
        return (d.index or 0) if d.type == "cuda" else str(d)
    return d


def dispatch(model: nn.Module, device_map: dict) -> nn.Module:
    """Install accelerate's hooks for ``device_map`` (every module moved to its device, inputs moved to
    each module's device before its forward, the output back to the input's device) and return the model.

    Hooks are installed even when the map names one device, so that path is the one that runs.
    """
    from accelerate import dispatch_model

    dmap = {k: _accelerate_value(v) for k, v in device_map.items()}
    main = next(iter(dmap.values()))
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if main == "cpu":  # accelerate warns of weights "offloaded to the cpu": with the CPU as main device none are
        log.setLevel(logging.ERROR)
    try:
        return dispatch_model(
            model,
            device_map=dmap,
            main_device=main,
            force_hooks=True,
            skip_keys=getattr(model, "_skip_keys_device_placement", None) or None,
        )
    finally:
        log.setLevel(level)
