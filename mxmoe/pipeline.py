"""``mxmoe.quantize`` (this module's ``quantize``): MxMoE on a model of your own, in one call, from calibration text to a checkpoint.

Stages, each with a progress bar over MoE layers and its wall time in the result:

1. **calibration** — ``n`` windows of ``seqlen`` tokens from WikiText-2 *train*, C4 (the local
   validation documents, as GPTQ does) or a text FILE; never test or task data;
2. **sensitivity** — Δ of every (layer, expert, block, scheme), measured with the quantizer that
   will be used (rtn, gptq, gptq-had), cached per layer under ``<cache>/quantize/<weights sha>/``
   and resumed after a kill;
3. **routing** — tokens per expert on those windows (recorded by the sensitivity pass, so no extra
   forward), scaled to a ``batch_tokens`` batch;
4. **allocation** — the ILP (``mxmoe.allocate``) with the cost table of the GPU that will run the
   model (``gpu``; default the local GPU, else nvidia_h100), per layer or one budget for the model;
5. **quantization** — GPTQ (with the Hadamard rotation for gptq-had) or RTN in that allocation;
6. **save** — an mxmoe checkpoint (``mxmoe.checkpoint``) when ``out`` is given.

Candidate schemes come from the activation width: ``abits`` 16 the weight-only Hopper set, 8 the
8-bit-activation schemes, 5 the paper's W5A5 mix (w4a4 + w8a8), 4 the 4-bit-activation schemes.
Gate and up always share a scheme (the kernel runs them as one GEMM).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from mxmoe.allocate import (
    InfeasibleBudget,
    allocation_doc,
    layer_problem,
    model_dims,
    scheme_map,
    solve_layer,
    solve_model,
)
from mxmoe.baselines import average_bits
from mxmoe.checkpoint import check_capability, check_out_dir, save_checkpoint, weights_sha256
from mxmoe.data import calibration_windows, tokenize_text
from mxmoe.env import COST_TABLES, cache_dir
from mxmoe.errors import MxMoEError
from mxmoe.kernels.pack import check_kernel_scheme
from mxmoe.models.blocks import moe_blocks
from mxmoe.perfmodel import gpu_key, load_table
from mxmoe.profiles import random_windows
from mxmoe.quant.apply import apply_schemes, block_weight, blocks_by_layer
from mxmoe.quant.rtn import quantize_weight_int
from mxmoe.quant.sequential import quantize_model_gptq
from mxmoe.routing import batch_workload
from mxmoe.schemes import HOPPER_SCHEMES, SCHEME_SETS, scheme_set
from mxmoe.sensitivity import check_method_placement, compute_sensitivity

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parser reads this module's choices
    import torch

METHODS = ("gptq-had", "gptq", "rtn")
GRANULARITIES = ("block", "expert")
BUDGETS = ("layer", "model")
CALIB_SOURCES = ("wikitext2", "c4", "random")
ABITS = {
    16: SCHEME_SETS["weight_only"],
    8: tuple(s for s in HOPPER_SCHEMES if s.a_bits == 8),
    5: SCHEME_SETS["w5a5"],
    4: tuple(s for s in HOPPER_SCHEMES if s.a_bits == 4),
}
GPUS = ("nvidia_h100", "nvidia_h200")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a quantization (stored in mxmoe.json)."""

    wbits: float
    abits: int = 16
    r: float = 1.0
    method: str = "gptq-had"
    granularity: str = "block"
    budget: str = "layer"
    calib: str = "wikitext2"  # wikitext2 | c4 | random (tokenizer-less test models) | a text file
    calib_windows: int = 8
    seqlen: int = 512
    seed: int = 0
    gpu: "str | None" = None  # cost table; None: the local GPU, else nvidia_h100
    batch_tokens: int = 512
    schemes: "str | None" = None  # overrides the abits set: a set name or comma-separated schemes

    def candidates(self) -> tuple:
        """The candidate schemes of the allocation."""
        if self.schemes:
            try:
                return tuple(scheme_set(self.schemes))
            except ValueError as e:
                raise MxMoEError(str(e)) from None
        return ABITS[self.abits]


def target_gpu(gpu: "str | None") -> str:
    """The cost-table key: ``gpu`` if given, else the local CUDA GPU's, else nvidia_h100."""
    import torch

    if gpu:
        return gpu_key(gpu)
    return gpu_key(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "nvidia_h100"


def check_recipe(rec: Recipe) -> tuple:
    """Validate a recipe without touching a model; returns (candidate schemes, cost table).

    Raises MxMoEError with one line for: a bad number or choice, a calibration FILE that does not
    exist or is test/task data, schemes the kernel cannot run, a budget below the smallest
    achievable bits, a GPU without cost table.
    """
    import torch

    if rec.abits not in ABITS and not rec.schemes:
        raise MxMoEError(f"--abits must be one of {', '.join(map(str, ABITS))}, got {rec.abits}")
    if not 0.0 <= rec.r <= 1.0:
        raise MxMoEError(f"--r must be in [0, 1] (1: accuracy only, 0: speed only), got {rec.r}")
    for name, value, choices in (
        ("--method", rec.method, METHODS),
        ("--granularity", rec.granularity, GRANULARITIES),
        ("--budget", rec.budget, BUDGETS),
    ):
        if value not in choices:
            raise MxMoEError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    for name, value in (
        ("--calib-windows", rec.calib_windows),
        ("--seqlen", rec.seqlen),
        ("--batch-tokens", rec.batch_tokens),
    ):
        if not isinstance(value, int) or value <= 0:
            raise MxMoEError(f"{name} must be a positive integer, got {value}")
    if rec.calib not in CALIB_SOURCES:
        check_calib_file(rec.calib)
    schemes = rec.candidates()
    if not schemes:
        raise MxMoEError("no candidate schemes")
    for s in schemes:
        try:
            check_kernel_scheme(s)
        except ValueError as e:
            raise MxMoEError(f"{e}; the checkpoint must run in the kernel") from None
    bits = sorted(s.bits_per_weight for s in schemes)
    if not math.isfinite(rec.wbits) or rec.wbits < bits[0]:
        raise MxMoEError(
            f"no allocation meets --wbits {rec.wbits:g}: with these schemes the smallest achievable "
            f"is {bits[0]:g} bits per weight and the largest {bits[-1]:g}"
        )
    if torch.cuda.is_available() and rec.gpu is None:  # for this machine's GPU: it must run every candidate
        check_capability(schemes, torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))
    return schemes, load_table(target_gpu(rec.gpu))


def check_calib_file(path: str) -> Path:
    """A calibration text file: it must exist and must not be evaluation data (WikiText-2 test, task files)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MxMoEError(f"--calib {path!r} is neither {', '.join(CALIB_SOURCES)} nor an existing text file")
    if p.name.startswith("wiki.test") or p.suffix == ".jsonl" and p.parent.name == "tasks":
        raise MxMoEError(f"--calib {path}: refusing to calibrate on evaluation data (test split or task file)")
    return p


def calibration(rec: Recipe, tokenizer, vocab_size: int) -> "tuple[torch.Tensor, str]":
    """Calibration windows [n, seqlen] and their tag; a model without a tokenizer takes only ``random``."""
    import torch

    tag = (
        f"{rec.calib if rec.calib in CALIB_SOURCES else 'file-' + Path(rec.calib).name}-n{rec.calib_windows}"
        f"-s{rec.seqlen}-seed{rec.seed}"
    )
    if rec.calib == "random":
        return random_windows(vocab_size, rec.calib_windows, rec.seqlen, rec.seed), tag
    if tokenizer is None:
        raise MxMoEError("this model has no tokenizer (a random test model): use --calib random")
    if rec.calib in CALIB_SOURCES:
        try:
            return calibration_windows(tokenizer, rec.calib, rec.calib_windows, rec.seqlen, rec.seed), tag
        except ValueError as e:
            raise MxMoEError(f"--calib {rec.calib}: {e}") from None
    ids = tokenize_text(tokenizer, check_calib_file(rec.calib).read_text(encoding="utf-8", errors="replace"))
    if ids.numel() <= rec.seqlen:
        raise MxMoEError(f"--calib {rec.calib} has {ids.numel()} tokens, fewer than one window of {rec.seqlen}")
    gen = torch.Generator().manual_seed(rec.seed)
    starts = torch.randint(0, ids.numel() - rec.seqlen, (rec.calib_windows,), generator=gen)  # [n]
    return torch.stack([ids[s : s + rec.seqlen] for s in starts.tolist()]), tag  # [n, seqlen]


@dataclass
class QuantizeResult:
    """What ``quantize`` produced: the quantized model (in place), its allocation and integer weights, the manifest."""

    model: object
    scheme_map: dict
    int_weights: dict
    manifest: dict
    stage_seconds: dict = field(default_factory=dict)
    out: "Path | None" = None


def routing_from_sensitivity(sens: dict, blocks: list, batch_tokens: int, tag: str) -> dict:
    """The routing profile of the calibration windows, read off the sensitivity pass (no extra forward).

    ``layer_sensitivity`` records the tokens routed to every expert of a layer (routed experts
    first); those are exactly ``profile_routing``'s counts on the same windows. Returns the dict
    ``mxmoe.allocate.layer_problem`` takes as ``routing``.
    """
    import numpy as np

    counts = np.array([sens["layers"][str(b.layer)]["tokens"][: b.num_experts] for b in blocks])  # [layers, E]
    top_k = blocks[0].top_k
    return {
        "layers": [b.layer for b in blocks],
        "top_k": top_k,
        "tokens": int(counts[0].sum() // top_k),
        "counts": counts.tolist(),
        "params": {"calibration": tag, "from": "sensitivity pass"},
        "workloads": {str(batch_tokens): batch_workload(counts, batch_tokens, top_k).tolist()},
    }


def _allocate(model, rec: Recipe, schemes, table, sens: dict, rout: dict, name: str, progress: bool) -> tuple:
    """(scheme map, allocation_doc) of the ILP over every MoE layer."""
    dims = model_dims(model)
    problems = [
        layer_problem(sens, rout, dims, layer, table, list(schemes), rec.batch_tokens, name) for layer in rout["layers"]
    ]
    start = time.perf_counter()
    try:
        if rec.budget == "model":
            with tqdm(
                total=len(problems), desc="allocation (one model budget)", unit="layer", disable=not progress
            ) as bar:
                choices, _ = solve_model(
                    [(p.loss, p.time, p.bits, p.size) for p in problems],
                    problems[0].bits,
                    rec.wbits,
                    rec.r,
                    True,
                    rec.granularity,
                )
                bar.update(len(problems))
        else:
            choices = [
                solve_layer(p.loss, p.time, p.bits, p.size, rec.wbits, rec.r, True, rec.granularity, p.labels)
                for p in tqdm(problems, desc="allocation", unit="layer", disable=not progress)
            ]
    except InfeasibleBudget as e:
        bits = sorted(s.bits_per_weight for s in schemes)
        raise MxMoEError(
            f"no allocation meets --wbits {rec.wbits:g}: the smallest achievable is {e.smallest:g} bits per "
            f"weight and the largest {bits[-1]:g}"
        ) from None
    doc = allocation_doc(
        problems,
        choices,
        "quantize",
        rec.r,
        rec.wbits,
        granularity=rec.granularity,
        global_budget=rec.budget == "model",
        solve_seconds=time.perf_counter() - start,
    )
    return scheme_map(problems, choices), doc


def _rtn(model, plan: dict) -> dict:
    """RTN IntWeights of every quantized block of ``plan``, from the model's weights."""
    blocks = blocks_by_layer(model)
    return {
        k: quantize_weight_int(block_weight(blocks[k[0]], k[1], k[2]).detach().float(), s)
        for k, s in plan.items()
        if not s.is_full_precision
    }


def _table_sha(gpu: str) -> "str | None":
    """sha256 of the cost table ``cost_tables/<gpu>.json`` the allocation read (None: vendor figures only)."""
    path = COST_TABLES / f"{gpu}.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def quantize(
    model,
    tokenizer=None,
    *,
    wbits: float,
    abits: int = 16,
    r: float = 1.0,
    method: str = "gptq-had",
    granularity: str = "block",
    budget: str = "layer",
    calib: str = "wikitext2",
    calib_windows: int = 8,
    seqlen: int = 512,
    seed: int = 0,
    gpu: "str | None" = None,
    batch_tokens: int = 512,
    schemes: "str | None" = None,
    base_id: str = "model",
    out: "str | Path | None" = None,
    overwrite: bool = False,
    cache: "str | Path | None" = None,
    save_dtype: "str | None" = None,
    stream_to=None,
    progress: bool = True,
) -> QuantizeResult:
    """MxMoE-quantize ``model`` in place (routing → sensitivity → allocation → GPTQ/RTN) and save it to ``out``.

    ``wbits``: mean weight bits of the expert blocks (the paper's accounting); ``abits``: activation
    width (16, 8, 5 or 4, see the module doc); ``r``: 1 favours accuracy, 0 speed; ``budget``: per
    layer or one for the whole model. ``base_id`` names the model in mxmoe.json. The sensitivity
    cache lives under ``cache`` (default ``<mxmoe cache>/quantize``). ``save_dtype`` (float32, bfloat16,
    float16) stores the full-precision weights in that type (default: the model's). ``stream_to`` (e.g. "cuda"):
    a model held in CPU memory, larger than the GPU, has its sensitivity and GPTQ computed there one decoder
    layer at a time (``mxmoe.quant.layerwise``; method gptq or rtn). Returns a ``QuantizeResult``;
    the model ends fake-quantized, exactly what the checkpoint stores.
    """
    import torch

    import mxmoe

    rec = Recipe(
        wbits, abits, r, method, granularity, budget, calib, calib_windows, seqlen, seed, gpu, batch_tokens, schemes
    )
    candidates, table = check_recipe(rec)
    check_method_placement(model, method, stream_to)  # before hours of work on a model over several GPUs
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise MxMoEError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    if out is not None:
        check_out_dir(out, overwrite)
    times: dict = {}
    start = time.perf_counter()
    sha = weights_sha256(model)
    base_config = copy.deepcopy(model.config)
    windows, tag = calibration(rec, tokenizer, model.config.vocab_size)  # [n, seqlen]
    times["calibration"] = time.perf_counter() - start

    t0 = time.perf_counter()
    names = ",".join(map(str, candidates))
    sens_path = (
        Path(cache or cache_dir() / "quantize")
        / sha[:16]
        / f"sensitivity_{method}_{hashlib.sha256(names.encode()).hexdigest()[:8]}_{tag}.json"
    )
    sens = compute_sensitivity(
        model,
        windows,
        candidates,
        method,
        path=sens_path,
        seed=seed,
        progress=progress,
        stream_to=stream_to,
        params={"model": base_id, "weights_sha256": sha, "calibration": tag},
    )
    times["sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rout = routing_from_sensitivity(sens, moe_blocks(model), rec.batch_tokens, tag)
    times["routing"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan, doc = _allocate(model, rec, candidates, table, sens, rout, base_id, progress)
    times["allocation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    int_weights: dict = {}
    hadamard = method == "gptq-had"
    if method == "rtn":
        int_weights = _rtn(model, plan)
        apply_schemes(model, plan, weights=int_weights)
        fallbacks = 0
    else:
        report = quantize_model_gptq(
            model,
            windows,
            plan,
            hadamard=hadamard,
            seed=seed,
            progress=progress,
            int_weights=int_weights,
            stream_to=stream_to,
        )
        fallbacks = len(report.rtn_fallbacks)
    times["quantization"] = time.perf_counter() - t0

    overrides = {
        k: getattr(model.config, k)
        for k in ("tie_word_embeddings",)
        if getattr(model.config, k, None) != getattr(base_config, k, None)
    }
    manifest = {
        "base": {
            "id": base_id,
            "sha256": sha,
            "revision": getattr(base_config, "_commit_hash", None),
            "class": type(model).__name__,
        },
        "recipe": {
            "wbits": rec.wbits,
            "abits": rec.abits,
            "r": rec.r,
            "method": rec.method,
            "granularity": rec.granularity,
            "budget": rec.budget,
            "batch_tokens": rec.batch_tokens,
            "candidates": [str(s) for s in candidates],
            "seed": rec.seed,
        },
        "calibration": {"source": rec.calib, "windows": rec.calib_windows, "seqlen": rec.seqlen, "tag": tag},
        "bits": {"weight": doc["predicted"]["bits"], "activation": average_bits(model, plan)[1]},
        "predicted": doc["predicted"],
        "layers": doc["layers"],
        "cost_table": {
            "gpu": table.gpu,
            "device": table.device,
            "measured": table.measured,
            "sha256": _table_sha(table.gpu),
            "kernel": table.kernel,
            "note": table.kernel_note,  # None: measured on the kernel that runs this checkpoint
        },
        "online_hadamard": hadamard,
        "rotation_seed": seed if hadamard else None,
        "rtn_fallbacks": fallbacks,
        "config_overrides": overrides,
        "mxmoe_version": mxmoe.__version__,
        "torch": torch.__version__,
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "saved_dtype": save_dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    result = QuantizeResult(model, plan, int_weights, manifest, times)
    if out is not None:
        t0 = time.perf_counter()
        result.out = save_checkpoint(
            out,
            model,
            plan,
            int_weights,
            manifest,
            base_config=base_config,
            tokenizer=tokenizer,
            overwrite=overwrite,
            progress=progress,
            dtype=getattr(torch, save_dtype) if save_dtype else None,
        )
        times["save"] = time.perf_counter() - t0
    return result
