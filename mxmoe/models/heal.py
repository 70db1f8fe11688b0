"""Healing a carved MoE by knowledge distillation, in masked-dense form, and storing the result small.

The student is the dense model with every carved FFN replaced by :class:`MaskedMoE`: the full
1536-wide SwiGLU FFN whose neuron activations are multiplied by a per-neuron gain expanded from the
top-k router weights (routed neurons: the weight of their expert times its output scale; shared
neurons: the shared-expert gate). That is exactly the Qwen2-MoE block's function, as three dense
GEMMs instead of one tiny GEMM per expert. Trainable: the routers, the per-expert scales and rank-r
corrections ``B @ A`` of the three FFN matrices (merged into the experts' slices at build time).

:func:`heal` runs two phases, seeded:

1. routers (and scales) alone, per layer, against the dense FFN's output on the dense model's FFN
   inputs (relative squared error);
2. end to end: forward KL from the dense teacher's next-token distribution to the student's, over
   routers, scales and the low-rank corrections, with an optional Switch-style load-balance loss.

:func:`save_heal` writes the trained tensors as fp16 safetensors shards (each ≤ 5 MB, ≤ 20 MB in all)
plus ``heal.json`` (structure, sha256 of every shard, training facts); :func:`load_heal` checks the
hashes; :func:`apply_heal` turns them back into carvings and merged FFN weights for ``moefy.assemble``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mxmoe.errors import MxMoEError
from mxmoe.models.moefy import LayerSplit

SHARD_BYTES, TOTAL_BYTES = 5_000_000, 20_000_000  # storage limits of the healed files
HEAL_JSON = "heal.json"


class MaskedMoE(nn.Module):
    """A carved SwiGLU FFN as one masked dense FFN: exactly ``moefy.sparse_block``'s Qwen2-MoE function.

    y = ((silu(x Wg'ᵀ) · (x Wu'ᵀ)) · gain(x)) Wd'ᵀ with W' = W + B A (rank ``rank``; B starts at 0) and
    gain[t, n] = w[t, e(n)] · scale[e(n)] for a neuron n of routed expert e(n) (w: softmax top-k weights,
    renormalised, 0 for unselected experts) and 2·sigmoid(x·g_shared) for shared neurons.
    """

    def __init__(self, mlp: nn.Module, split: LayerSplit, top_k: int, rank: int = 0, norm_topk: bool = True):
        super().__init__()
        wg, wu, wd = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        inter, hidden = wg.shape
        num_experts = split.experts.shape[0]
        expert_of = torch.full((inter,), -1, dtype=torch.long)
        expert_of[split.experts.flatten()] = torch.arange(num_experts).repeat_interleave(split.experts.shape[1])
        expert_of[split.shared] = num_experts  # the shared expert's gain column
        seen = torch.bincount(torch.cat([split.shared, split.experts.flatten()]), minlength=inter)
        if split.router.shape != (num_experts, hidden) or (seen != 1).any():
            raise ValueError(
                "the split must partition the FFN's neurons (each once, shared or one expert) and its "
                f"router must be [{num_experts}, {hidden}]"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and {num_experts}")
        self.top_k, self.num_experts, self.rank, self.norm_topk = top_k, num_experts, rank, norm_topk
        for name, w in (("wg", wg), ("wu", wu), ("wd", wd)):
            self.register_buffer(name, w.clone())
        self.register_buffer("expert_of", expert_of)  # [I]
        self.register_buffer("experts", split.experts.clone())  # [E, w]
        self.register_buffer("shared", split.shared.clone())  # [S]
        self.register_buffer("shared_gate", torch.zeros(1, hidden, dtype=wg.dtype))  # 2·sigmoid(0) = 1
        self.router = nn.Parameter(split.router.detach().clone().to(wg.dtype))  # [E, H]
        self.scale = nn.Parameter(split.scale.detach().clone().to(wg.dtype))  # [E]
        if rank > 0:  # B = 0: the corrections start as nothing
            self.gate_a = nn.Parameter(torch.randn(rank, hidden, dtype=wg.dtype) / math.sqrt(hidden))  # [r, H]
            self.gate_b = nn.Parameter(torch.zeros(inter, rank, dtype=wg.dtype))  # [I, r]
            self.up_a = nn.Parameter(torch.randn(rank, hidden, dtype=wg.dtype) / math.sqrt(hidden))
            self.up_b = nn.Parameter(torch.zeros(inter, rank, dtype=wg.dtype))
            self.down_a = nn.Parameter(torch.randn(rank, inter, dtype=wg.dtype) / math.sqrt(inter))  # [r, I]
            self.down_b = nn.Parameter(torch.zeros(hidden, rank, dtype=wg.dtype))  # [H, r]
        self.to(wg.device)  # the carving may come from the CPU, the weights from a GPU
        self.last_probs: torch.Tensor | None = None  # [T, E] router softmax of the last forward
        self.last_top: torch.Tensor | None = None  # [T, k] selected experts of the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Qwen2-MoE routing of tokens x [T, H]: softmax probs [T, E] (fp32), top-k ids [T, k], gates [T, E]."""
        probs = F.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float32)  # [T, E]
        top_i = torch.topk(probs, self.top_k, dim=-1).indices  # [T, k]
        return probs, top_i, self.gates(probs, top_i).to(x.dtype)

    def gates(self, probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Gate weights [T, E] of the experts ``top`` [T, k]: their probabilities ``probs`` [T, E], renormalised over
        the k (``norm_topk``), 0 for the others."""
        v = probs.gather(1, top)  # [T, k]
        if self.norm_topk:
            v = v / v.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(1, top, v)

    def gain(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Per-neuron gain [T, I] of tokens x [T, H] under ``gates`` [T, E]: a routed neuron's expert gate times
        that expert's scale, a shared neuron's shared-expert gate 2·sigmoid(x·g_shared)."""
        shared_gain = 2.0 * torch.sigmoid(F.linear(x, self.shared_gate))  # [T, 1]
        return torch.cat([gates * self.scale, shared_gain], dim=1)[:, self.expert_of]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        probs, top_i, gates = self.route(x)
        self.last_probs, self.last_top = probs, top_i
        gain = self.gain(x, gates)  # [T, I]
        g, u = F.linear(x, self.wg), F.linear(x, self.wu)  # [T, I]
        if self.rank:
            g = g + F.linear(F.linear(x, self.gate_a), self.gate_b)
            u = u + F.linear(F.linear(x, self.up_a), self.up_b)
        a = F.silu(g) * u * gain  # [T, I]
        y = F.linear(a, self.wd)  # [T, H]
        if self.rank:
            y = y + F.linear(F.linear(a, self.down_a), self.down_b)
        return y.reshape(shape)

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The corrected FFN matrices Wg' [I, H], Wu' [I, H], Wd' [H, I] (fp32)."""
        wg, wu, wd = self.wg.float(), self.wu.float(), self.wd.float()
        if self.rank:
            wg = wg + self.gate_b.float() @ self.gate_a.float()
            wu = wu + self.up_b.float() @ self.up_a.float()
            wd = wd + self.down_b.float() @ self.down_a.float()
        return wg, wu, wd

    def split(self) -> LayerSplit:
        """The carving with the current router and scales."""
        return LayerSplit(
            self.shared.clone(),
            self.experts.clone(),
            self.router.detach().float().clone(),
            self.scale.detach().float().clone(),
        )


def masked_student(dense: nn.Module, splits: dict[int, LayerSplit], top_k: int, rank: int) -> nn.Module:
    """A copy of the dense causal LM whose FFNs in ``splits`` are :class:`MaskedMoE`; only routers,
    scales and low-rank corrections train (everything else frozen)."""
    student = copy.deepcopy(dense)
    for p in student.parameters():
        p.requires_grad_(False)
    for i, sp in splits.items():
        student.model.layers[i].mlp = MaskedMoE(dense.model.layers[i].mlp, sp, top_k, rank)
    return student


def moe_layers(student: nn.Module) -> dict[int, MaskedMoE]:
    """The student's masked MoE FFNs by layer index."""
    return {i: layer.mlp for i, layer in enumerate(student.model.layers) if isinstance(layer.mlp, MaskedMoE)}


def load_balance_loss(probs: torch.Tensor, top: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balance loss E · Σ_e f_e · P_e (1 when uniform): f_e the share of routed slots
    going to expert e (no gradient), P_e the mean router probability. probs: [T, E], top: [T, k]."""
    frac = torch.bincount(top.flatten(), minlength=num_experts).float() / top.numel()  # [E]
    return num_experts * (frac * probs.mean(0)).sum()


def skew(counts: torch.Tensor) -> float:
    """max/min tokens per expert (inf when an expert gets none). counts: [E]."""
    lo = counts.min().item()
    return float("inf") if lo == 0 else counts.max().item() / lo


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student) (forward KL); logits [..., V]."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclass(frozen=True)
class HealConfig:
    """Hyper-parameters of :func:`heal` (all of them shape the result)."""

    rank: int = 32  # rank of the FFN weight corrections (0: routers and scales only)
    router_steps: int = 300
    router_tokens: int = 1024  # tokens per layer per router step
    router_lr: float = 1e-3  # relative: Adam's step is this times the RMS of the layer's initial router weights
    e2e_steps: int = 1200
    batch_windows: int = 8
    seqlen: int = 512
    lr: float = 1e-3  # low-rank corrections
    e2e_router_lr: float = 1e-3  # relative, as router_lr
    balance_coef: float = 0.0  # weight of the load-balance loss (0: off)
    warmup: int = 50
    calib_windows: int = 2048  # Gutenberg + WikiText-2 train windows cycled through
    seed: int = 0


@dataclass
class HealReport:
    """What healing did: losses, skew, times (JSON-able via ``asdict``)."""

    router_loss: list = field(default_factory=list)  # (step, mean relative FFN error²) samples
    kl: list = field(default_factory=list)  # (step, KL) samples
    balance: list = field(default_factory=list)  # (step, balance loss) samples
    skew_per_layer: dict = field(default_factory=dict)
    seconds_router: float = 0.0
    seconds_e2e: float = 0.0
    step_seconds_e2e: float = 0.0
    e2e_steps_done: int = 0  # fewer than HealConfig.e2e_steps only when a deadline cut the phase short


def _collect_layer_io(
    dense: nn.Module, windows: torch.Tensor, layers: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Dense FFN inputs and outputs [T, H] of ``layers`` over ``windows`` [n, L]."""
    store = {i: ([], []) for i in layers}

    def hook(i):
        def f(module, args, out):
            store[i][0].append(args[0].reshape(-1, args[0].shape[-1]).detach())
            store[i][1].append(out.reshape(-1, out.shape[-1]).detach())

        return f

    hooks = [dense.model.layers[i].mlp.register_forward_hook(hook(i)) for i in layers]
    device = next(dense.parameters()).device
    try:
        with torch.no_grad():
            for w in windows:
                dense.model(w[None].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat(a), torch.cat(b)) for i, (a, b) in store.items()}


def train_routers(
    student: nn.Module,
    dense: nn.Module,
    windows: torch.Tensor,
    cfg: HealConfig,
    report: HealReport,
    gen: torch.Generator,
) -> None:
    """Phase 1: each layer's router and scales against its dense FFN output on dense FFN inputs."""
    blocks = moe_layers(student)
    io = _collect_layer_io(dense, windows, list(blocks))
    opt = torch.optim.Adam(router_groups(blocks, cfg.router_lr))
    start = time.time()
    for step in tqdm(range(cfg.router_steps), desc="heal: routers", unit="step"):
        loss = 0.0
        for i, b in blocks.items():
            x, t = io[i]
            pick = torch.randint(0, x.shape[0], (min(cfg.router_tokens, x.shape[0]),), generator=gen).to(x.device)
            loss = loss + (b(x[pick]) - t[pick]).pow(2).sum() / t[pick].pow(2).sum()
        loss = loss / len(blocks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.router_steps - 1:
            report.router_loss.append((step, loss.item()))
    report.seconds_router = time.time() - start


def router_groups(blocks: dict[int, MaskedMoE], rel_lr: float) -> list[dict]:
    """Optimizer groups for the routers and scales: each layer's router steps by ``rel_lr`` times the RMS of its
    weights (carved routers are tiny, scaled to a small logit spread, so one absolute rate cannot fit them all),
    each layer's scales by ``rel_lr`` times their RMS."""
    groups = []
    for b in blocks.values():
        for p in (b.router, b.scale):
            groups.append({"params": [p], "lr": rel_lr * p.detach().float().pow(2).mean().sqrt().item()})
    return groups


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_end_to_end(
    student: nn.Module,
    dense: nn.Module,
    windows: torch.Tensor,
    cfg: HealConfig,
    report: HealReport,
    gen: torch.Generator,
    deadline: float | None = None,
) -> None:
    """Phase 2: forward KL to the dense teacher over routers, scales and low-rank corrections; stops early
    (``report.e2e_steps_done`` says where) once ``time.time()`` passes ``deadline``."""
    blocks = moe_layers(student)
    routers = [p for b in blocks.values() for p in (b.router, b.scale)]
    lora = [p for b in blocks.values() for n, p in b.named_parameters() if n.endswith(("_a", "_b"))]
    groups = router_groups(blocks, cfg.e2e_router_lr) + ([{"params": lora, "lr": cfg.lr}] if lora else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    device = next(student.parameters()).device
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    order = torch.randperm(windows.shape[0], generator=gen)
    start = time.time()
    for step in tqdm(range(cfg.e2e_steps), desc="heal: end to end (KL)", unit="step"):
        if deadline is not None and time.time() > deadline:
            tqdm.write(f"heal: deadline reached after {step} of {cfg.e2e_steps} end-to-end steps")
            break
        idx = order[(torch.arange(cfg.batch_windows) + step * cfg.batch_windows) % windows.shape[0]]
        batch = windows[idx].to(device)  # [b, L]
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * _lr_factor(step, cfg.e2e_steps, cfg.warmup)
        with amp:
            with torch.no_grad():
                teacher = dense(batch, use_cache=False).logits
            kl = kl_to_teacher(student(batch, use_cache=False).logits, teacher)
            bal = sum(load_balance_loss(b.last_probs, b.last_top, b.num_experts) for b in blocks.values()) / len(blocks)
            loss = kl + cfg.balance_coef * bal if cfg.balance_coef else kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(routers + lora, 1.0)
        opt.step()
        if step % 10 == 0 or step == cfg.e2e_steps - 1:
            report.kl.append((step, kl.item()))
            report.balance.append((step, float(bal.detach()) if torch.is_tensor(bal) else float(bal)))
        report.e2e_steps_done = step + 1
    report.seconds_e2e = time.time() - start
    report.step_seconds_e2e = report.seconds_e2e / max(1, report.e2e_steps_done)


def round_to_fp16(student: nn.Module) -> None:
    """Round every trained tensor to fp16 and back, so the student is exactly what the files store."""
    with torch.no_grad():
        for b in moe_layers(student).values():
            for p in b.parameters():
                p.copy_(p.half().to(p.dtype))


@torch.no_grad()
def routing_headroom(block: MaskedMoE, x: torch.Tensor, y: torch.Tensor) -> dict:
    """How much of a carved FFN's error is its router's choice of experts. x [T, H]: FFN inputs; y [T, H]: the dense
    FFN's outputs on them. Returns the relative squared error ||ŷ − y||² / ||y||² of the block as routed
    ("router") and with each token's top-k experts of largest output norm instead ("oracle": what no router sees,
    with the same gate weights renormalised over that set), and the share of the router's experts that are the
    oracle's ("overlap")."""
    wg, wu, wd = block.merged()  # [I, H], [I, H], [H, I]
    a = F.silu(x.float() @ wg.T) * (x.float() @ wu.T)  # [T, I]
    norms = torch.stack([(a[:, n] @ wd[:, n].T).norm(dim=-1) for n in block.experts], 1) * block.scale.abs()  # [T, E]
    probs, routed, _ = block.route(x)  # probs [T, E] fp32, routed [T, k]
    oracle = norms.topk(block.top_k, dim=-1).indices  # [T, k]

    def error(top: torch.Tensor) -> float:
        out = (a * block.gain(x, block.gates(probs, top).to(x.dtype)).float()) @ wd.T  # [T, H]
        return ((out - y.float()).pow(2).sum() / y.float().pow(2).sum()).item()

    chosen = torch.zeros_like(probs).scatter(1, routed, 1.0) * torch.zeros_like(probs).scatter(1, oracle, 1.0)
    return {"router": error(routed), "oracle": error(oracle), "overlap": chosen.sum(-1).mean().item() / block.top_k}


@torch.no_grad()
def routing_skew(student: nn.Module, windows: torch.Tensor) -> dict[int, float]:
    """max/min tokens per expert per MoE layer of the student over ``windows`` [n, L]."""
    blocks = moe_layers(student)
    counts = {i: torch.zeros(b.num_experts) for i, b in blocks.items()}
    device = next(student.parameters()).device
    for w in windows:
        student(w[None].to(device), use_cache=False)
        for i, b in blocks.items():
            counts[i] += torch.bincount(b.last_top.flatten().cpu(), minlength=b.num_experts).float()
    return {i: skew(c) for i, c in counts.items()}


def heal(
    dense: nn.Module,
    splits: dict[int, LayerSplit],
    top_k: int,
    windows: torch.Tensor,
    cfg: HealConfig,
    skew_windows: torch.Tensor | None = None,
    deadline: float | None = None,
) -> tuple[nn.Module, HealReport]:
    """Distil the carved MoE (``splits`` of the dense causal LM ``dense``) towards ``dense``; seeded.

    windows: [n, L] training token windows (calibration text only). ``deadline`` (a ``time.time()``
    value) cuts the end-to-end phase short, so a run on a machine with a time limit still returns a
    model. Returns the fp16-rounded student (what :func:`save_heal` stores) and the report.
    """
    if cfg.router_steps < 0 or cfg.e2e_steps < 0 or cfg.rank < 0:
        raise ValueError("steps and rank must be >= 0")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dense = dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    student = masked_student(dense, splits, top_k, cfg.rank).to(next(dense.parameters()).device)
    report = HealReport()
    if cfg.router_steps:
        io_windows = windows[: max(1, min(windows.shape[0], 16384 // windows.shape[1]))]  # ≤ 16k tokens per layer
        train_routers(student, dense, io_windows, cfg, report, gen)
    if cfg.e2e_steps:
        train_end_to_end(student, dense, windows, cfg, report, gen, deadline)
    round_to_fp16(student)
    student.eval()
    if skew_windows is not None:
        report.skew_per_layer = routing_skew(student, skew_windows)
    return student, report


# ---------------------------------------------------------------- storage


def heal_tensors(student: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors to store, by name: fp16 routers, scales, corrections; int16 carvings."""
    out = {}
    for i, b in moe_layers(student).items():
        out[f"layers.{i}.experts"] = b.experts.to(torch.int16)  # [E, w]
        out[f"layers.{i}.shared"] = b.shared.to(torch.int16)  # [S]
        for name, p in b.named_parameters():
            out[f"layers.{i}.{name}"] = p.detach().half().contiguous()
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_heal(student: nn.Module, folder: Path, meta: dict) -> dict:
    """Write the student's trained tensors into ``folder`` as safetensors shards (each ≤ 5 MB, ≤ 20 MB
    in all) and ``heal.json`` (``meta`` + shard sha256s); returns the heal.json content."""
    from safetensors.torch import save_file

    tensors = heal_tensors(student)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total > TOTAL_BYTES:
        raise MxMoEError(
            f"healed tensors take {total / 1e6:.1f} MB, over the {TOTAL_BYTES / 1e6:.0f} MB limit: lower the rank"
        )
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        by_layer.setdefault(int(name.split(".")[1]), {})[name] = t
    shards, cur, size = [], {}, 0
    for layer in sorted(by_layer):
        lsize = sum(t.numel() * t.element_size() for t in by_layer[layer].values())
        if lsize > SHARD_BYTES - 100_000:
            raise MxMoEError(
                f"layer {layer}'s healed tensors take {lsize / 1e6:.1f} MB, over one shard: lower the rank"
            )
        if cur and size + lsize > SHARD_BYTES - 100_000:  # headroom for the safetensors header
            shards.append(cur)
            cur, size = {}, 0
        cur.update(by_layer[layer])
        size += lsize
    if cur:
        shards.append(cur)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("heal-*.safetensors"):
        old.unlink()
    files = {}
    for n, shard in enumerate(shards):
        path = folder / f"heal-{n:02d}.safetensors"
        save_file(shard, str(path))
        if path.stat().st_size > SHARD_BYTES:
            raise MxMoEError(f"{path.name} is {path.stat().st_size} bytes, over {SHARD_BYTES}")
        files[path.name] = _sha256(path)
    doc = {**meta, "files": files, "bytes": sum((folder / f).stat().st_size for f in files)}
    (folder / HEAL_JSON).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def heal_files_present(folder: Path) -> bool:
    """True when ``folder`` holds a heal.json (the shards are checked by :func:`load_heal`)."""
    return (Path(folder) / HEAL_JSON).exists()


def load_heal(folder: Path) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """heal.json and the stored tensors per layer ({layer: {name: tensor}}), after checking every sha256."""
    from safetensors.torch import load_file

    folder = Path(folder)
    doc = json.loads((folder / HEAL_JSON).read_text())
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, digest in doc["files"].items():
        path = folder / name
        if not path.exists():
            raise MxMoEError(
                f"{path} is listed in {HEAL_JSON} but missing: restore it from git or rerun `mxmoe model heal`"
            )
        if _sha256(path) != digest:
            raise MxMoEError(
                f"{path} does not match its sha256 in {HEAL_JSON}: restore it from git or rerun `mxmoe model heal`"
            )
        for key, t in load_file(str(path)).items():
            _, layer, field_ = key.split(".", 2)
            layers.setdefault(int(layer), {})[field_] = t
    return doc, layers


@torch.no_grad()
def stored_block(mlp: nn.Module, tensors: dict[str, torch.Tensor], top_k: int) -> MaskedMoE:
    """The healed :class:`MaskedMoE` of one dense FFN ``mlp`` from its stored tensors (``load_heal``'s per layer)."""
    t = tensors
    split = LayerSplit(t["shared"].long(), t["experts"].long(), t["router"].float(), t["scale"].float())
    block = MaskedMoE(mlp, split, top_k, t["gate_a"].shape[0] if "gate_a" in t else 0)
    for name, p in block.named_parameters():
        p.copy_(t[name].to(p.dtype))
    return block


@torch.no_grad()
def apply_heal(dense: nn.Module, layers: dict[int, dict[str, torch.Tensor]], top_k: int) -> dict[int, LayerSplit]:
    """Merge stored heal tensors into ``dense``'s FFN weights (in place) and return the carvings.

    The merge goes through :class:`MaskedMoE` itself, so build and heal share one definition.
    """
    splits = {}
    for i, t in sorted(layers.items()):
        mlp = dense.model.layers[i].mlp
        block = stored_block(mlp, t, top_k)
        wg, wu, wd = block.merged()
        mlp.gate_proj.weight.copy_(wg)
        mlp.up_proj.weight.copy_(wu)
        mlp.down_proj.weight.copy_(wd)
        splits[i] = block.split()
    return splits


def config_dict(cfg) -> dict:
    """A dataclass config as a plain dict (for heal.json)."""
    return asdict(cfg)
