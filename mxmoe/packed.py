"""The expert layers of a loaded mxmoe checkpoint: packed weights, run by the kernel or by its reference.

A quantized checkpoint keeps every quantized block as integer codes, not as a dequantized float
weight. Loaded, the routed experts of one MoE layer become a :class:`PackedExperts` (attached to the
transformers experts module, whose 3-D weight tensors are dropped) and are run by the transformers
experts implementation ``"mxmoe_packed"``:

* on a CUDA GPU, or on a CPU under ``TRITON_INTERPRET=1``: ``mxmoe.kernels.moe_experts_forward``,
  two ``group_gemm`` launches per layer whatever the mix of schemes;
* on a CPU otherwise: the same routing with ``reference_group_gemm`` (dequantized stored codes,
  fake-quantized activations, float32 math), the definition the kernel is tested against.

Quantized shared experts (and per-expert ``nn.Linear`` layouts) become :class:`QuantLinear`, one
expert in the same two paths. Full-precision routed blocks keep the checkpoint's float weight; the
kernel path converts them to bf16 once, when it builds its expert groups.
"""

from __future__ import annotations

import torch
from torch import nn

from mxmoe.kernels.group_gemm import INTERPRET, ExpertGroup, group_gemm
from mxmoe.kernels.moe import moe_experts_forward, route
from mxmoe.kernels.pack import PackedWeight, pack
from mxmoe.kernels.reference import reference_group_gemm
from mxmoe.quant.hadamard import apply_online_hadamard
from mxmoe.quant.rtn import IntWeight
from mxmoe.schemes import BF16

IMPLEMENTATION = "mxmoe_packed"  # name under transformers' ALL_EXPERTS_FUNCTIONS


def uses_kernel(device: torch.device) -> bool:
    """True where the Triton kernel runs: a CUDA device, or any device under the Triton interpreter."""
    return device.type == "cuda" or INTERPRET


def _aligned(t: "torch.Tensor | None") -> "torch.Tensor | None":
    """``t``, copied when it does not start on a 16-byte boundary (the kernel loads 16 bytes at once;
    tensors read from a safetensors file may start anywhere)."""
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


class PackedBlock(nn.Module):
    """One weight [N, K] in kernel storage (``PackedWeight``), held as buffers so ``model.to`` moves it.

    Quantized: ``data`` uint8 codes, ``scale`` [G, N], ``zero`` [G, N] or None. Full precision:
    ``data`` is the float weight [N, K] itself (the checkpoint's dtype), ``scale``/``zero`` None.
    """

    def __init__(self, pw: PackedWeight):
        super().__init__()
        self.scheme, self.n, self.k = pw.scheme, pw.n, pw.k
        self.register_buffer("data", _aligned(pw.data))
        self.register_buffer("scale", _aligned(pw.scale))
        self.register_buffer("zero", _aligned(pw.zero))

    @classmethod
    def from_weight(cls, w: "IntWeight | torch.Tensor") -> "PackedBlock":
        """Pack an ``IntWeight`` exactly, or keep a float weight [N, K] as a full-precision block."""
        if isinstance(w, IntWeight):
            return cls(pack(w))
        return cls(PackedWeight(BF16, w.shape[0], w.shape[1], w.contiguous(), None, None))

    def packed(self, for_kernel: bool) -> PackedWeight:
        """The stored weight as a ``PackedWeight``; for the kernel a full-precision weight is bf16."""
        if self.scheme.is_full_precision and for_kernel:
            return pack(self.data, BF16)
        return PackedWeight(self.scheme, self.n, self.k, self.data, self.scale, self.zero)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes (or the float weight), scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def extra_repr(self) -> str:
        """Scheme and shape, for ``print(model)``."""
        return f"{self.scheme}, n={self.n}, k={self.k}"


def _groups_key(blocks) -> tuple:
    return tuple(b.data.data_ptr() for b in blocks)


class PackedExperts(nn.Module):
    """The routed experts of one MoE layer: per expert a gate_up block [2I, H] and a down block [H, I].

    ``online_hadamard``: the down_proj input is rotated online (the checkpoint was quantized with a
    Hadamard rotation, its down weights rotated to match).
    """

    def __init__(self, gate_up: "list[PackedBlock]", down: "list[PackedBlock]", online_hadamard: bool = False):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError(f"{len(gate_up)} gate_up blocks but {len(down)} down blocks")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.online_hadamard = online_hadamard
        self._cache: dict = {}

    def groups(self, for_kernel: bool) -> tuple:
        """(gate_up, down): ``ExpertGroup``s for the kernel, or lists of ``PackedWeight`` for the reference.

        Built once per storage placement (rebuilt after ``model.to``).
        """
        key = (for_kernel, _groups_key(self.gate_up), _groups_key(self.down))
        if key not in self._cache:
            self._cache.clear()
            gu = [b.packed(for_kernel) for b in self.gate_up]
            dn = [b.packed(for_kernel) for b in self.down]
            self._cache[key] = (ExpertGroup(gu), ExpertGroup(dn)) if for_kernel else (gu, dn)
        return self._cache[key]

    @property
    def schemes(self) -> list:
        """(gate_up scheme, down scheme) per expert."""
        return [(g.scheme, d.scheme) for g, d in zip(self.gate_up, self.down)]


def _reference_experts(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: list, down: list, act
) -> torch.Tensor:
    """``moe_experts_forward`` with ``reference_group_gemm`` in place of the kernel; hidden [T, H] -> [T, H]."""
    k = top_k_index.shape[1]
    order, offsets = route(top_k_index, len(gate_up))  # [T*k], [E+1]
    token = order // k  # [T*k] token of each sorted row
    h = reference_group_gemm(hidden[token], offsets, gate_up)  # [T*k, 2I] float32
    o = reference_group_gemm(act(h), offsets, down)  # [T*k, H] float32
    w = top_k_weights.reshape(-1)[order].float()  # [T*k]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, token, o * w[:, None]).to(hidden.dtype)


def packed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function ``mxmoe_packed``: the module's ``mxmoe_packed`` experts.

    hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]; returns [T, H].
    """
    p: PackedExperts = self.mxmoe_packed

    def act(h: torch.Tensor) -> torch.Tensor:  # [S, 2I] -> [S, I], rotated for down when quantized that way
        a = self._apply_gate(h)
        return apply_online_hadamard(a) if p.online_hadamard else a

    if uses_kernel(hidden_states.device):
        return moe_experts_forward(hidden_states, top_k_index, top_k_weights, *p.groups(True), act=act)
    return _reference_experts(hidden_states, top_k_index, top_k_weights, *p.groups(False), act=act)


def register() -> str:
    """Register ``mxmoe_packed`` with transformers (idempotent); returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, packed_experts_forward)
    return IMPLEMENTATION


class QuantLinear(nn.Module):
    """A linear layer (shared expert or per-expert MLP) whose weight is one packed block.

    Same two paths as the routed experts: ``group_gemm`` with one expert where the kernel runs,
    ``reference_group_gemm`` otherwise. ``online_hadamard`` rotates the input first.
    """

    def __init__(self, block: PackedBlock, bias: "torch.Tensor | None" = None, online_hadamard: bool = False):
        super().__init__()
        self.block = block
        self.in_features, self.out_features = block.k, block.n
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.online_hadamard = online_hadamard
        self._cache: dict = {}

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor [N, K]: the shape of the packed weight, for code that reads ``Linear.weight.shape``."""
        return torch.empty(self.out_features, self.in_features, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, K]
        if self.online_hadamard:
            x2 = apply_online_hadamard(x2)
        offsets = torch.tensor([0, x2.shape[0]], dtype=torch.int32, device=x.device)  # one expert
        kernel = uses_kernel(x.device)
        key = (kernel, self.block.data.data_ptr())
        if key not in self._cache:
            self._cache.clear()
            pw = self.block.packed(kernel)
            self._cache[key] = ExpertGroup([pw]) if kernel else [pw]
        y = (
            group_gemm(x2.contiguous(), offsets, self._cache[key])
            if kernel
            else reference_group_gemm(x2, offsets, self._cache[key]).to(x.dtype)
        )  # [T, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Shape, scheme and rotation, for ``print(model)``."""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.block.scheme}, hadamard={self.online_hadamard}"


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by every packed expert block of a loaded model."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, PackedBlock))
