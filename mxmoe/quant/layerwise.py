"""Run a decoder one layer at a time over calibration windows (GPTQ's sequential scheme).

``LayerwiseRunner`` captures the inputs of decoder layer 0 (hidden states and the keyword
arguments the model passes: position embeddings, mask, ...) once, then advances the hidden
states layer by layer. At each layer the input of its MoE block can be collected, so callers
(sensitivity, sequential GPTQ) see exactly what the block sees, without a full-model rerun per
layer. Windows run one at a time (batch 1) so the captured arguments fit every window; layer 0's
arguments serve every layer, so models that mix attention kinds (sliding and full) are refused.

A model spread over several devices (accelerate's device map, ``mxmoe.models.placement``) works
the same way: before a layer runs, the hidden states and the captured arguments move to the device
that layer computes on (once per change of device, not per window), so the calibration activations
of a layer, and the block inputs handed to callers, live on that layer's device and nowhere else.

A model larger than the GPU is held in CPU memory and *streamed* (``stream_to``): each decoder layer is
moved to that device for its turn, from the first call that uses it until the next layer's turn or
``release``, then moved back (a lossless copy, with whatever the caller wrote into its weights), so the
device holds one layer and the calibration activations at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from mxmoe.errors import MxMoEError
from mxmoe.models.placement import (
    decoder_layers,
    execution_device,
    input_device,
    is_multi_device,
    model_devices,
    move,
)


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass after layer 0's inputs are seen."""


class LayerwiseRunner:
    """Hidden states [n, seqlen, H] of calibration windows, advanced through the decoder layer by layer."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, stream_to: "torch.device | str | None" = None):
        """Embed ``windows`` [n, seqlen] and capture decoder layer 0's inputs for each window. ``stream_to``: run
        each decoder layer there, moving it from and back to where it is held (module docstring)."""
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
            raise ValueError(f"calibration windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
        kinds = set(getattr(model.config, "layer_types", None) or [])
        if len(kinds) > 1:  # layer 0's mask would be wrong for the other kind of layer
            raise MxMoEError(
                f"layer-by-layer calibration needs one attention kind for every layer, got {sorted(kinds)}"
            )
        if stream_to is not None and is_multi_device(model):
            raise MxMoEError(
                f"streaming layers to {stream_to} needs the model held on one device (the CPU); this one is "
                f"spread over {', '.join(map(str, model_devices(model)))}: leave stream_to unset"
            )
        self.model = model
        self.layers = decoder_layers(model)
        self.next_layer = 0
        self.stream_to = None if stream_to is None else torch.device(stream_to)
        self._resident: "tuple[nn.Module, torch.device] | None" = None  # streamed layer and where it is held
        device = input_device(model)
        hidden, kwargs = [], []

        def grab(module, args, kw):
            hidden.append(args[0] if args else kw.pop("hidden_states"))
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for w in windows:
                try:
                    model(w[None].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        self.hidden = torch.cat(hidden)  # [n, seqlen, H], on the device of the layer about to run
        self.kwargs = [move(kw, self.hidden.device) for kw in kwargs]  # one dict per window, same device

    def _place(self, layer: nn.Module) -> None:
        """Move the hidden states and the captured arguments to the device ``layer`` computes on (streamed: move
        the layer there first, and the one streamed before back)."""
        if self.stream_to is not None and (self._resident is None or self._resident[0] is not layer):
            self.release()
            home = execution_device(layer, default=self.hidden.device)
            layer.to(self.stream_to)
            self._resident = (layer, home)
        device = self.stream_to or execution_device(layer, default=self.hidden.device)
        if self.hidden.device != device:
            self.hidden = self.hidden.to(device)
            self.kwargs = [move(kw, device) for kw in self.kwargs]

    @property
    def home_device(self) -> "torch.device | None":
        """Where the streamed layer is held (None when nothing is streamed)."""
        return None if self._resident is None else self._resident[1]

    def release(self) -> None:
        """Move the streamed layer back to where it is held (nothing without ``stream_to``)."""
        if self._resident is not None:
            layer, home = self._resident
            layer.to(home)
            self._resident = None

    @torch.no_grad()
    def advance(self, capture: "nn.Module | None" = None) -> "torch.Tensor | None":
        """Run layer ``next_layer`` on every window (on its device); returns the inputs [n·seqlen, H] of
        ``capture`` if given, on that device."""
        if self.next_layer >= len(self.layers):
            raise IndexError(f"the decoder has {len(self.layers)} layers; all have run")
        layer = self.layers[self.next_layer]
        self._place(layer)
        seen = []
        handle = (
            capture.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
            if capture is not None
            else None
        )
        try:
            for i in range(self.hidden.shape[0]):
                out = layer(self.hidden[i : i + 1], **self.kwargs[i])
                self.hidden[i : i + 1] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        self.next_layer += 1
        return torch.cat(seen) if capture is not None else None

    @torch.no_grad()
    def block_inputs(self, block: nn.Module) -> torch.Tensor:
        """Inputs [n·seqlen, H] that ``block`` (inside layer ``next_layer``) receives, without advancing;
        on the layer's device."""
        layer = self.layers[self.next_layer]
        self._place(layer)
        seen = []

        def grab(m, a):
            seen.append(a[0].reshape(-1, a[0].shape[-1]))
            raise _Stop

        handle = block.register_forward_pre_hook(grab)
        try:
            for i in range(self.hidden.shape[0]):
                try:
                    layer(self.hidden[i : i + 1], **self.kwargs[i])
                except _Stop:
                    pass
        finally:
            handle.remove()
        return torch.cat(seen)
