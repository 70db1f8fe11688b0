"""An MoE that does not fit one GPU, spread over several: MxMoE's stages, prefill and memory per GPU.

``mxmoe bench multi-gpu --model qwen3-235b --gpus 4`` builds Qwen3-235B-A22B from its public config
(``mxmoe.models.paper.LARGE_CONFIGS``: 94 layers of 128 experts, top-8, 235 B parameters, 438 GiB in
bf16; not a model of the paper) with random weights over N GPUs: the decoder layers are split in
balanced contiguous runs (``mxmoe.models.placement.layer_device_map``), every weight is created and
drawn on its own GPU (``build_random(device_map=...)``), routing is skewed like the embedded model's
measured profile, and accelerate's hooks move the activations from GPU to GPU. Then:

* stage ``pipeline``: the routing profile (16 x 512 tokens); one MoE layer's batched GPTQ
  sensitivity (4096 tokens, the weight-only scheme set) on its GPU and its projection to all layers;
  the allocation ILP for all layers (the 3.25- and 4.25-bit settings, ``paper_models.solve_allocations``)
  on this host's CPU, in a separate process while the GPUs work;
* stage ``settings``: first the packed path against the fake-quant path on the model cut to one
  layer per GPU (``paper_models.check_correctness``), then for bf16 (transformers' ``grouped_mm``),
  fp8 everywhere (torch's rowwise-e4m3 grouped GEMM, and the mxmoe kernel's w8a8 fp8) and MxMoE
  4.25 / 3.25 bits (the allocations committed under ``results/paper-models/alloc``, solved on a CPU
  with a stand-in sensitivity): packing time, expert bytes, bytes held on each GPU, whole-model
  prefill of 1 x 512 and 4 x 2048 tokens, peak memory on each GPU and the smallest GPU count the
  setting needs.

Each layer's packed experts live and run on that layer's GPU (the kernels make the tensors' GPU
current before they launch). Packed settings free each layer's bf16 experts once packed and the next
setting draws them again from the seed (``paper_models.apply_setting(lean=True)``), so the bf16
model and one packed copy never sit side by side.

**Timing.** Eager forwards, timed on the host clock between synchronisations of every GPU: a
forward that crosses GPUs is not captured in one CUDA graph here, and layers run one GPU after the
other (no pipelining), which is how accelerate runs a model placed this way. Speedups are against
bf16 on the same GPUs in the same process.

**Smallest GPU count** (``min_gpus``): the placement units (embeddings, each decoder layer, norm and
LM head) with the bytes they hold under the setting (measured: every tensor a unit holds, packed
storage included, by storage) are filled in order into GPUs of usable memory = total memory -
``RESERVE_GIB`` (CUDA context, allocator slack) - the activation headroom measured in this run (the
largest increase over the bytes held on any GPU during the 4 x 2048 prefill); the count of GPUs
that takes is reported with the numbers it came from. Prefill runs without a KV cache.

**Invocations.** The device machine allows 10 minutes per command, so the run is resumable: each
invocation rebuilds the model, reads ``<out>/multi-gpu/<model>_<N>x_<gpu>.json``, does only what it
lacks (``--force`` starts afresh), starts a setting only when the longest setting so far still fits in
``--budget-s``, writes the file after every step and says what is left; rerun the same command until
it prints ``complete``. ``--dry-run`` is the whole
flow on a tiny config over two CPU placements (kernels under the Triton interpreter): it tests the
code, it measures nothing worth reporting.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mxmoe.bench.paper_models import (
    BASELINE,
    FULL_SIZES,
    SETTINGS,
    _reached_profile,
    apply_setting,
    bf16_expert_bytes,
    cases_pass,
    check_correctness,
    config_of,
    load_allocation_map,
    pipeline_stages,
    provenance,
    solve_allocations,
    time_eager,
)
from mxmoe.env import cache_dir
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.kernels.group_gemm import INTERPRET, ExpertGroup
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.paper import MODEL_SHAPES
from mxmoe.models.placement import execution_device, input_device, placement_units
from mxmoe.models.random_init import build_random, drop_expert_weights
from mxmoe.models.zoo import TINY_CONFIGS
from mxmoe.paths import REPO_ROOT
from mxmoe.stages.routing import embedded_profile

SCHEMA_VERSION = 1
DEFAULT_MODEL, DRY_MODEL = "qwen3-235b", "tiny-qwen3-moe"
MULTI_SETTINGS = (
    "bf16 grouped_mm",
    "torch fp8 grouped",
    "mxmoe w8a8 fp8",
    "mxmoe 4.25 (w-only)",
    "mxmoe 3.25 (w-only)",
)
STAGES = ("pipeline", "settings")
PREFILL = {"full": FULL_SIZES["prefill"], "dry": [[1, 16], [2, 16]]}  # (batch, length): 512 and 8192 tokens
RESERVE_GIB = 2.0  # per GPU, outside what PyTorch allocates: CUDA context, allocator slack
DOC_KEYS = ("schema", "kind", "model", "hf_id", "devices", "provenance", "build", "stages", "settings", "summary")
ROW_KEYS = ("setting", "impl", "expert_bytes", "expert_bytes_vs_bf16", "pack_s", "held_gib", "prefill", "min_gpus")


# ---- memory: what each placement unit holds, and how few GPUs would hold it ----------------------


def _flatten(obj):
    """The tensors of a packed-experts attribute: ExpertGroups, PackedWeights, tuples of tensors."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, ExpertGroup):
        for pw in obj.packed:
            yield from (t for t in (pw.data, pw.scale, pw.zero) if t is not None)
        yield from (obj.addr, obj.act_slot)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten(o)


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes ``module`` holds: its parameters and buffers that are not meta, and the packed experts the
    benchmark attaches (``mxmoe_groups``, ``mxmoe_fp8``); each storage counted once, whole."""
    seen, total = set(), 0
    for m in module.modules():
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        tensors += [t for attr in ("mxmoe_groups", "mxmoe_fp8") for t in _flatten(getattr(m, attr, None))]
        for t in tensors:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def unit_bytes(model) -> "list[dict]":
    """[{'name', 'kind', 'device', 'bytes'}] of every placement unit, in the order activations flow."""
    return [
        {"name": name, "kind": kind, "device": str(execution_device(m)), "bytes": held_bytes(m)}
        for name, m, kind in placement_units(model)
    ]


def min_gpus(sizes: "list[int]", capacity: int, headroom: int, reserve: int = int(RESERVE_GIB * 2**30)) -> dict:
    """The fewest GPUs of ``capacity`` bytes that hold units of ``sizes`` bytes placed in order (contiguous
    runs, as a device map places them), each GPU keeping ``reserve`` + ``headroom`` bytes free.

    Filling in order is optimal for contiguous runs. Returns {'gpus' (None when a unit alone does not
    fit), 'per_gpu_gib', 'usable_gib', 'capacity_gib', 'headroom_gib', 'reserve_gib', 'total_gib'}.
    """
    usable = capacity - reserve - headroom
    out = {
        "usable_gib": usable / 2**30,
        "capacity_gib": capacity / 2**30,
        "headroom_gib": headroom / 2**30,
        "reserve_gib": reserve / 2**30,
        "total_gib": sum(sizes) / 2**30,
    }
    if usable <= 0 or not sizes or max(sizes) > usable:
        return {**out, "gpus": None, "per_gpu_gib": None}
    fills = [0]
    for b in sizes:
        if fills[-1] + b > usable:
            fills.append(0)
        fills[-1] += b
    return {**out, "gpus": len(fills), "per_gpu_gib": [f / 2**30 for f in fills]}


def _layer_runs(units: list) -> dict:
    """{device: [first layer, last layer]} of the decoder layers each device holds."""
    layers = [u for u in units if u["kind"] == "layer"]
    out: dict = {}
    for i, u in enumerate(layers):
        out.setdefault(u["device"], [i, i])[1] = i
    return out


def _by_device(units: list) -> dict:
    out: dict = {}
    for u in units:
        out[u["device"]] = out.get(u["device"], 0) + u["bytes"]
    return {d: b / 2**30 for d, b in out.items()}


# ---- arguments, devices and the result file --------------------------------------------------------


def check_args(args) -> "list[torch.device]":
    """Check every flag before anything is built; returns the devices. MxMoEError on the first bad one."""
    if args.gpus < 1:
        raise MxMoEError(f"--gpus must be 1 or more, got {args.gpus}")
    if args.reps < 1:
        raise MxMoEError(f"--reps must be 1 or more, got {args.reps}")
    if args.budget_s <= 0:
        raise MxMoEError(f"--budget-s must be positive, got {args.budget_s}")
    try:
        config = config_of(args.model)
    except ValueError as e:
        raise MxMoEError(str(e)) from None
    bad = [s for s in args.settings or [] if s not in MULTI_SETTINGS]
    if bad:
        raise MxMoEError(f"unknown settings {bad}; choose from {list(MULTI_SETTINGS)}")
    if args.dry_run:
        if args.model not in TINY_CONFIGS:
            raise MxMoEError(f"--dry-run runs on the CPU: use a tiny config ({', '.join(TINY_CONFIGS)})")
        if not INTERPRET:
            raise MxMoEError("--dry-run runs the Triton kernels on the CPU: set TRITON_INTERPRET=1")
        if "torch fp8 grouped" in (args.settings or []):
            raise MxMoEError("torch's fp8 grouped GEMM has no CPU kernel: leave 'torch fp8 grouped' out of --dry-run")
        return [torch.device("cpu")] * args.gpus
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < args.gpus:
        raise MxMoEError(
            f"--gpus {args.gpus} asks for {args.gpus} CUDA GPUs and this machine has {have}; "
            "use a machine with that many, fewer --gpus, or --dry-run for the CPU test of the code"
        )
    devices = [torch.device("cuda", i) for i in range(args.gpus)]
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    cap = min(torch.cuda.get_device_properties(d).total_memory for d in devices)
    need = 2 * params / (cap - RESERVE_GIB * 2**30)
    if need > args.gpus * 0.97:  # the bf16 model is built first: it must fit with a little room to run
        raise MxMoEError(
            f"the bf16 model ({2 * params / 2**30:.0f} GiB) does not fit {args.gpus} GPUs of {cap / 2**30:.0f} GiB "
            f"with room to run: use --gpus {int(need / 0.97) + 1} or more"
        )
    tiny = args.model in TINY_CONFIGS  # a tiny config's allocations are solved when it runs
    missing = [s for s in _settings(args) if "alloc" in SETTINGS[s] and not tiny and not _alloc_ready(args, s)]
    if missing:
        raise MxMoEError(
            f"no committed allocation for {missing} of {args.model}: solve them on a CPU first with "
            f"mxmoe bench paper-models --model {args.model} --allocate-only --gpu {args.alloc_gpu}"
        )
    return devices


def _alloc_ready(args, setting: str) -> bool:
    try:
        load_allocation_map(args.model, setting, args.alloc_gpu)
        return True
    except FileNotFoundError:
        return False


def _settings(args) -> list:
    chosen = args.settings or [s for s in MULTI_SETTINGS if not (args.dry_run and SETTINGS[s]["impl"] == "torch_fp8")]
    return sorted(chosen, key=MULTI_SETTINGS.index)


def result_path(out: "str | Path", model: str, devices: list) -> Path:
    """``<out>/multi-gpu/<model>_<N>x_<gpu>.json`` (gpu: the first device's name, lower case)."""
    d = devices[0]
    kind = torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"
    return Path(out) / "multi-gpu" / f"{model}_{len(devices)}x_{kind.lower().replace(' ', '_')}.json"


def _fresh_doc(model: str, devices: list, seed: int) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "kind": "multi-gpu",
        "model": model,
        "hf_id": MODEL_SHAPES.get(model, (None,))[0],
        "seed": seed,
        "devices": {
            "count": len(devices),
            "kind": torch.cuda.get_device_name(devices[0]) if devices[0].type == "cuda" else "cpu (dry run)",
        },
        "provenance": provenance([d for d in devices if d.type == "cuda"] or None),
        "build": {},
        "stages": {},
        "settings": [],
        "summary": {},
        "invocations": [],
    }


def load_doc(path: Path, model: str, devices: list, seed: int, force: bool) -> dict:
    """The result file of an earlier invocation with the same model, device count, kind and seed (to
    continue it), else a fresh document."""
    fresh = _fresh_doc(model, devices, seed)
    if force or not path.exists():
        return fresh
    old = json.loads(path.read_text())
    same = (old.get("schema"), old.get("model"), old.get("devices"), old.get("seed")) == (
        SCHEMA_VERSION,
        model,
        fresh["devices"],
        seed,
    )
    return old if same else fresh


def validate_doc(doc: dict) -> None:
    """Raise ValueError naming the first missing or malformed field of a multi-GPU result document."""
    missing = [k for k in DOC_KEYS if k not in doc]
    if missing:
        raise ValueError(f"multi-gpu result lacks {missing}")
    if doc["schema"] != SCHEMA_VERSION or doc["kind"] != "multi-gpu":
        raise ValueError(f"not a multi-gpu result of schema {SCHEMA_VERSION}")
    for k in ("count", "kind"):
        if k not in doc["devices"]:
            raise ValueError(f"devices lacks {k!r}")
    for k in ("device", "torch", "triton", "transformers", "git_commit"):
        if k not in doc["provenance"]:
            raise ValueError(f"provenance lacks {k!r}")
    for r in doc["settings"]:
        if "error" in r:
            continue
        lack = [k for k in ROW_KEYS if k not in r]
        if lack:
            raise ValueError(f"setting {r.get('setting')!r} lacks {lack}")
        if r["setting"] not in MULTI_SETTINGS or not r["expert_bytes"] > 0:
            raise ValueError(f"setting {r['setting']!r}: unknown, or no expert bytes")


# ---- the stages --------------------------------------------------------------------------------------


def _sync_all(devices: list) -> None:
    for d in dict.fromkeys(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _cuda(devices: list) -> list:
    return [d for d in dict.fromkeys(devices) if d.type == "cuda"]


def solve_timed(name: str, gpu: str, only: list) -> dict:
    """Solve the allocations ``only`` of ``name`` for all layers into a scratch folder; their seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        docs = solve_allocations(name, gpu, out=tmp, only=only)
        return {
            "allocation_s": time.perf_counter() - t0,
            "allocation_per_setting_s": {s: d["solve_seconds"] for s, d in docs.items()},
            "allocation_cpu_count": os.cpu_count(),
        }


def run_pipeline(name: str, model, blocks: list, amaps: dict, alloc_gpu: str, dry: bool) -> dict:
    """Routing profile, one layer's sensitivity (projected), the ILP for all layers; seconds of each.

    The ILP runs on this host's CPU in a separate process while the GPUs run the other two (it
    needs no GPU; its seconds are its own wall time, from the committed allocations' inputs)."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    ilp = pool.submit(solve_timed, name, alloc_gpu, list(amaps))
    try:
        out = pipeline_stages(
            model,
            blocks,
            name,
            free=lambda: [drop_expert_weights(b) for b in blocks[1:]],  # room for the batched GPTQ on layer 0's GPU
            shape=(4, 16) if dry else (16, 512),
        )
        out["sensitivity_layer_device"] = str(execution_device(blocks[0].module))
        try:
            out.update(ilp.result(), allocation_layers=len(blocks))
        except Exception as err:  # noqa: BLE001 - a missing solver is reported, the rest still counts
            out["allocation_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        pool.shutdown(cancel_futures=True)
    return out


@torch.no_grad()
def measure_setting(model, blocks: list, name: str, amap, ids: dict, devices: list, reps: int) -> dict:
    """Pack ``name``, then bytes per GPU, prefill of each size and the smallest GPU count; one result row."""
    cuda = _cuda(devices)
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    nbytes = apply_setting(model, blocks, name, amap, lean=True)
    _sync_all(devices)
    if cuda:
        torch.cuda.empty_cache()
    units = unit_bytes(model)
    row = {
        "setting": name,
        "impl": SETTINGS[name]["impl"],
        "pack_s": time.perf_counter() - t0,
        "expert_bytes": nbytes,
        "expert_bytes_vs_bf16": nbytes / bf16_expert_bytes(blocks),
        "held_gib": _by_device(units),
        "allocated_gib": {str(d): torch.cuda.memory_allocated(d) / 2**30 for d in cuda} or None,
        "pack_peak_gib": {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in cuda} or None,
        "units": [{k: u[k] for k in ("name", "device", "bytes")} for u in units],
        "prefill": {},
    }
    headroom = 0
    for (bsz, length), x in ids.items():
        before = {d: torch.cuda.memory_allocated(d) for d in cuda}
        for d in cuda:
            torch.cuda.reset_peak_memory_stats(d)
        fn = lambda x=x: model(input_ids=x, use_cache=False, logits_to_keep=1)  # noqa: E731
        e = time_eager(fn, reps, warmup=2 if cuda else 1, device=list(dict.fromkeys(devices)))
        peak = {d: torch.cuda.max_memory_allocated(d) for d in cuda}
        act = max((peak[d] - before[d] for d in cuda), default=None)
        headroom = max(headroom, act or 0)
        row["prefill"][f"{bsz}x{length}"] = {
            "tokens": bsz * length,
            "eager": e,
            "tokens_per_s": bsz * length / (e["ms"] / 1e3),
            "peak_gib": {str(d): v / 2**30 for d, v in peak.items()} or None,
            "activation_gib": None if act is None else act / 2**30,
        }
    if cuda:
        cap = min(torch.cuda.get_device_properties(d).total_memory for d in cuda)
        row["min_gpus"] = min_gpus([u["bytes"] for u in units], cap, headroom)
    else:
        row["min_gpus"] = {"gpus": None, "why": "no GPU memory on a CPU dry run"}
    return row


def summarize(doc: dict) -> dict:
    """Per setting: prefill speedups vs bf16 on the same GPUs, expert bytes vs bf16, most GiB held on one
    GPU, largest peak on one GPU, smallest GPU count."""
    rows = {r["setting"]: r for r in doc["settings"] if "error" not in r}
    base = rows.get(BASELINE)
    out = {}
    for name, r in rows.items():
        s = {
            "expert_bytes_vs_bf16": r["expert_bytes_vs_bf16"],
            "max_held_gib_per_gpu": max(r["held_gib"].values()),
            "min_gpus": r["min_gpus"].get("gpus"),
        }
        peaks = [v for p in r["prefill"].values() for v in (p.get("peak_gib") or {}).values()]
        s["max_peak_gib_per_gpu"] = max(peaks) if peaks else None
        for key, p in r["prefill"].items():
            s[f"prefill_{key}_ms"] = p["eager"]["ms"]
            b = base["prefill"].get(key, {}).get("eager", {}).get("ms") if base else None
            s[f"prefill_{key}_speedup"] = b / p["eager"]["ms"] if b else None
        out[name] = s
    return out


def target_rows(doc: dict) -> list:
    """The targets against one result: [{'measure', 'measured', 'target', 'met'}] (met None: not measured)."""
    s = doc["summary"]
    total = sum(i["wall_s"] for i in doc.get("invocations", []))
    complete = not _left(doc, doc.get("planned_settings", []))
    rows = [
        (
            f"all stages on {doc['devices']['count']} GPUs, every invocation (s)",
            total if complete else None,
            "<= 1800",
            lambda v: v <= 1800,
        ),
        (
            "MxMoE 3.25-bit: smallest GPU count",
            s.get("mxmoe 3.25 (w-only)", {}).get("min_gpus"),
            "<= 2",
            lambda v: v <= 2,
        ),
    ]
    for name in MULTI_SETTINGS[1:]:
        for key in s.get(name, {}):
            if key.endswith("_speedup"):
                rows.append((f"{name}: {key} vs bf16, same GPUs", s[name][key], "reported", None))
    return [
        {"measure": m, "measured": v, "target": t, "met": None if v is None or ok is None else bool(ok(v))}
        for m, v, t, ok in rows
    ]


def _left(doc: dict, planned: list) -> list:
    """What an invocation still has to do: the pipeline stage, then each planned setting not measured."""
    done = {r["setting"] for r in doc["settings"] if "error" not in r}
    todo = [] if "pipeline" in doc["stages"] else ["pipeline"]
    return todo + [s for s in planned if s not in done]


def table(doc: dict) -> str:
    """A short text table of the summary."""
    keys = [f"{b}x{n}" for b, n in doc.get("prefill_sizes", PREFILL["full"])]
    cols = [(f"prefill_{k}_ms", f"{k} ms", "{:10.1f}") for k in keys]
    cols += [(f"prefill_{k}_speedup", f"x {k}", "{:8.2f}") for k in keys]
    cols += [
        ("expert_bytes_vs_bf16", "bytes", "{:6.3f}"),
        ("max_held_gib_per_gpu", "GiB/GPU", "{:8.1f}"),
        ("min_gpus", "min GPUs", "{:8d}"),
    ]
    lines = [
        f"{doc['model']} on {doc['devices']['count']} x {doc['devices']['kind']} (eager; ratios vs {BASELINE})",
        f"{'setting':22s} " + " ".join(f"{h:>{len(f.format(0))}s}" for _, h, f in cols),
    ]
    for name, r in doc["summary"].items():
        cells = [f.format(r[k]) if r.get(k) is not None else "-".rjust(len(f.format(0))) for k, _, f in cols]
        lines.append(f"{name:22s} " + " ".join(cells))
    return "\n".join(lines)


def run(args, devices: list) -> dict:
    """One invocation (module doc): build over ``devices``, do what the result file lacks, write it."""
    t_start = time.time()
    deadline = t_start + args.budget_s
    dry = args.dry_run
    out = Path(
        args.out or (cache_dir() / "bench" / "multi-gpu-dry-run" if dry else REPO_ROOT / "results" / "paper-models")
    )
    path = result_path(out, args.model, devices)
    doc = load_doc(path, args.model, devices, args.seed, args.force)
    doc["provenance"] = provenance(_cuda(devices) or None)  # the latest invocation's
    if dry:
        doc["provenance"]["device"] = "cpu (dry run)"
    settings = _settings(args)
    doc["planned_settings"] = sorted(set(doc.get("planned_settings", [])) | set(settings), key=MULTI_SETTINGS.index)
    stages = STAGES if args.stage == "all" else (args.stage,)
    amaps = {}
    for s in settings:
        if "alloc" in SETTINGS[s]:
            amaps[s], _ = load_allocation_map(args.model, s, args.alloc_gpu, out, solve=args.model in TINY_CONFIGS)
    dtype = torch.float32 if dry else torch.bfloat16
    print(f"{args.model} over {len(devices)} x {doc['devices']['kind']}; result file {path}", flush=True)
    invocation = {"stage": args.stage, "commit": doc["provenance"]["git_commit"], "date": doc["provenance"]["date_utc"]}

    def save():
        doc["summary"] = summarize(doc)
        doc["targets"] = target_rows(doc)
        validate_doc(doc)
        write_json_atomic(path, doc)

    done = {r["setting"] for r in doc["settings"] if "error" not in r}
    todo = [st for st in stages if st == "pipeline" and "pipeline" not in doc["stages"]]
    todo += [x for x in settings if "settings" in stages and x not in done]
    if not todo:  # nothing left for the stages asked: no 1-2 minute build for nothing
        print(f"{path}: nothing left to do for {args.stage} (--force redoes it)")
        return doc
    checked = doc["stages"].get("correctness", {}).get("cases", {})
    pick = [x for x in ("mxmoe 4.25 (w-only)", "mxmoe 3.25 (w-only)") if x in settings and x not in checked]
    if "settings" in stages and (pick or "correctness" not in doc["stages"]):
        t0 = time.time()
        try:
            new = check_correctness(
                args.model, {x: amaps[x] for x in pick}, seed=args.seed, tokens=16 if dry else 256, device_map=devices
            )
            new["cases"] = {**checked, **new["cases"]}  # settings checked by an earlier invocation stay
            new["passed"] = cases_pass(new["cases"])
        except Exception as err:  # noqa: BLE001 - recorded; the measurements still run
            new = {"error": f"{type(err).__name__}: {str(err)[:400]}", "passed": False, "cases": checked}
        new["seconds"] = time.time() - t0 + doc["stages"].get("correctness", {}).get("seconds", 0)
        doc["stages"]["correctness"] = new
        print("correctness:", json.dumps(new.get("cases")), flush=True)
        save()
    _sync_all(devices)
    t0 = time.time()
    model, routing = build_random(
        args.model,
        device_map=devices,
        dtype=dtype,
        seed=args.seed,
        measured=embedded_profile(),
        **({"calib_shape": (2, 32)} if dry else {}),
    )
    _sync_all(devices)
    blocks = moe_blocks(model)
    n_params = sum(p.numel() for p in model.parameters())
    units = unit_bytes(model)
    doc["build"] = {
        "seconds": time.time() - t0,
        "params": n_params,
        "moe_layers": len(blocks),
        "weight_gib_bf16": 2 * n_params / 2**30,
        "expert_gib_bf16": bf16_expert_bytes(blocks) / 2**30,
        "held_gib": _by_device(units),
        "layers_per_device": _layer_runs(units),
        "how": "random N(0, 0.02^2), each weight created and drawn on its own device; accelerate hooks",
    }
    print(f"built {n_params / 1e9:.1f} B parameters over {len(devices)} devices in {doc['build']['seconds']:.0f} s")
    g = torch.Generator(device=input_device(model)).manual_seed(args.seed + 1)
    sizes = PREFILL["dry" if dry else "full"]
    doc["prefill_sizes"] = sizes
    ids = {
        (b, n): torch.randint(0, model.config.vocab_size, (b, n), device=input_device(model), generator=g)
        for b, n in sizes
    }
    model.set_experts_implementation("grouped_mm")
    doc["routing"] = {
        "kind": routing["kind"],
        "source": routing["source"],
        "target_max_over_min": routing["max_over_min"],
        "reached_max_over_min": _reached_profile(model, blocks, ids[tuple(sizes[-1])]),
    }
    save()
    if "pipeline" in stages and "pipeline" not in doc["stages"]:
        t0 = time.time()
        try:
            doc["stages"]["pipeline"] = run_pipeline(args.model, model, blocks, amaps, args.alloc_gpu, dry)
        except Exception as err:  # noqa: BLE001 - recorded; the settings still run
            doc["stages"]["pipeline"] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        doc["stages"]["pipeline"]["seconds"] = time.time() - t0
        print("pipeline:", json.dumps(doc["stages"]["pipeline"]), flush=True)
        save()
    if "settings" in stages:
        for s in tqdm(settings, desc=args.model, unit="setting"):
            if s in done:
                continue
            longest = max((r.get("seconds", 0) for r in doc["settings"]), default=0)
            if time.time() + longest > deadline:  # would not finish in time: the next invocation does it
                print(f"{s}: not started (--budget-s {args.budget_s:.0f}; a setting took up to {longest:.0f} s)")
                continue
            t0 = time.time()
            try:
                row = measure_setting(model, blocks, s, amaps.get(s), ids, devices, args.reps)
            except Exception as err:  # noqa: BLE001 - a failed setting is reported, the others still run
                row = {"setting": s, "impl": SETTINGS[s]["impl"], "error": f"{type(err).__name__}: {str(err)[:400]}"}
            row["seconds"] = time.time() - t0
            doc["settings"] = [r for r in doc["settings"] if r["setting"] != s] + [row]
            doc["settings"].sort(key=lambda r: MULTI_SETTINGS.index(r["setting"]))
            print(f"{s}: {row['seconds']:.0f} s", flush=True)
            save()
    invocation["wall_s"] = time.time() - t_start
    doc["invocations"].append(invocation)
    left = _left(doc, doc["planned_settings"])
    doc["complete"] = not left
    save()
    print(table(doc))
    print(f"wrote {path} in {invocation['wall_s']:.0f} s; " + (f"left: {left} (rerun)" if left else "complete"))
    return doc


def main(argv=None) -> int:
    """Command line (module doc); bad input prints one line and returns 2."""
    ap = argparse.ArgumentParser(prog="mxmoe bench multi-gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"default {DEFAULT_MODEL} ({DRY_MODEL} with --dry-run)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to spread it over (default 4; CPU placements: 2)")
    ap.add_argument("--stage", default="all", choices=["all", *STAGES], help="what to do (default: all that is left)")
    ap.add_argument("--settings", nargs="*", default=None, help=f"subset of: {list(MULTI_SETTINGS)}")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards per prefill size, median (default 5; 1 dry)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="finish by this many seconds: a setting starts only if the longest one so far still fits",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alloc-gpu", default="nvidia_h200", help="cost table of the committed allocations")
    ap.add_argument("--out", default=None, help="results folder (default results/paper-models; dry run: the cache)")
    ap.add_argument("--force", action="store_true", help="start a fresh result file (redo everything)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="the whole flow on a tiny config over CPU placements (TRITON_INTERPRET=1)",
    )
    args = ap.parse_args(argv)
    args.model = args.model or (DRY_MODEL if args.dry_run else DEFAULT_MODEL)
    args.gpus = args.gpus if args.gpus is not None else (2 if args.dry_run else 4)
    args.reps = args.reps if args.reps is not None else (1 if args.dry_run else 5)
    try:
        devices = check_args(args)
    except MxMoEError as e:
        print(f"mxmoe bench multi-gpu: error: {e}", file=sys.stderr)
        return 2
    run(args, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
