"""The paper's models at full size with random weights: MoE block, prefill and decode under every setting.

``mxmoe bench paper-models --model qwen1.5-moe`` builds the model on the GPU
(``mxmoe.models.random_init.build_random``: random weights, routing skewed like the embedded model's
measured profile), then for each setting packs its experts, makes it the transformers experts
implementation and measures, in one process:

* the MoE block alone (router, routed and shared experts, combine), 512 and 8192 tokens, eager and
  CUDA-graph captured, on the hidden states a real forward hands to the block;
* whole-model prefill, 1 x 512 and 4 x 2048 tokens, eager and captured (``logits_to_keep=1``);
* decoding one token for batch 1, 16 and 64 against a static KV cache of 256 tokens, captured
  (and eager);
* peak GPU memory, expert weight bytes against bf16, host synchronisations per forward
  (``torch.cuda.set_sync_debug_mode("warn")`` warnings counted) and whether the experts forward of
  one layer runs under ``set_sync_debug_mode("error")``;
* the MoE share of the bf16 forward and the Amdahl bound it implies for each setting's block speedup;
* where the device time of one 1 x 512 prefill and one batch-16 decode step goes, by kind of kernel
  (``mxmoe.bench.breakdown``: experts GEMMs, their glue, attention, dense GEMMs, the rest).

Settings (``SETTINGS``): transformers' bf16 ``grouped_mm`` and ``batched_mm``; torch's fp8 grouped
GEMM (``torch._scaled_grouped_mm``, rowwise e4m3 weights and activations: what a user would use
instead); the mxmoe kernel with bf16, fp8 w8a8 and uniform w4a16 g128 everywhere; and MxMoE
allocations (weight-only 3.25 and 4.25 bits per linear block; weight-activation mixes at 5 bits per
expert, the paper's w4a4/w8a8 and Hopper's fp8 one, W4A8 with w8a8 on fp8 tensor cores). The
allocations come from ``mxmoe.allocate`` with the GPU's cost table
(``mxmoe.perfmodel``) and a **sensitivity stand-in** (there are no real weights): Δ = expected
routed rows of the block × (4^-w_bits + 4^-a_bits), the error scaling of b-bit rounding weighted by
how often the block runs, r = 0.75. They are solved on a CPU (``--allocate-only``, written to
``results/paper-models/alloc/``) and loaded here. Shared experts are packed too (their own
one-expert launches).

Correctness first: on a copy of the model cut to its first two MoE layers, the packed path's logits
are compared with the fake-quant path's (``mxmoe.quant.apply_schemes``, the accuracy path), both
bf16, within ``TOLERANCE_REL``. Writes ``<out>/<model>_<gpu>.json`` (``validate_doc`` checks its
schema) and prints a table last. ``--smoke`` is a CPU dry run of the same path on a tiny config.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mxmoe.allocate import allocation_doc, layer_problem, solve_point
from mxmoe.bench.breakdown import kernel_breakdown
from mxmoe.env import device_slug, git_commit
from mxmoe.files import write_bytes_atomic, write_text_atomic
from mxmoe.kernels.moe import (
    attach_fp8_experts,
    attach_packed_experts,
    attach_packed_shared,
    detach_packed,
    register_experts_implementation,
    register_fp8_implementation,
)
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.paper import LARGE_CONFIGS, MODEL_CONFIGS, MODEL_SHAPES, PAPER_CONFIGS, paper_config
from mxmoe.models.placement import input_device, model_devices
from mxmoe.models.random_init import (
    build_random,
    copy_routing,
    drop_expert_weights,
    restore_expert_weights,
    target_profile,
)
from mxmoe.models.zoo import _TINY_COMMON, TINY_CONFIGS
from mxmoe.paths import REPO_ROOT
from mxmoe.perfmodel import gpu_key, launch_time, load_table
from mxmoe.quant import quantize_activation
from mxmoe.quant.apply import apply_schemes
from mxmoe.routing import batch_workload, profile_routing
from mxmoe.schemes import Scheme, scheme_set
from mxmoe.sensitivity import layer_sensitivity
from mxmoe.stages.routing import embedded_profile

SCHEMA_VERSION = 1
WEIGHT_ONLY_SET = "w2a16_g128_asym,w3a16_g128_asym,w4a16_g128_asym,w8a16_g-1_sym"
# Hopper's low-bit weight-activation schemes: integer weight codes exact in e4m3, fp8 activations, fp8 MMAs
WA_FP8_SET = "w4a8_g-1_sym_fp8,w4a8_g128_sym_fp8,w8a8_g-1_sym_fp8"
ALLOC_R = 0.75
ALLOC_BATCH = 512
# setting -> how its experts run: impl (transformers experts implementation), scheme (uniform) or alloc;
# check: compared with the fake-quant path before timing (one of each kind of quantized setting)
SETTINGS = {
    "bf16 grouped_mm": {"impl": "grouped_mm"},
    "bf16 batched_mm": {"impl": "batched_mm"},
    "torch fp8 grouped": {"impl": "torch_fp8"},
    "mxmoe bf16": {"impl": "mxmoe", "scheme": "bf16"},
    "mxmoe w8a8 fp8": {"impl": "mxmoe", "scheme": "w8a8_g-1_sym_fp8"},
    "mxmoe w4a16 g128": {"impl": "mxmoe", "scheme": "w4a16_g128_asym", "check": True},
    "mxmoe 3.25 (w-only)": {"impl": "mxmoe", "alloc": (WEIGHT_ONLY_SET, 3.25, "block"), "check": True},
    "mxmoe 4.25 (w-only)": {"impl": "mxmoe", "alloc": (WEIGHT_ONLY_SET, 4.25, "block")},
    # one scheme per expert: per block, CBC did not finish one DeepSeek-V2-Lite layer in 5 minutes
    "mxmoe 5 (w-a mix)": {"impl": "mxmoe", "alloc": ("w5a5", 5.0, "expert"), "check": True},
    # the same budget on fp8 tensor cores (W4A8 + w8a8 fp8): what Hopper runs at the fp8 rate
    "mxmoe 5 (w-a fp8 mix)": {"impl": "mxmoe", "alloc": (WA_FP8_SET, 5.0, "expert"), "check": True},
}
BASELINE = "bf16 grouped_mm"
# measuring order when time is short: the baseline and the targets' settings first; transformers' batched_mm
# (a copy of the expert weights per routed token: out of memory at prefill sizes) and our bf16 path last
RUN_ORDER = (
    "bf16 grouped_mm",
    "mxmoe 4.25 (w-only)",
    "mxmoe 3.25 (w-only)",
    "torch fp8 grouped",
    "mxmoe w4a16 g128",
    "mxmoe w8a8 fp8",
    "mxmoe 5 (w-a mix)",
    "mxmoe 5 (w-a fp8 mix)",
    "bf16 batched_mm",
    "mxmoe bf16",
)
# measured sizes: prefill (batch, length), decode batches, decode context, MoE-block tokens
FULL_SIZES = {"prefill": [[1, 512], [4, 2048]], "decode": [1, 16, 64], "context": 256, "block_tokens": [512, 8192]}
SMOKE_SIZES = {"prefill": [[1, 16], [2, 16]], "decode": [1, 2], "context": 8, "block_tokens": [16, 32]}  # CPU dry run
BLOCK_LAYERS = 4  # MoE layers timed alone (one per skew level of the imposed profile)
DOC_KEYS = (
    "schema",
    "model",
    "hf_id",
    "provenance",
    "sizes",
    "build",
    "routing",
    "allocation",
    "correctness",
    "settings",
    "summary",
    "wall_s",
)
SETTING_KEYS = (
    "setting",
    "impl",
    "expert_bytes",
    "expert_bytes_vs_bf16",
    "block",
    "prefill",
    "decode",
    "syncs",
    "peak_gib",
)


# ---- shapes and allocations (CPU) ----------------------------------------------------------------


def config_of(name: str):
    """The transformers config of a paper model or a larger one (full size), or of a ``tiny-*`` zoo model."""
    from transformers import AutoConfig

    if name in MODEL_CONFIGS:
        return paper_config(name)
    if name in TINY_CONFIGS:
        model_type, extra = TINY_CONFIGS[name]
        return AutoConfig.for_model(model_type, **{**_TINY_COMMON, **extra})
    raise ValueError(
        f"unknown model {name!r}: use a paper model ({', '.join(PAPER_CONFIGS)}), a larger one "
        f"({', '.join(LARGE_CONFIGS)}) or a tiny config ({', '.join(TINY_CONFIGS)})"
    )


def moe_layer_ids(config) -> list:
    """Decoder layer indices that hold an MoE block, from a transformers config."""
    n = config.num_hidden_layers
    first = getattr(config, "first_k_dense_replace", 0) or 0
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return [i for i in range(n) if i >= first and i not in dense and (i + 1) % step == 0]


def model_dims(config) -> dict:
    """{'hidden', 'expert_width', 'shared_widths', 'num_experts', 'top_k'} of a paper model's config."""
    mt = config.model_type
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = (
        getattr(config, "num_experts", None)
        or getattr(config, "n_routed_experts", None)
        or getattr(config, "num_local_experts")
    )
    if mt == "qwen2_moe":
        shared = [config.shared_expert_intermediate_size]
    elif mt in ("deepseek_v2", "deepseek_v3"):
        shared = [config.moe_intermediate_size * config.n_shared_experts] if config.n_shared_experts else []
    else:
        shared = []
    return {
        "hidden": config.hidden_size,
        "expert_width": width,
        "shared_widths": shared,
        "num_experts": experts,
        "top_k": config.num_experts_per_tok,
    }


def stand_in_sensitivity(layers: list, rows: np.ndarray, batch: int, n_shared: int, schemes) -> dict:
    """A sensitivity result (``mxmoe.sensitivity`` format) of the stand-in Δ = rows × (4^-w + 4^-a).

    rows [L, E]: (expected) routed rows per expert at ``batch`` tokens; shared experts see every token. Not a
    measured sensitivity: it only says that fewer bits cost more and busy experts matter more.
    """

    sch = [Scheme.parse(s) for s in schemes]
    err = [0.0 if s.is_full_precision else 4.0**-s.w_bits + (4.0**-s.a_bits if s.a_bits < 16 else 0.0) for s in sch]
    out = {
        "schemes": [str(s) for s in sch],
        "layers": {},
        "params": {"method": "stand-in: rows x (4^-w_bits + 4^-a_bits), no weights measured"},
    }
    for li, layer in enumerate(layers):
        r = [float(x) for x in rows[li]] + [float(batch)] * n_shared
        experts = list(range(rows.shape[1])) + [f"shared{i}" for i in range(n_shared)]
        out["layers"][str(layer)] = {"experts": experts, "delta": [[[ri * e for e in err]] * 3 for ri in r]}
    return out


def alloc_dir(out: "str | Path | None" = None) -> Path:
    """results/paper-models/alloc (or ``out``/alloc)."""
    return Path(out or REPO_ROOT / "results" / "paper-models") / "alloc"


def alloc_file(model: str, setting: str, gpu: str, out=None) -> Path:
    """The allocation file of one model, setting and cost table."""
    slug = setting.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "-")
    return alloc_dir(out) / f"{model}_{slug}_{gpu}.json.gz"


def solve_allocations(model: str, gpu: str = "nvidia_h200", out=None, routing_seed: int = 0, only=None) -> dict:
    """Solve every allocation setting of ``model`` with ``gpu``'s cost table; write and return their docs.

    The routing is the profile ``build_random`` imposes (same seed); times come from the perfmodel at
    ``ALLOC_BATCH`` tokens; loss is ``stand_in_sensitivity``; r = ``ALLOC_R``; one budget per layer.
    ``only``: solve just these settings.
    """
    config = config_of(model)
    dims, layers = model_dims(config), moe_layer_ids(config)
    prof = target_profile(dims["num_experts"], len(layers), measured=embedded_profile(), seed=routing_seed)
    counts = prof["shares"] * 1e6  # [L, E] as a profile of 1e6 routed rows
    routing = {
        "layers": layers,
        "top_k": dims["top_k"],
        "counts": counts.tolist(),
        "params": {"model": model, "imposed": prof["kind"], "source": prof["source"]},
    }
    rows = prof["shares"] * ALLOC_BATCH * dims["top_k"]  # [L, E] expected routed rows (fractional: integer
    # rows tie many experts, and exactly tied experts make CBC's branch and bound explode)
    docs, table = {}, load_table(gpu)
    if table.kernel_note:
        print(f"note: {table.kernel_note}")
    for setting, spec in SETTINGS.items():
        if "alloc" not in spec or (only and setting not in only):
            continue
        schemes, budget, granularity = spec["alloc"]
        sens = stand_in_sensitivity(
            layers, rows, ALLOC_BATCH, len(dims["shared_widths"]), [str(s) for s in scheme_set(schemes)]
        )
        problems, choices, t0 = [], [], time.perf_counter()
        for layer in tqdm(layers, desc=f"{model} {setting}", unit="layer"):
            p = layer_problem(sens, routing, dims, layer, table, schemes, ALLOC_BATCH, model)
            choices.append(
                solve_point(
                    p.loss, p.time, p.bits, p.size, budget, ALLOC_R, granularity=granularity, labels=p.labels
                ).choice
            )
            problems.append(p)
        seconds = time.perf_counter() - t0
        doc = allocation_doc(
            problems,
            choices,
            setting,
            ALLOC_R,
            budget,
            granularity=granularity,
            profile="paper-models",
            solve_seconds=seconds,
        )
        doc.update(
            hf_id=MODEL_SHAPES.get(model, (None,))[0],
            sensitivity_stand_in=sens["params"]["method"],
            cost_table_kernel=table.kernel,
            solved_on=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
        )
        _write_compact(alloc_file(model, setting, gpu, out), doc)
        docs[setting] = doc
    return docs


def _write_compact(path: Path, doc: dict) -> None:
    """JSON without indentation, one allocation row per line (tens of thousands of rows), gzip-compressed
    (a tenth of the bytes; no timestamp, so the same allocation gives the same file), written atomically."""
    rows = doc.get("rows", [])
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, separators=(",", ":"))
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    text = head[:-1] + ',"rows":[\n' + body + "\n]}\n"
    write_bytes_atomic(path, gzip.compress(text.encode(), mtime=0))


def load_allocation_map(model: str, setting: str, gpu: str, out=None, solve: bool = False) -> "tuple[dict, dict]":
    """(scheme map {(layer, expert, block): scheme str}, doc) of a solved allocation: the committed one
    (results/paper-models/alloc), else one under ``out``, else solved now into ``out`` when ``solve``
    (needs PuLP); otherwise FileNotFoundError naming the command that solves it."""
    path = alloc_file(model, setting, gpu)
    if not path.exists() and out is not None:
        path = alloc_file(model, setting, gpu, out)
        if not path.exists() and solve:
            solve_allocations(model, gpu, out)
    if not path.exists():
        raise FileNotFoundError(
            f"no allocation {path}; solve it on a CPU first: "
            f"mxmoe bench paper-models --model {model} --allocate-only --gpu {gpu}"
        )
    doc = json.loads(gzip.decompress(path.read_bytes()))
    return {(r["layer"], r["expert"], r["block"]): r["scheme"] for r in doc["rows"]}, doc


def predicted_rows(
    model: str, gpu: str = "nvidia_h200", tokens=(512, 8192), routing_seed: int = 0, alloc_gpu: "str | None" = None
) -> list:
    """Predicted MoE-block GEMM time of every mxmoe setting (``mxmoe.perfmodel``, the cost table of ``gpu``),
    with the allocations solved against ``alloc_gpu``'s table (default: ``gpu``'s).

    Per MoE layer: the routed experts' gate_up and down launches (tokens per expert from the imposed
    profile) and the shared experts' launches, summed over layers; plus expert weight bytes with the
    paper's bit accounting. Only the kernel's GEMMs: no routing, gather, SiLU or combine, no
    attention. Allocations are read from results/paper-models/alloc (settings without one are left out).
    Returns [{'model', 'setting', 'tokens', 'T_ms', 'tokens_per_s', 'expert_gib', 'source'}].
    """

    config = config_of(model)
    dims, layers = model_dims(config), moe_layer_ids(config)
    prof = target_profile(dims["num_experts"], len(layers), measured=embedded_profile(), seed=routing_seed)
    table = load_table(gpu)
    h, w, shared = dims["hidden"], dims["expert_width"], dims["shared_widths"]
    out = []
    for name, spec in SETTINGS.items():
        if spec["impl"] != "mxmoe":
            continue
        amap = None
        if "alloc" in spec:
            try:
                amap, _ = load_allocation_map(model, name, alloc_gpu or gpu)
            except FileNotFoundError:
                continue
        of = _scheme_of(spec, amap)
        bits = 0.0
        for layer in layers:
            widths = [(e, w) for e in range(dims["num_experts"])] + [(f"shared{i}", sw) for i, sw in enumerate(shared)]
            for e, width in widths:
                bits += 2 * width * h * Scheme.parse(of(layer, e, "gate")).bits_per_weight
                bits += width * h * Scheme.parse(of(layer, e, "down")).bits_per_weight
        for t in tokens:
            rows = batch_workload(prof["shares"], t, dims["top_k"])  # [L, E]
            total, sources = 0.0, set()
            for li, layer in enumerate(layers):
                experts = [(e, int(m), w) for e, m in enumerate(rows[li])]
                experts += [(f"shared{i}", t, sw) for i, sw in enumerate(shared)]
                routed = [x for x in experts if isinstance(x[0], int)]
                for group in (routed, [x for x in experts if not isinstance(x[0], int)]):
                    if not group:
                        continue
                    gu = launch_time([(Scheme.parse(of(layer, e, "gate")), m, 2 * wd, h) for e, m, wd in group], table)
                    dn = launch_time([(Scheme.parse(of(layer, e, "down")), m, h, wd) for e, m, wd in group], table)
                    total += gu.ms + dn.ms
                    sources |= {gu.source, dn.source}
            out.append(
                {
                    "model": model,
                    "setting": name,
                    "tokens": t,
                    "T_ms": total,
                    "tokens_per_s": t / (total / 1e3),
                    "expert_gib": bits / 8 / 2**30,
                    "source": ",".join(sorted(sources)),
                    "gpu": gpu,
                    "alloc_gpu": alloc_gpu or gpu,
                }
            )
    return out


# ---- applying a setting -------------------------------------------------------------------------


def _scheme_of(setting: dict, amap: "dict | None"):
    def of(layer, expert, block):
        return setting["scheme"] if amap is None else amap[(layer, expert, block)]

    return of


def bf16_expert_bytes(blocks: list) -> int:
    """Bytes of the routed and shared expert weights in bf16."""
    total = 0
    for b in blocks:
        total += 2 * (b.experts.gate_up_proj.numel() + b.experts.down_proj.numel())
        total += sum(2 * p.numel() for mlp in b.shared for p in mlp.parameters())
    return total


def apply_setting(model, blocks: list, name: str, amap: "dict | None", lean: bool = False) -> int:
    """Make ``name`` the model's experts implementation, packing every MoE layer; returns expert weight bytes.

    Each layer is packed on the device its expert weights are on. ``lean`` (a ``build_random`` model
    only) keeps just what the setting runs on: a packed setting frees each layer's bf16 routed experts
    once they are packed (``drop_expert_weights``), and every setting first draws again the ones an
    earlier setting freed (``restore_expert_weights``, the same values). Memory then peaks at the
    packed model plus one layer's bf16 experts: what lets a model whose bf16 experts fill its GPUs
    run the packed settings beside them.
    """

    spec = SETTINGS[name]
    for b in blocks:
        detach_packed(b)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    init = getattr(model, "mxmoe_init", None)
    if lean and init is None:
        raise ValueError("apply_setting(lean=True) draws freed experts again: it needs a build_random model")
    impl = spec["impl"]
    total = 0
    for b in tqdm(blocks, desc=f"apply {name}", unit="layer", disable=len(blocks) < 16):
        if lean:
            restore_expert_weights(b, **init)
        if impl == "mxmoe":
            register_experts_implementation()
            of = _scheme_of(spec, amap)
            total += attach_packed_experts(
                b,
                [(of(b.layer, e, "gate"), of(b.layer, e, "up"), of(b.layer, e, "down")) for e in range(b.num_experts)],
            )
            if b.shared:
                keys = [f"shared{s}" for s in range(len(b.shared))]
                total += attach_packed_shared(
                    b, [(of(b.layer, k, "gate"), of(b.layer, k, "up"), of(b.layer, k, "down")) for k in keys]
                )
        elif impl == "torch_fp8":
            register_fp8_implementation()
            total += attach_fp8_experts(b)
        if lean and impl in ("mxmoe", "torch_fp8"):
            drop_expert_weights(b)
    if impl not in ("mxmoe", "torch_fp8"):
        total = bf16_expert_bytes(blocks)
    model.set_experts_implementation(impl)
    return total


# ---- timers ---------------------------------------------------------------------------------------


def _sync(device) -> None:
    """Wait for ``device`` (or every device of a list) to finish its queued work; nothing on a CPU."""
    for d in device if isinstance(device, (list, tuple)) else [device]:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


def time_eager(fn, reps: int = 10, warmup: int = 2, device="cuda") -> dict:
    """Median ms of ``fn()`` between CUDA events (a host clock on the CPU), after ``warmup`` calls.

    ``device`` a list of devices (a model over several GPUs): the host clock between synchronisations
    of all of them, so the time covers the work of every GPU the call used."""
    for _ in range(warmup):
        fn()
    times = []
    if isinstance(device, (list, tuple)):
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps, "clock": "host, all devices"}
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def time_graph(fn, reps: int = 20, warmup: int = 2, device="cuda") -> dict:
    """Median ms of replays of ``fn`` captured in one CUDA graph ({'error': ...} if capture fails)."""
    if torch.device(device).type != "cuda":
        return {"error": "CUDA graphs need a GPU"}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - the reason is the measurement
        torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def count_syncs(fn, device="cuda") -> "int | None":
    """Host synchronisations in one call of ``fn`` (warnings of ``set_sync_debug_mode('warn')``); None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def raises_on_sync(fn, device="cuda") -> "str | None":
    """None when ``fn()`` runs under ``set_sync_debug_mode('error')``, else the error it raised ('n/a' on a CPU)."""
    if torch.device(device).type != "cuda":
        return "n/a (no CUDA)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- measurements ---------------------------------------------------------------------------------


@torch.no_grad()
def block_inputs(model, blocks: list, ids: torch.Tensor) -> list:
    """Inputs [1, T, H] of the first ``BLOCK_LAYERS`` MoE blocks (of ``blocks``) in one forward of ``ids``."""
    seen = []
    handles = [
        b.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(1, -1, a[0].shape[-1])))
        for b in blocks[:BLOCK_LAYERS]
    ]
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return seen


def make_static_cache(model, batch: int, max_len: int):
    """A transformers StaticCache for ``batch`` sequences of ``max_len`` tokens (either constructor)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older signature
        return StaticCache(
            config=model.config, max_batch_size=batch, max_cache_len=max_len, device=model.device, dtype=model.dtype
        )


def rewind_cache(cache, length: int) -> None:
    """Set a StaticCache's fill level back to ``length`` tokens, on the device (so a CUDA graph replays it).

    transformers 5 advances each layer's ``cumulative_length`` on every update and does not take the
    position from ``cache_position``: without this, repeated decode steps walk off the end of the cache.
    Caches without that counter (older transformers) are left alone."""
    for layer in getattr(cache, "layers", ()):
        filled = getattr(layer, "cumulative_length", None)
        if isinstance(filled, torch.Tensor):
            filled.fill_(length)


def decode_step(model, cache, tok, length: int):
    """One decode step of ``tok`` [B, 1] against ``cache`` filled to ``length`` tokens, as a repeatable closure:
    every call (eager or replayed in a graph) decodes at the same position."""

    def step():
        rewind_cache(cache, length)
        return model(
            input_ids=tok,
            past_key_values=cache,
            cache_position=torch.full((1,), length, device=tok.device, dtype=torch.long),
            use_cache=True,
            logits_to_keep=1,
        )

    return step


@torch.no_grad()
def measure_setting(
    model,
    blocks: list,
    name: str,
    inputs: dict,
    sizes: dict,
    *,
    reps: int,
    expert_bytes: int,
    bf16_bytes: int,
    deadline: float,
) -> dict:
    """Every measurement of one setting (module doc); a dict with SETTING_KEYS."""
    vocab = model.config.vocab_size
    dev = model.device
    cuda = dev.type == "cuda"
    few, warm = (max(3, reps // 2), 2) if cuda else (1, 1)  # eager repetitions and warm-up calls (CPU: a dry run)
    row = {
        "setting": name,
        "impl": SETTINGS[name]["impl"],
        "expert_bytes": expert_bytes,
        "expert_bytes_vs_bf16": expert_bytes / bf16_bytes,
        "block": {},
        "prefill": {},
        "decode": {},
        "syncs": {},
        "breakdown": {},  # one profiled prefill and decode step: device time by kernel kind
    }
    breakdown_batch = sizes["decode"][len(sizes["decode"]) // 2]  # batch 16 of 1, 16, 64
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # one MoE layer's experts forward: synchronisations and the sync-debug "error" check
    t_small = sizes["block_tokens"][0]
    b0, x0 = blocks[0], inputs["block"][t_small][0].reshape(-1, blocks[0].hidden_size)
    weights, idx = b0.router(x0)[1:]
    experts_fn = lambda: b0.experts(x0, idx, weights)  # noqa: E731
    experts_fn()
    row["syncs"]["experts_forward"] = count_syncs(experts_fn, dev)
    row["syncs"]["experts_forward_error_mode"] = raises_on_sync(experts_fn, dev) or "ok"
    row["syncs"]["moe_block"] = count_syncs(lambda: b0.module(inputs["block"][t_small][0]), dev)
    first = tuple(sizes["prefill"][0])
    ids0 = inputs["prefill"][first]
    row["syncs"][f"model_prefill_{first[0]}x{first[1]}"] = count_syncs(
        lambda: model(input_ids=ids0, use_cache=False, logits_to_keep=1), dev
    )
    # the MoE block alone
    for tokens in sizes["block_tokens"]:
        xs = inputs["block"][tokens]
        try:
            eager = [
                time_eager(lambda x=x, i=i: blocks[i].module(x), reps if cuda else 1, warm, device=dev)
                for i, x in enumerate(xs)
            ]
            graph = [time_graph(lambda x=x, i=i: blocks[i].module(x), 2 * reps, device=dev) for i, x in enumerate(xs)]
            row["block"][str(tokens)] = {"eager": _mean_ms(eager), "graph": _mean_ms(graph), "layers": len(xs)}
        except torch.cuda.OutOfMemoryError as err:  # e.g. batched_mm gathers one weight copy per routed token
            row["block"][str(tokens)] = _oom(err)
    # whole-model prefill
    for (bsz, length), ids in inputs["prefill"].items():
        key = f"{bsz}x{length}"
        if time.time() > deadline:
            row["prefill"][key] = {"skipped": "time budget"}
            continue
        fn = lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        try:
            e, g = time_eager(fn, few, warm, device=dev), time_graph(fn, reps, device=dev)
        except torch.cuda.OutOfMemoryError as err:
            row["prefill"][key] = _oom(err)
            continue
        row["prefill"][key] = {"tokens": bsz * length, "eager": e, "graph": g, **_tps(bsz * length, e, g)}
        if (bsz, length) == first:
            row["breakdown"][f"prefill_{key}"] = kernel_breakdown(fn, dev)
    # decoding one token against a static cache
    ctx_len = sizes["context"]
    for bsz in sizes["decode"]:
        if time.time() > deadline:
            row["decode"][str(bsz)] = {"skipped": "time budget"}
            continue
        try:
            cache = make_static_cache(model, bsz, ctx_len + 8)
            ctx = torch.randint(0, vocab, (bsz, ctx_len), device=dev)
            model(
                input_ids=ctx,
                past_key_values=cache,
                cache_position=torch.arange(ctx_len, device=dev),
                use_cache=True,
                logits_to_keep=1,
            )
            tok = torch.randint(0, vocab, (bsz, 1), device=dev)
            fn = decode_step(model, cache, tok, ctx_len)
            e, g = time_eager(fn, few, warm, device=dev), time_graph(fn, 2 * reps, device=dev)
            row["decode"][str(bsz)] = {"context": ctx_len, "eager": e, "graph": g, **_tps(bsz, e, g)}
            if bsz == breakdown_batch:
                row["breakdown"][f"decode_{bsz}"] = kernel_breakdown(fn, dev)
            cache = None  # free the static cache before the next batch size
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row["decode"][str(bsz)] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return row


def _oom(err: Exception) -> dict:
    """An out-of-memory measurement as a result entry (the other sizes of the setting still run)."""
    torch.cuda.empty_cache()
    return {"error": f"OutOfMemoryError: {str(err).splitlines()[0][:200]}"}


def _mean_ms(parts: list) -> dict:
    """Mean over layers of per-layer medians (an error in any layer is reported instead)."""
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        return {"error": errors[0]}
    return {"ms": float(np.mean([p["ms"] for p in parts])), "per_layer_ms": [p["ms"] for p in parts]}


def _tps(tokens: int, eager: dict, graph: dict) -> dict:
    out = {}
    for k, v in (("eager", eager), ("graph", graph)):
        if "ms" in v:
            out[f"tokens_per_s_{k}"] = tokens / (v["ms"] / 1e3)
    return out


# ---- correctness: packed path vs fake-quant path -------------------------------------------------


# Relative Frobenius error allowed between the packed and the fake-quant path, logits and same-input block.
# Activations quantized to 4 bits turn a half-ulp bf16 difference of a GEMM's input into whole steps of the
# grid (``rounding_floor`` measures by how much on the block's input in every check: a few percent), and a
# block chains two such GEMMs (its down projection quantizes the bf16 SiLU·up of either path).
TOLERANCE_REL = {"weight-only": 3e-2, "activations quantized": 8e-2}


def cases_pass(cases: dict) -> bool:
    """Whether every correctness case is within its tolerance (logits, and the same-input block where measured)."""
    return all(
        max(c["rel"], c.get("block_rel", 0.0)) <= TOLERANCE_REL[c.get("tolerance", "weight-only")]
        for c in cases.values()
    )


def rounding_floor(x: torch.Tensor, schemes) -> "float | None":
    """How far quantizing ``x[..., K]`` moves when ``x`` moves by half a bf16 ulp: the largest relative difference,
    over the activation-quantizing ``schemes``, between the quantized ``x`` and the quantized perturbed ``x``
    (seeded). None when no scheme quantizes activations. The floor under any two paths' disagreement."""
    acts = sorted({str(s) for s in schemes if Scheme.parse(s).a_bits < 16})
    if not acts:
        return None
    g = torch.Generator(device=x.device).manual_seed(0)
    xf = x.float()
    noise = torch.rand(xf.shape, generator=g, device=x.device, dtype=torch.float32) * 2 - 1
    moved = xf * (1 + 2.0**-9 * noise)  # half a bf16 ulp, relative
    diffs = []
    for s in acts:
        a, b = quantize_activation(xf, s), quantize_activation(moved, s)
        diffs.append(float((a - b).norm() / a.norm().clamp_min(1e-30)))
    return max(diffs)


def _block_output(out) -> torch.Tensor:
    """The hidden states of an MoE block's output (some blocks also return their router logits)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def check_correctness(
    name: str, settings: dict, seed: int = 0, tokens: int = 256, device="cuda", device_map=None
) -> dict:
    """Logits of the packed path vs the fake-quant path on the model cut to its first two MoE layers.

    settings: {setting: scheme map or None (uniform scheme)}; both paths run in bf16 (fp32 on a CPU) on the same
    weights (bf16 rounding of RTN's dequantized weights in the fake-quant path is the only
    intended difference). Reports relative Frobenius error of the logits and top-1 agreement, and
    the same for mxmoe bf16 vs transformers' grouped_mm (the noise floor of two bf16 paths).
    Each case also compares the first MoE block's output on the *same* input (``block_rel``): the
    logits compound both layers' differences. A setting that quantizes activations turns bf16-level
    differences into whole quantization steps (``rounding_floor`` measures by how much on the block's
    input), so it is held to ``TOLERANCE_REL["activations quantized"]``.
    ``device_map`` (a list of devices) spreads the cut model over them, at least one layer each, so
    the packed experts of each layer run on their own GPU. The fake-quant path runs on a second copy
    built from the same seed (the weights do not depend on the placement) with the routing copied.
    """

    first = moe_layer_ids(config_of(name))[0]
    places = [torch.device(d) for d in (device_map or [device])]
    cuda = places[0].type == "cuda"
    layers = max(first + 2, len(places)) if device_map is not None else first + 2
    kw = dict(
        device=device,
        device_map=device_map,
        dtype=torch.bfloat16 if cuda else torch.float32,
        seed=seed,
        num_hidden_layers=layers,
    )
    model, _ = build_random(name, measured=embedded_profile(), calib_shape=(4, 512) if cuda else (2, 32), **kw)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=input_device(model))
    out = {"layers": layers, "tokens": tokens, "tolerance_rel": TOLERANCE_REL, "cases": {}}
    if device_map is not None:
        out["devices"] = [str(d) for d in places]

    def compare(a, b):
        a, b = a.float(), b.float()
        return {
            "rel": float((a - b).norm() / b.norm()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        }

    model.set_experts_implementation("grouped_mm")
    ref_bf16 = model(input_ids=ids, use_cache=False).logits
    for setting, amap in settings.items():
        apply_setting(model, moe_blocks(model), BASELINE, None)
        fake, _ = build_random(name, skew=0, **kw)  # the same weights, wherever they are placed
        copy_routing(model, fake)
        spec = SETTINGS[setting]
        blocks = moe_blocks(fake)
        plan = {}
        for b in blocks:
            keys = list(range(b.num_experts)) + [f"shared{s}" for s in range(len(b.shared))]
            for e in keys:
                for blk in ("gate", "up", "down"):
                    plan[(b.layer, e, blk)] = spec["scheme"] if amap is None else amap[(b.layer, e, blk)]
        apply_schemes(fake, plan)
        want = fake(input_ids=ids, use_cache=False).logits
        x = block_inputs(fake, blocks[:1], ids)[0]  # [1, T, H] entering the first MoE block
        want_block = _block_output(blocks[0].module(x))
        del fake, blocks
        apply_setting(model, moe_blocks(model), setting, {k: v for k, v in plan.items()})
        got = model(input_ids=ids, use_cache=False).logits
        got_block = _block_output(moe_blocks(model)[0].module(x))  # same placement: x is on the block's device
        floor = rounding_floor(x, set(plan.values()))  # None: no scheme of the plan quantizes activations
        out["cases"][setting] = {
            **compare(got, want),
            "vs_bf16": compare(got, ref_bf16)["rel"],
            "block_rel": compare(got_block, want_block)["rel"],
            "rounding_floor": floor,
            "tolerance": "weight-only" if floor is None else "activations quantized",
        }
    apply_setting(model, moe_blocks(model), "mxmoe bf16", None)
    out["cases"]["mxmoe bf16 vs grouped_mm"] = {
        **compare(model(input_ids=ids, use_cache=False).logits, ref_bf16),
        "tolerance": "weight-only",
    }
    out["passed"] = cases_pass(out["cases"])
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---- the pipeline at full size --------------------------------------------------------------------


@torch.no_grad()
def pipeline_stages(
    model, blocks: list, name: str, schemes: str = WEIGHT_ONLY_SET, free=None, shape: tuple = (16, 512)
) -> dict:
    """Seconds of each pipeline stage on the full-size model: routing profile (``shape`` random tokens,
    16 x 512), batched GPTQ sensitivity of one MoE layer (4096 calibration tokens, the weight-only
    scheme set) and its projection to every layer. Packing and loading are timed per setting (``pack_s``).

    A model over several GPUs takes its ids on the input embeddings' GPU and the clocks wait for all
    of them; ``free``, when given, is called between the two stages (e.g. to free the other layers'
    bf16 experts, making room on the first layer's GPU for the batched GPTQ)."""

    out = {}
    devices = model_devices(model)
    model.set_experts_implementation("grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, shape, device=input_device(model))
    _sync(devices)
    t0 = time.perf_counter()
    counts = profile_routing(model, ids, batch_size=4)
    _sync(devices)
    out["routing_profile_s"] = time.perf_counter() - t0
    out["routing_profile_tokens"] = int(ids.numel())
    out["routing_profile_max_over_min"] = [float(c.max() / max(c.min(), 1)) for c in counts]
    x = block_inputs(model, blocks[:1], ids[:8])[0].reshape(-1, blocks[0].hidden_size)[:4096]
    if free is not None:
        free()
    t0 = time.perf_counter()
    sens = layer_sensitivity(blocks[0], x.float(), list(scheme_set(schemes)), method="gptq")
    _sync(devices)
    out["gptq_sensitivity_one_layer_s"] = time.perf_counter() - t0
    out["gptq_sensitivity_tokens"] = int(x.shape[0])
    out["gptq_sensitivity_schemes"] = schemes
    out["gptq_rtn_fallbacks"] = len(sens["rtn_fallbacks"])
    out["gptq_sensitivity_projected_s"] = out["gptq_sensitivity_one_layer_s"] * len(blocks)
    return out


# ---- the run --------------------------------------------------------------------------------------


def provenance(devices: "list | None" = None) -> dict:
    """Device, library versions, commit (``MXMOE_COMMIT`` or git) and date of this run; with ``devices``
    (CUDA devices of a model over several GPUs) also their count and each one's name and memory."""
    import datetime

    import transformers
    import triton

    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    if devices:
        gpus = [torch.cuda.get_device_properties(torch.device(d)) for d in devices if torch.device(d).type == "cuda"]
        extra = {
            "device_count": len(devices),
            "devices": [f"{g.name} ({g.total_memory / 2**30:.1f} GiB)" for g in gpus] or [str(d) for d in devices],
        }
    else:
        extra = {}
    return {
        **extra,
        "device": dev.name if dev else "cpu",
        "memory_gib": round(dev.total_memory / 2**30, 1) if dev else None,
        "multiprocessors": dev.multi_processor_count if dev else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summarize(doc: dict) -> dict:
    """Ratios against bf16 grouped_mm: block and whole-model speedups, MoE share, Amdahl bound, memory."""
    rows = {r["setting"]: r for r in doc["settings"]}
    base = rows.get(BASELINE)
    out = {}
    if base is None:
        return out

    def ms(r, *path):
        v = r
        for p in path:
            v = v.get(p, {}) if isinstance(v, dict) else {}
        return v.get("ms") if isinstance(v, dict) else None

    block_sizes = [str(t) for t in doc["sizes"]["block_tokens"]]
    for name, r in rows.items():
        s = {"expert_bytes_vs_bf16": r["expert_bytes_vs_bf16"], "peak_gib": r.get("peak_gib")}
        for tokens in block_sizes:
            for mode in ("eager", "graph"):
                a, b = ms(base, "block", tokens, mode), ms(r, "block", tokens, mode)
                s[f"block_{tokens}_{mode}_speedup"] = a / b if a and b else None
        for key in base["prefill"]:
            a, b = ms(base, "prefill", key, "graph"), ms(r, "prefill", key, "graph")
            s[f"prefill_{key}_graph_speedup"] = a / b if a and b else None
            b, n = map(int, key.split("x"))
            blk = min(block_sizes, key=lambda t: abs(int(t) - b * n))  # the block timed at the nearest token count
            n_moe = doc["build"]["moe_layers"]
            t_blk = ms(base, "block", blk, "graph")
            if a and t_blk:
                f = min(1.0, n_moe * t_blk / a)  # MoE share of the bf16 forward (captured)
                sp = s.get(f"block_{blk}_graph_speedup")
                s[f"prefill_{key}_moe_share"] = f
                if sp:
                    bound = 1.0 / ((1 - f) + f / sp)
                    s[f"prefill_{key}_amdahl_bound"] = bound
                    if s[f"prefill_{key}_graph_speedup"]:
                        s[f"prefill_{key}_of_amdahl"] = s[f"prefill_{key}_graph_speedup"] / bound
        for bsz in base["decode"]:
            a, b = ms(base, "decode", bsz, "graph"), ms(r, "decode", bsz, "graph")
            s[f"decode_{bsz}_graph_speedup"] = a / b if a and b else None
        for call, b in r.get("breakdown", {}).items():  # share of the profiled call's device time
            if b["total_us"]:
                s[f"{call}_experts_gemm_share"] = b["by_kind"].get("experts GEMM", 0.0) / b["total_us"]
        out[name] = s
    return out


def target_rows(doc: dict) -> list:
    """The whole-model targets against one result document: [{'model', 'gpu', 'measure', 'measured', 'target',
    'met'}].

    ``measured`` is None where the run has no number for it (a failed or skipped measurement)."""
    s, rows = doc["summary"], {r["setting"]: r for r in doc["settings"]}
    mx = [r for r in doc["settings"] if r["impl"] == "mxmoe" and "error" not in r]

    def block_ms(name, tokens="512"):
        v = rows.get(name, {}).get("block", {}).get(tokens, {}).get("graph", {})
        return v.get("ms")

    syncs = [r["syncs"].get("experts_forward") for r in mx]
    syncs = None if not syncs or any(x is None for x in syncs) else max(syncs)
    fp8, wo4 = block_ms("torch fp8 grouped"), block_ms("mxmoe 4.25 (w-only)")
    out = [
        ("host syncs per experts forward (max over mxmoe settings)", syncs, "== 0", lambda v: v == 0),
        (
            "experts forward under sync-debug 'error'",
            all(r["syncs"].get("experts_forward_error_mode") == "ok" for r in mx) if mx else None,
            "raises nothing",
            lambda v: v is True,
        ),
        (
            "MoE block 512 tok captured: 4.25-bit vs bf16",
            s.get("mxmoe 4.25 (w-only)", {}).get("block_512_graph_speedup"),
            ">= 1.8",
            lambda v: v >= 1.8,
        ),
        (
            "MoE block 512 tok captured: 4.25-bit vs torch fp8 grouped",
            fp8 / wo4 if fp8 and wo4 else None,
            ">= 1.2",
            lambda v: v >= 1.2,
        ),
        (
            "decode batch 16 captured: 3.25-bit vs bf16",
            s.get("mxmoe 3.25 (w-only)", {}).get("decode_16_graph_speedup"),
            ">= 2.0",
            lambda v: v >= 2.0,
        ),
    ]
    for key in (f"{b}x{n}" for b, n in doc["sizes"]["prefill"]):
        out.append(
            (
                f"prefill {key} captured: 4.25-bit share of the Amdahl bound",
                s.get("mxmoe 4.25 (w-only)", {}).get(f"prefill_{key}_of_amdahl"),
                ">= 0.9",
                lambda v: v >= 0.9,
            )
        )
    out.append(
        (
            "expert weight bytes: 3.25-bit vs bf16",
            s.get("mxmoe 3.25 (w-only)", {}).get("expert_bytes_vs_bf16"),
            "<= 0.22",
            lambda v: v <= 0.22,
        )
    )
    for k, v in doc.get("pipeline", {}).items():
        if k.endswith("_s"):
            out.append((f"pipeline stage {k[:-2]} (s)", v, "<= 1200", lambda x: x <= 1200))
    return [
        {
            "model": doc["model"],
            "gpu": gpu_of(doc),
            "measure": m,
            "measured": v,
            "target": t,
            "met": None if v is None else bool(ok(v)),
        }
        for m, v, t, ok in out
    ]


def run_files(folder: Path) -> "list[Path]":
    """The whole-model result documents in ``folder`` (``<model>_<GPU>.json``), not the streamed-calibration
    runs beside them (``<model>_streamed_<GPU>.json``, ``mxmoe.bench.streamed``)."""
    return sorted(f for f in folder.glob("*_NVIDIA_*.json") if "_streamed_" not in f.name)


def gpu_of(doc: dict) -> str:
    """Short name of the GPU a result document was measured on ('H100', 'H200', ...)."""
    return gpu_key(doc["provenance"]["device"]).removeprefix("nvidia_").upper()


def validate_doc(doc: dict) -> None:
    """Raise ValueError naming the first missing or malformed field of a results document."""
    missing = [k for k in DOC_KEYS if k not in doc]
    if missing:
        raise ValueError(f"paper-models result lacks {missing}")
    if doc["schema"] != SCHEMA_VERSION:
        raise ValueError(f"schema {doc['schema']} != {SCHEMA_VERSION}")
    for k in ("device", "torch", "triton", "transformers", "git_commit"):
        if k not in doc["provenance"]:
            raise ValueError(f"provenance lacks {k!r}")
    if "kind" not in doc["routing"] or "reached_max_over_min" not in doc["routing"]:
        raise ValueError("routing must say which skew was imposed (kind) and what was reached")
    for r in doc["settings"]:
        lack = [k for k in SETTING_KEYS if k not in r]
        if lack:
            raise ValueError(f"setting {r.get('setting')!r} lacks {lack}")
        if r["setting"] not in SETTINGS:
            raise ValueError(f"unknown setting {r['setting']!r}")
        if not r["expert_bytes"] > 0:
            raise ValueError(f"setting {r['setting']!r}: expert_bytes must be positive")


def table(doc: dict) -> str:
    """A short text table of the summary (block and model speedups vs bf16 grouped_mm, memory, and the experts
    GEMMs' share of a batch-16 decode step's device time where the run profiled one)."""
    s = doc["summary"]
    cols = [
        "block_512_graph_speedup",
        "block_8192_graph_speedup",
        "prefill_1x512_graph_speedup",
        "prefill_4x2048_graph_speedup",
        "prefill_4x2048_of_amdahl",
        "decode_1_graph_speedup",
        "decode_16_graph_speedup",
        "decode_64_graph_speedup",
        "expert_bytes_vs_bf16",
        "decode_16_experts_gemm_share",
    ]
    short = ["blk512", "blk8k", "pf512", "pf8k", "pf8k/amd", "dec1", "dec16", "dec64", "bytes", "dec16exp"]
    lines = [
        f"{doc['model']} on {doc['provenance']['device']} (ratios vs {BASELINE}, captured)",
        f"{'setting':22s} " + " ".join(f"{c:>8s}" for c in short),
    ]
    for name, r in s.items():
        vals = [r.get(c) for c in cols]
        lines.append(
            f"{name:22s} " + " ".join(f"{v:8.2f}" if isinstance(v, (int, float)) else f"{'-':>8s}" for v in vals)
        )
    return "\n".join(lines)


def run(
    name: str,
    out: "str | Path",
    settings=None,
    reps: int = 10,
    budget_s: float = 540.0,
    pipeline: bool = False,
    check: bool = True,
    seed: int = 0,
    alloc_gpu: str = "nvidia_h200",
    device="cuda",
    sizes: "dict | None" = None,
) -> dict:
    """Build ``name`` at full size, check correctness, measure every setting, write ``<out>/<name>_<gpu>.json``.

    ``device="cpu"`` with ``SMOKE_SIZES`` is a dry run of the same code path on a tiny config (the
    Triton kernels under the interpreter; no graphs, no synchronisation counts): it tests the
    benchmark, it measures nothing worth reporting.
    """

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "mxmoe.bench.paper_models needs a CUDA GPU (it measures one); use --allocate-only on a CPU, "
            "or --smoke for a CPU dry run on a tiny config"
        )
    sizes = sizes or (FULL_SIZES if cuda else SMOKE_SIZES)
    dtype = torch.bfloat16 if cuda else torch.float32  # the kernel takes fp32 under the CPU interpreter
    t_start = time.time()
    deadline = t_start + budget_s
    settings = list(settings or SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    amaps, alloc_meta = {}, {}
    for s in settings:
        if "alloc" in SETTINGS[s]:
            amaps[s], d = load_allocation_map(name, s, alloc_gpu, out, solve=name not in MODEL_SHAPES)
            alloc_meta[s] = {
                k: d[k]
                for k in (
                    "r",
                    "budget_bits",
                    "scheme_set",
                    "granularity",
                    "gpu",
                    "batch_tokens",
                    "predicted",
                    "solve_seconds",
                    "time_kind",
                )
                if k in d
            }
            alloc_meta[s]["blocks_per_scheme"] = dict(Counter(r["scheme"] for r in d["rows"]))
            alloc_meta[s]["sensitivity_stand_in"] = d.get("sensitivity_stand_in")
    doc = {
        "schema": SCHEMA_VERSION,
        "model": name,
        "hf_id": MODEL_SHAPES.get(name, (None,))[0],
        "provenance": provenance(),
        "sizes": sizes,
        "settings": [],
        "allocation": alloc_meta,
    }
    if not cuda:
        doc["provenance"]["device"] = "cpu (dry run)"
    print(f"{name}: {doc['provenance']['device']}, torch {torch.__version__}", flush=True)
    if check:
        t0 = time.time()
        pick = [s for s in settings if SETTINGS[s].get("check")]
        try:
            doc["correctness"] = check_correctness(
                name, {s: amaps.get(s) for s in pick}, seed=seed, tokens=256 if cuda else 16, device=device
            )
        except Exception as err:  # noqa: BLE001 - recorded; the measurements still run
            doc["correctness"] = {"error": f"{type(err).__name__}: {str(err)[:400]}", "passed": False, "cases": {}}
        doc["correctness"]["seconds"] = time.time() - t0
        print("correctness:", json.dumps(doc["correctness"]["cases"]), flush=True)
    else:
        doc["correctness"] = {"skipped": True}
    _sync(device)
    t0 = time.time()
    model, routing = build_random(
        name,
        device=device,
        dtype=dtype,
        seed=seed,
        measured=embedded_profile(),
        **({} if cuda else {"calib_shape": (2, 32)}),
    )
    _sync(device)
    blocks = moe_blocks(model)
    n_params = sum(p.numel() for p in model.parameters())
    doc["build"] = {
        "seconds": time.time() - t0,
        "params": n_params,
        "moe_layers": len(blocks),
        "weight_gib_bf16": 2 * n_params / 2**30,
        "how": f"random N(0, 0.02^2) on {device}, no CPU copy",
    }
    bf16_bytes = bf16_expert_bytes(blocks)
    doc["build"]["expert_gib_bf16"] = bf16_bytes / 2**30
    print(f"built {n_params / 1e9:.2f} B params in {doc['build']['seconds']:.1f} s", flush=True)
    # inputs: prefill ids, block inputs as a real forward hands them over, and the routing reached
    g = torch.Generator(device=device).manual_seed(seed + 1)
    prefill = {
        (b, n): torch.randint(0, model.config.vocab_size, (b, n), device=device, generator=g)
        for b, n in sizes["prefill"]
    }
    model.set_experts_implementation("grouped_mm")
    binputs = {}
    for tokens in sizes["block_tokens"]:
        ids = torch.randint(
            0, model.config.vocab_size, (max(1, tokens // 2048), min(tokens, 2048)), device=device, generator=g
        )  # [B, S] with B * S = tokens
        binputs[tokens] = block_inputs(model, blocks, ids)
    reached = _reached_profile(model, blocks, prefill[tuple(sizes["prefill"][-1])])
    doc["routing"] = {
        "kind": routing["kind"],
        "source": routing["source"],
        "target_max_over_min": routing["max_over_min"],
        "reached_max_over_min": reached,
        "how": "fixed router logit bias per MoE layer fitted on random tokens (mxmoe.models.random_init)",
    }
    path = Path(out) / f"{name}_{device_slug(doc['provenance']['device'])}.json"
    partial = path.with_name(path.name + ".partial")  # the settings so far, should the run be cut short

    def keep_partial() -> None:
        write_text_atomic(partial, json.dumps({**doc, "partial": True}, indent=1, default=float))

    if pipeline:
        try:
            doc["pipeline"] = pipeline_stages(model, blocks, name)
        except Exception as err:  # noqa: BLE001 - recorded; the measurements still run
            doc["pipeline"] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        print("pipeline:", json.dumps(doc["pipeline"]), flush=True)
        keep_partial()
    inputs = {"block": binputs, "prefill": prefill}
    for s in tqdm(sorted(settings, key=RUN_ORDER.index), desc=name, unit="setting"):
        t0 = time.time()
        if t0 > deadline:
            doc["skipped_settings"] = doc.get("skipped_settings", []) + [s]
            print(f"{s}: skipped (time budget)", flush=True)
            continue
        if cuda and SETTINGS[s].get("scheme") == "bf16" and bf16_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
            doc["skipped_settings"] = doc.get("skipped_settings", []) + [s]
            print(f"{s}: skipped (a bf16 copy of the experts does not fit)", flush=True)
            continue
        try:
            nbytes = apply_setting(model, blocks, s, amaps.get(s))
            _sync(device)
            pack_s = time.time() - t0
            row = measure_setting(
                model,
                blocks,
                s,
                inputs,
                sizes,
                reps=reps,
                expert_bytes=nbytes,
                bf16_bytes=bf16_bytes,
                deadline=deadline,
            )
            row["pack_s"] = pack_s
            if SETTINGS[s]["impl"] == "torch_fp8":  # rows padded to 16 per group where the op demands it
                row["fp8_group_alignment"] = getattr(blocks[0].experts, "mxmoe_fp8_align", None)
        except Exception as err:  # noqa: BLE001 - a failed setting is reported, the others still run
            _sync(device)
            row = {
                "setting": s,
                "impl": SETTINGS[s]["impl"],
                "error": f"{type(err).__name__}: {str(err)[:400]}",
                "expert_bytes": 1,
                "expert_bytes_vs_bf16": float("nan"),
                "block": {},
                "prefill": {},
                "decode": {},
                "syncs": {},
                "peak_gib": None,
            }
        row["seconds"] = time.time() - t0
        doc["settings"].append(row)
        keep_partial()
        print(f"{s}: {row['seconds']:.0f} s {json.dumps({k: row[k] for k in ('block', 'syncs')})[:400]}", flush=True)
    doc["summary"] = summarize(doc)
    doc["wall_s"] = time.time() - t_start
    validate_doc(doc)
    write_text_atomic(path, json.dumps(doc, indent=1, default=float))
    partial.unlink(missing_ok=True)
    print(table(doc))
    print(f"wrote {path} in {doc['wall_s']:.0f} s")
    return doc


@torch.no_grad()
def _reached_profile(model, blocks: list, ids: torch.Tensor) -> list:
    """Max/min routed tokens per expert of every MoE layer in one forward of ``ids`` (None: an idle expert)."""
    counts = []
    hooks = [
        b.router.register_forward_hook(
            lambda m, a, o: counts.append(torch.bincount(o[2].reshape(-1), minlength=m.weight.shape[0]).cpu())
        )
        for b in blocks
    ]
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return [float(c.max() / c.min()) if c.min() > 0 else None for c in counts]


def output_dir(out: "str | None", smoke: bool) -> Path:
    """Where a run writes: ``out`` if given, else results/paper-models for a measurement and a fresh temporary
    folder for a ``--smoke`` dry run (its numbers measure nothing and must not land among the results)."""
    if out is not None:
        return Path(out)
    if smoke:
        return Path(tempfile.mkdtemp(prefix="mxmoe-smoke-"))
    return REPO_ROOT / "results" / "paper-models"


def main(argv=None) -> None:
    """Command line: see the module docstring."""

    ap = argparse.ArgumentParser(prog="mxmoe bench paper-models", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=f"a paper model ({', '.join(PAPER_CONFIGS)}); tiny-* with --smoke")
    ap.add_argument(
        "--out", default=None, help="results folder (default: results/paper-models; a temporary one with --smoke)"
    )
    ap.add_argument("--settings", nargs="*", default=None, help=f"subset of: {list(SETTINGS)}")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip remaining prefill/decode runs after this")
    ap.add_argument("--pipeline", action="store_true", help="also time the pipeline stages at full size")
    ap.add_argument("--no-check", action="store_true", help="skip the packed-vs-fake-quant correctness check")
    ap.add_argument("--allocate-only", action="store_true", help="solve the MxMoE allocations (CPU) and exit")
    ap.add_argument(
        "--gpu",
        default=None,
        help="cost table of the allocations (cost_tables/<gpu>.json; default: the GPU it runs on, "
        "nvidia_h200 for --allocate-only and --smoke)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU dry run of the code path (tiny sizes; set TRITON_INTERPRET=1; no timing worth reporting)",
    )
    args = ap.parse_args(argv)
    try:
        config_of(args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.smoke and not os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: --smoke runs the Triton kernels on the CPU: set TRITON_INTERPRET=1")
    gpu = args.gpu or allocation_gpu(args.allocate_only or args.smoke)
    if args.allocate_only:
        docs = solve_allocations(args.model, gpu, only=args.settings)
        for s, d in docs.items():
            print(
                f"{s}: {d['predicted']['bits']:.3f} bits, predicted {d['predicted']['T_ms']:.3f} ms, "
                f"solved in {d['solve_seconds']:.1f} s, {dict(Counter(r['scheme'] for r in d['rows']))}"
            )
        return
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True
    settings = args.settings
    if args.smoke and settings is None:  # torch's fp8 grouped GEMM has no CPU kernel
        settings = [s for s in SETTINGS if SETTINGS[s]["impl"] != "torch_fp8"]
    out = output_dir(args.out, args.smoke)
    run(
        args.model,
        out,
        settings,
        3 if args.smoke else args.reps,
        args.budget_s,
        args.pipeline,
        not args.no_check,
        alloc_gpu=gpu,
        device="cpu" if args.smoke else "cuda",
    )


def breakdown_rows(docs: list) -> "list[dict]":
    """One row per (model, GPU, setting, profiled call, kernel kind) of the runs that hold a kernel breakdown:
    milliseconds and the share of the call's device time (``mxmoe.bench.breakdown``)."""
    rows = []
    for d in docs:
        for r in d["settings"]:
            for call, b in r.get("breakdown", {}).items():
                for kind, us in b["by_kind"].items():
                    share = us / b["total_us"] if b["total_us"] else None
                    rows.append(
                        {
                            "model": d["model"],
                            "gpu": gpu_of(d),
                            "setting": r["setting"],
                            "call": call,
                            "kind": kind,
                            "ms": us / 1e3,
                            "share": share,
                        }
                    )
    return rows


def ceiling_rows(docs: list, baseline: str = BASELINE) -> "list[dict]":
    """One row per (model, GPU, profiled call, setting) of the runs that hold a kernel breakdown: the call's
    device time, its experts GEMMs' part, its speedup over ``baseline`` in device time, and the ceiling of that
    speedup if the setting's experts GEMMs took no time at all (``baseline`` total / the setting's rest)."""
    rows = []
    for d in docs:
        base = {
            c: b["total_us"]
            for r in d["settings"]
            if r["setting"] == baseline
            for c, b in r.get("breakdown", {}).items()
        }
        for r in d["settings"]:
            for call, b in r.get("breakdown", {}).items():
                gemm = b["by_kind"].get("experts GEMM", 0.0)
                rest = b["total_us"] - gemm
                rows.append(
                    {
                        "model": d["model"],
                        "gpu": gpu_of(d),
                        "call": call,
                        "setting": r["setting"],
                        "device_ms": b["total_us"] / 1e3,
                        "experts_gemm_ms": gemm / 1e3,
                        "speedup": base[call] / b["total_us"] if call in base and b["total_us"] else None,
                        "ceiling": base[call] / rest if call in base and rest > 0 else None,
                    }
                )
    return rows


def allocation_gpu(on_cpu: bool) -> str:
    """The cost table a run's allocations default to: the GPU it runs on, or ``nvidia_h200`` on a CPU."""
    if on_cpu or not torch.cuda.is_available():
        return "nvidia_h200"
    return gpu_key(torch.cuda.get_device_name())


def allocation_table_of(doc: dict) -> "str | None":
    """The cost table (``nvidia_h100`` ...) a run's MxMoE allocations were solved against; None without any."""
    gpus = sorted({a["gpu"] for a in doc.get("allocation", {}).values()})
    if len(gpus) > 1:
        raise ValueError(f"{doc.get('model')}: allocations solved against several cost tables: {gpus}")
    return gpus[0] if gpus else None


def allocation_summary(models: list, gpu: str) -> "list[dict]":
    """One row per committed allocation of ``models`` solved against ``gpu``'s cost table: achieved bits,
    granularity, r, solve time and the number of blocks per scheme (short names, most used first)."""
    rows = []
    for m in models:
        for setting, spec in SETTINGS.items():
            if "alloc" not in spec:
                continue
            try:
                _, d = load_allocation_map(m, setting, gpu)
            except FileNotFoundError:
                continue
            counts: dict = {}
            for r in d["rows"]:
                counts[r["scheme"]] = counts.get(r["scheme"], 0) + 1
            mix = ", ".join(
                f"{s.replace('_asym', '').replace('_sym', '')} {n}"
                for s, n in sorted(counts.items(), key=lambda kv: -kv[1])
            )
            rows.append(
                {
                    "model": m,
                    "setting": setting,
                    "cost table": gpu,
                    "bits": round(d["predicted"]["bits"], 3),
                    "granularity": d["granularity"],
                    "r": d["r"],
                    "solve s (CPU)": round(d["solve_seconds"], 1),
                    "blocks per scheme": mix,
                }
            )
    return rows


if __name__ == "__main__":
    main()
