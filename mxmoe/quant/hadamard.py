"""Random Hadamard rotations (QuaRot-style) for widths n = 2^a · m.

A Hadamard matrix of order ``n`` is built as ``kron(H_m, H_{2^a})``: ``H_{2^a}`` by Sylvester's
construction and ``H_m`` by Paley's constructions over the finite field GF(q), q a prime power:

* Paley I, ``m = q + 1`` with ``q ≡ 3 (mod 4)`` (m = 4, 8, 12, 20, 24, 28, 32, 44, 48, 60, ...);
* Paley II, ``m = 2(q + 1)`` with ``q ≡ 1 (mod 4)`` (m = 12, 20, 28, 36, 52, 60, 76, ...).

Nothing is pasted from tables: every order used is checked by ``H Hᵀ = n I`` in the tests.
Examples: 576 = 36·16, 1408 = 44·32, 2560 = 20·128, 3584 = 28·128, 14336 = 28·512.
A width with no construction (e.g. 156 = 12·13) falls back to a seeded random orthogonal
matrix with a warning. The rotation ``Q = H·diag(±1)/√n`` is saved with its seed so that
quantization and evaluation use the same matrix; ``rotate_model`` applies it to a whole MoE
decoder (RMSNorm scales fused, function unchanged in full precision).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path

import torch
from torch import nn


def _prime_power(q: int) -> "tuple[int, int] | None":
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` modulo monic ``f`` over GF(p); coefficients low to high."""
    a = list(a)
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i] % p
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return [c % p for c in a[:d]] + [0] * max(0, d - len(a))


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p) (no monic factor of degree ≤ k/2)."""
    for low in product(range(p), repeat=k):
        f = list(low) + [1]
        if all(any(_poly_mod(f, list(g) + [1], p)) for d in range(1, k // 2 + 1) for g in product(range(p), repeat=d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[a, b] = χ(a - b)`` of GF(q), χ the quadratic character; [q, q]."""
    p, k = _prime_power(q)
    f = _irreducible(p, k)
    digits = torch.tensor(list(product(range(p), repeat=k)))  # [q, k]: element e has digits e[k-1..0]
    digits = digits.flip(1)  # low coefficient first, element index = Σ d_i p^i
    weights = p ** torch.arange(k)  # [k]
    squares = set()
    for d in digits.tolist():
        sq = [0] * (2 * k - 1)
        for i, a in enumerate(d):
            for j, b in enumerate(d):
                sq[i + j] += a * b
        squares.add(sum(c * p**i for i, c in enumerate(_poly_mod(sq, f, p))))
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[sorted(squares)] = 1
    chi[0] = 0
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, k]
    return chi[(diff * weights).sum(-1)]


def _paley_kind(m: int) -> "int | None":
    """1 or 2 when Paley I or II builds order m (tried in that order), else None."""
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


def _paley(m: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of order m by Paley I or II, int64 [m, m]; m must have a kind."""
    kind = _paley_kind(m)
    if kind == 1:
        Q = _jacobsthal(m - 1)  # antisymmetric
        S = torch.zeros(m, m, dtype=torch.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
        return S + torch.eye(m, dtype=torch.int64)
    if kind == 2:
        q = m // 2 - 1
        Q = _jacobsthal(q)  # symmetric
        C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
        one = torch.tensor([[1, 1], [1, -1]])  # replaces ±1 entries of C
        zero = torch.tensor([[1, -1], [-1, -1]])  # replaces its 0 diagonal
        return torch.kron(C, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)
    raise ValueError(f"no Paley construction for order {m}")


def hadamard_factors(n: int) -> "tuple[int, int] | None":
    """``(m, 2^a)`` with ``n = m · 2^a`` and a Paley-constructible ``m`` (or m = 1); None if none."""
    if n < 1:
        raise ValueError(f"matrix order must be positive, got {n}")
    a = (n & -n).bit_length() - 1  # largest power of two dividing n
    for b in range(a, -1, -1):
        m = n >> b
        if m == 1 or _paley_kind(m) is not None:
            return m, 1 << b
    return None


@lru_cache(maxsize=32)
def _base(m: int) -> torch.Tensor:
    return torch.ones(1, 1, dtype=torch.int64) if m == 1 else _paley(m)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1, 1], [1, -1]]), h)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix ``kron(H_m, H_{2^a})`` of order n as float64 [n, n] (H Hᵀ = n I).

    Raises ValueError when n has no construction here (see ``hadamard_factors``).
    """
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(
            f"no Hadamard construction for order {n} (need n = m·2^a with m-1 ≡ 3 mod 4 or m/2-1 ≡ 1 mod 4 "
            "a prime power); use random_hadamard_matrix, which falls back to a random orthogonal matrix"
        )
    m, p2 = f
    return torch.kron(_base(m), _sylvester(p2)).double()


def random_orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix, float64 [n, n] (QR with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_hadamard_matrix(n: int, seed: int) -> torch.Tensor:
    """Orthogonal ``H·diag(s)/√n`` with seeded random signs s ∈ {±1}ⁿ, float64 [n, n].

    Falls back, with a warning, to ``random_orthogonal_matrix(n, seed)`` when no Hadamard
    construction of order n exists here.
    """
    if hadamard_factors(n) is None:
        warnings.warn(
            f"no Hadamard matrix of order {n} can be built here; using a seeded random orthogonal matrix instead",
            stacklevel=2,
        )
        return random_orthogonal_matrix(n, seed)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).double() * 2 - 1  # [n]
    return hadamard_matrix(n) * signs[None, :] / math.sqrt(n)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) along the last axis, a power of two."""
    shape, n = x.shape, x.shape[-1]
    h = 1
    while h < n:
        x = x.reshape(-1, n // (2 * h), 2, h)  # [R, blocks, 2, h]
        x = torch.stack((x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]), dim=2)
        h *= 2
    return x.reshape(shape)


def apply_online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ hadamard_matrix(K) / √K`` for ``x[..., K]``, without forming the K×K matrix.

    The 2^a factor runs as a fast Walsh–Hadamard transform, the m factor as a [m, m] matrix
    product. Computes in float32 (float64 stays float64) and returns x's dtype. This is the
    online rotation of the down_proj input; rotate the weight with ``W @ hadamard_matrix(K) / √K``.
    """
    k = x.shape[-1]
    f = hadamard_factors(k)
    if f is None:
        raise ValueError(f"no Hadamard construction for width {k}; an online rotation needs one (see hadamard_factors)")
    m, p2 = f
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = _fwht(x.to(work).reshape(*x.shape[:-1], m, p2))  # [..., m, p2]
    if m > 1:
        xs = torch.einsum("...ij,ik->...kj", xs, _base(m).to(x.device, work))
    return (xs / math.sqrt(k)).reshape(x.shape).to(x.dtype)


@dataclass
class Rotation:
    """An orthogonal rotation with the seed that made it; ``kind`` is 'hadamard' or 'orthogonal'."""

    matrix: torch.Tensor  # [n, n] float64
    seed: int
    kind: str

    @staticmethod
    def kind_for(n: int) -> str:
        """The kind ``Rotation.random(n, ...)`` makes: 'hadamard' when a Hadamard matrix of order n exists."""
        return "hadamard" if hadamard_factors(n) is not None else "orthogonal"

    @classmethod
    def random(cls, n: int, seed: int) -> "Rotation":
        """``random_hadamard_matrix(n, seed)`` with its seed (random orthogonal when no Hadamard exists)."""
        return cls(random_hadamard_matrix(n, seed), seed, cls.kind_for(n))

    def save(self, path: "str | os.PathLike") -> None:
        """Write to ``path`` atomically (a temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"matrix": self.matrix.cpu(), "seed": self.seed, "kind": self.kind}, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "Rotation":
        """Read a rotation written by ``save``; raises FileNotFoundError/ValueError on a bad file."""
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or set(data) != {"matrix", "seed", "kind"}:
            raise ValueError(f"{path} is not a saved mxmoe Rotation (expected keys matrix, seed, kind)")
        return cls(data["matrix"], int(data["seed"]), str(data["kind"]))


# ---- rotating a whole decoder (QuaRot's residual-stream rotation) -------------------------------

_ATTN_READERS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
_MLP_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def _norm_scale(norm: nn.Module, where: str) -> torch.Tensor:
    """The RMSNorm weight γ [H] (float64); resets it to 1 since it is fused into the readers."""
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None:
        raise ValueError(f"{where}: expected an RMSNorm with a weight and no bias, got {type(norm).__name__}")
    gamma = w.detach().double().clone()
    with torch.no_grad():
        w.fill_(1.0)
    return gamma


@torch.no_grad()
def _read(w: torch.Tensor, gamma: torch.Tensor, Q: torch.Tensor) -> None:
    """In place ``W ← W·diag(γ)·Q`` for a weight [out, H] that reads the normed residual."""
    w.copy_((w.double() * gamma[None, :]) @ Q)


@torch.no_grad()
def _write(w: torch.Tensor, Q: torch.Tensor, bias: "torch.Tensor | None" = None) -> None:
    """In place ``W ← Qᵀ·W`` (and ``b ← Qᵀ b``) for a weight [H, in] that writes to the residual."""
    w.copy_(Q.T @ w.double())
    if bias is not None:
        bias.copy_(Q.T @ bias.double())


def _linear(parent: nn.Module, names: tuple, where: str) -> nn.Linear:
    for name in names:
        if isinstance(getattr(parent, name, None), nn.Linear):
            return getattr(parent, name)
    raise ValueError(f"{where}: {type(parent).__name__} has none of the linears {names}; rotate_model cannot handle it")


def _rotate_dense_mlp(mlp: nn.Module, gamma: torch.Tensor, Q: torch.Tensor, where: str) -> None:
    for block in ("gate", "up"):
        _read(_linear(mlp, _MLP_NAMES[block], where).weight, gamma, Q)
    down = _linear(mlp, _MLP_NAMES["down"], where)
    _write(down.weight, Q, down.bias)


def _rotate_moe(block, gamma: torch.Tensor, Q: torch.Tensor) -> None:
    """Router, routed experts, shared experts and the shared-expert gate of one MoE block."""
    router_w = getattr(block.router, "weight", None)
    if router_w is None or router_w.shape[-1] != Q.shape[0]:
        raise ValueError(f"{block.name}: router {type(block.router).__name__} has no [E, H] weight to rotate")
    _read(router_w, gamma, Q)
    for e in range(block.num_experts):
        for b in ("gate", "up"):
            w = block.expert_weight(e, b).detach().double()  # [I, H]
            block.set_expert_weight(e, b, (w * gamma[None, :]) @ Q)
        block.set_expert_weight(e, "down", Q.T @ block.expert_weight(e, "down").detach().double())  # [H, I]
    for mlp in block.shared:
        _rotate_dense_mlp(mlp, gamma, Q, f"{block.name} shared expert")
    if block.shared_gate is not None:
        _read(block.shared_gate.weight, gamma, Q)


def rotate_model(model: nn.Module, seed: int = 0, *, rotation: "Rotation | None" = None) -> Rotation:
    """Rotate the residual stream of a Llama-style MoE decoder by ``Q`` in place; returns the Rotation.

    RMSNorm scales are fused into the linears that read them (norm weights become 1), then the
    embeddings and every residual reader (attention q/k/v, routers, experts' gate/up, shared
    experts, lm_head) get ``W·Q`` and every writer (o_proj, experts' down) ``Qᵀ·W``, so the
    full-precision function is unchanged. ``rotation`` reuses a saved one; otherwise
    ``Rotation.random(hidden_size, seed)``. Tied embeddings are untied. Families: Qwen1.5/2-MoE,
    Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3 (and their dense MLP layers).
    """
    from mxmoe.models import moe_blocks  # models import the quant package, not the other way round

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if layers is None or head is None or embed is None or getattr(decoder, "norm", None) is None:
        raise ValueError(f"{type(model).__name__} is not a Llama-style decoder (model.layers, model.norm, lm_head)")
    n = embed.weight.shape[1]
    rotation = rotation if rotation is not None else Rotation.random(n, seed)
    if tuple(rotation.matrix.shape) != (n, n):
        raise ValueError(f"rotation is {tuple(rotation.matrix.shape)} but the hidden size is {n}")
    Q = rotation.matrix.to(embed.weight.device, torch.float64)  # [H, H]
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    blocks = {id(b.module): b for b in moe_blocks(model)}

    with torch.no_grad():
        embed.weight.copy_(embed.weight.double() @ Q)  # [V, H]
    for i, layer in enumerate(layers):
        where = f"layer {i}"
        Q = Q.to(layer.input_layernorm.weight.device)  # a model over several GPUs: Q where the layer is
        gamma = _norm_scale(layer.input_layernorm, where)
        attn = layer.self_attn
        readers = [getattr(attn, r) for r in _ATTN_READERS if isinstance(getattr(attn, r, None), nn.Linear)]
        if not readers:
            raise ValueError(f"{where}: attention {type(attn).__name__} has none of {_ATTN_READERS}")
        for lin in readers:
            _read(lin.weight, gamma, Q)
        o = _linear(attn, ("o_proj",), where)
        _write(o.weight, Q, o.bias)
        gamma = _norm_scale(layer.post_attention_layernorm, where)
        if id(layer.mlp) in blocks:
            _rotate_moe(blocks[id(layer.mlp)], gamma, Q)
        else:
            _rotate_dense_mlp(layer.mlp, gamma, Q, where)
    _read(head.weight, _norm_scale(decoder.norm, "final norm").to(head.weight.device), Q.to(head.weight.device))
    return rotation
