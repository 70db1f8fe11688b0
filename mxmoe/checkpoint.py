"""The mxmoe checkpoint: a folder with a mixed-precision MoE that loads back as a transformers model.

Layout of ``DIR``::

    config.json                          the base model's config, unchanged (+ generation_config.json)
    mxmoe.json                           format, version, base model (id, sha256 of its weights), the scheme of
                                         every (layer, expert, block), bits achieved, recipe, cost table, package
    model.safetensors                    or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                         (shards of ~2 GB, the transformers index format)
    tokenizer files                      when the base model has a tokenizer

Tensors: every full-precision weight under its transformers name, except the expert weights that
mxmoe stores per block. A block (layer L, expert e — an int, or ``sharedN`` —, block gate|up|down)
is stored under ``mxmoe.L.e.block.`` as

* ``codes``  uint8 [b, ceil(N·K / 8)]: bit plane i holds bit i of every code ``u`` (row-major over
  [N, K]); ``u = q + 2^(b-1)`` on symmetric grids, ``u = q`` on asymmetric ones, the e4m3 bit pattern for e4m3
  weights (8-bit fp8 schemes; narrower fp8 schemes store symmetric integer codes);
* ``scale``  [N, G] (float16 for grouped schemes, float32 per channel), ``zero`` [N, G] (asymmetric only);
* ``weight`` [N, K] in the model's dtype when the block stays full precision (fused routed experts only:
  a full-precision shared expert keeps its transformers name).

The bit planes are dense (exactly b bits per weight, no padding) and independent of the kernel's
in-memory layout; ``load_quantized`` repacks them with ``mxmoe.kernels.pack``.

Writes are atomic: the folder is written as ``.DIR.tmp-<pid>`` beside DIR and renamed at the end,
so a killed run never leaves a folder that loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mxmoe.env import default_device
from mxmoe.errors import MxMoEError
from mxmoe.models import load_model, smollm2
from mxmoe.models.blocks import BLOCKS, mlp_linear, moe_blocks
from mxmoe.packed import PackedBlock, PackedExperts, QuantLinear, register
from mxmoe.quant.apply import scheme_map_from_rows, scheme_map_to_rows
from mxmoe.quant.rtn import IntWeight
from mxmoe.schemes import Scheme

FORMAT = "mxmoe-checkpoint"
VERSION = 1
MANIFEST = "mxmoe.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_BYTES = 2 * 1024**3
PREFIX = "mxmoe"


class CheckpointError(MxMoEError):
    """A folder that is not a (complete, readable) mxmoe checkpoint, or one that does not fit the model given."""


def is_checkpoint(path: "str | Path") -> bool:
    """True when ``path`` is a folder with an ``mxmoe.json``."""
    return (Path(path) / MANIFEST).is_file()


# ---- the base model's identity ------------------------------------------------------------------


@torch.no_grad()
def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and persistent buffer (name, shape, float32 bytes), in name order.

    Taken as float32 so the same weights hash alike whatever dtype they were loaded in.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_id(name: str, model: nn.Module) -> str:
    """What cached results of model ``name`` are keyed by, so that other weights under the same name are measured
    again: a smollm2 build's identity (``smollm2.build_id``, the same on every machine, whose builds differ only in
    the last bits of float reductions), else the sha256 of ``model``'s weights."""
    if name in smollm2.NAMES:
        return "build " + smollm2.build_id(smollm2.recipe(name))
    return weights_sha256(model)


def check_base(manifest: dict, model: nn.Module, name: str) -> None:
    """Raise CheckpointError when ``model`` (called ``name``) is not the base the checkpoint was quantized from."""
    want = manifest["base"]["sha256"]
    have = weights_sha256(model)
    if have != want:
        raise CheckpointError(
            f"the checkpoint was quantized from weights sha256 {want[:12]}… "
            f"({manifest['base']['id']}), but {name} has {have[:12]}…: pass the model it was made from"
        )


# ---- codes as dense bit planes ---------------------------------------------------------------------


def _codes_of(iw: IntWeight) -> torch.Tensor:
    """Unsigned codes u [N, K] int32 of an IntWeight (see the module doc)."""
    s = iw.scheme
    if s.fp8_weight:
        return iw.q.float().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    return iw.q.to(torch.int32) + ((1 << (s.w_bits - 1)) if s.symmetric else 0)


def to_planes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes u [N, K] in [0, 2^bits) -> uint8 bit planes [bits, ceil(N·K / 8)] (little-endian bits in a byte)."""
    flat = u.reshape(-1).to(torch.int32)  # [N*K]
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))  # [8 * bytes]
    weights = 1 << torch.arange(8, dtype=torch.int32, device=u.device)  # [8]
    planes = [(((flat >> i) & 1).view(-1, 8) * weights).sum(dim=1) for i in range(bits)]  # each [bytes]
    return torch.stack(planes).to(torch.uint8)


def from_planes(planes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 bit planes [bits, ceil(N·K / 8)] -> codes u [N, K] int32 (inverse of ``to_planes``)."""
    shifts = torch.arange(8, dtype=torch.int32, device=planes.device)  # [8]
    bits = (planes.to(torch.int32)[:, :, None] >> shifts) & 1  # [b, bytes, 8]
    bits = bits.reshape(planes.shape[0], -1)[:, : n * k]  # [b, N*K]
    place = (1 << torch.arange(planes.shape[0], dtype=torch.int32, device=planes.device))[:, None]  # [b, 1]
    return (bits * place).sum(dim=0).reshape(n, k).to(torch.int32)


def block_tensors(iw: IntWeight) -> dict:
    """The stored tensors of one quantized block: codes, scale and (asymmetric grids) zero."""
    s = iw.scheme
    stored = torch.float16 if s.group_size > 0 else torch.float32
    out = {"codes": to_planes(_codes_of(iw), s.w_bits), "scale": iw.scale.to(stored).contiguous()}
    if not s.symmetric:
        out["zero"] = iw.zero.to(stored).contiguous()
    return out


def block_int_weight(tensors: dict, scheme: Scheme, n: int, k: int, where: str) -> IntWeight:
    """The IntWeight [N, K] back from ``block_tensors`` output; CheckpointError when shapes disagree."""
    codes, scale = tensors.get("codes"), tensors.get("scale")
    g = -(-k // scheme.effective_group(k))
    if codes is None or scale is None or (not scheme.symmetric and tensors.get("zero") is None):
        raise CheckpointError(f"{where}: tensors {sorted(tensors)} do not hold a '{scheme}' block")
    if tuple(codes.shape) != (scheme.w_bits, -(-n * k // 8)) or tuple(scale.shape) != (n, g):
        raise CheckpointError(
            f"{where}: stored codes {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit a "
            f"'{scheme}' weight [{n}, {k}]"
        )
    u = from_planes(codes, n, k)  # [N, K]
    if scheme.fp8_weight:
        q = u.to(torch.uint8).view(torch.float8_e4m3fn).float()
    else:
        q = u - ((1 << (scheme.w_bits - 1)) if scheme.symmetric else 0)
    scale = scale.float()
    zero = tensors["zero"].float() if not scheme.symmetric else torch.zeros_like(scale)
    return IntWeight(q, scale, zero, scheme)


def block_key(layer: int, expert, block: str) -> str:
    """Tensor-name prefix of one block: ``mxmoe.<layer>.<expert>.<block>``."""
    return f"{PREFIX}.{layer}.{expert}.{block}"


def _parse_expert(text: str):
    return int(text) if text.isdigit() else text


# ---- writing ---------------------------------------------------------------------------------------


def checkpoint_tensors(
    model: nn.Module, scheme_map: dict, int_weights: dict, dtype: "torch.dtype | None" = None
) -> tuple[dict, dict]:
    """(tensors to store, tied names {dropped: kept}) of a quantized model.

    ``scheme_map`` {(layer, expert, block): Scheme}; ``int_weights`` the IntWeight of every quantized
    key (as the model holds the weight). Fused routed experts are stored per block; quantized linear
    blocks (shared experts) replace their ``.weight``. ``dtype``: full-precision weights are stored in
    it (default: as the model holds them); codes, scales and zero points never change.
    """
    plan = {k: Scheme.parse(s) for k, s in scheme_map.items()}
    missing = [k for k, s in plan.items() if not s.is_full_precision and k not in int_weights]
    if missing:
        raise MxMoEError(f"no integer weights for {len(missing)} quantized blocks, e.g. {missing[0]}")
    skip, out = set(), {}
    names = {id(m): n for n, m in model.named_modules()}
    for b in moe_blocks(model):
        if b.fused:
            skip |= {f"{names[id(b.experts)]}.gate_up_proj", f"{names[id(b.experts)]}.down_proj"}
            for e in range(b.num_experts):
                for name in BLOCKS:
                    s = plan.get((b.layer, e, name))
                    key = block_key(b.layer, e, name)
                    if s is None or s.is_full_precision:
                        out[f"{key}.weight"] = _as(b.expert_weight(e, name).detach(), dtype)
                    else:
                        out.update({f"{key}.{t}": v for t, v in block_tensors(int_weights[b.layer, e, name]).items()})
        linears = [(e, i, mlp_linear(m, n), n) for i, m in enumerate(b.shared) for e in [f"shared{i}"] for n in BLOCKS]
        if not b.fused:
            linears += [(e, e, mlp_linear(b.experts[e], n), n) for e in range(b.num_experts) for n in BLOCKS]
        for e, _, lin, name in linears:
            s = plan.get((b.layer, e, name))
            if s is not None and not s.is_full_precision:
                skip.add(f"{names[id(lin)]}.weight")
                out.update(
                    {
                        f"{block_key(b.layer, e, name)}.{t}": v
                        for t, v in block_tensors(int_weights[b.layer, e, name]).items()
                    }
                )
    seen, tied = {}, {}
    for n, t in model.state_dict().items():
        if n in skip:
            continue
        ptr = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and ptr in seen:  # tied weights (e.g. lm_head = embeddings) are stored once
            tied[n] = seen[ptr]
            continue
        seen[ptr] = n
        out[n] = _as(t.detach(), dtype)
    return {k: v.cpu() for k, v in out.items()}, tied


def _as(t: torch.Tensor, dtype: "torch.dtype | None") -> torch.Tensor:
    """A contiguous full-precision tensor in ``dtype`` (unchanged when None or not floating point)."""
    return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()


def _shards(tensors: dict, shard_bytes: int) -> list:
    """Tensor names split into consecutive shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards, cur, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    return shards + ([cur] if cur else [])


def check_out_dir(out: "str | Path", overwrite: bool = False) -> Path:
    """Validate an output folder before any work: new, or an mxmoe checkpoint with ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise MxMoEError(f"--out {out} exists and is not a folder")
        if is_checkpoint(out) and not overwrite:
            raise MxMoEError(f"--out {out} already holds an mxmoe checkpoint; pass --overwrite to replace it")
        if not is_checkpoint(out) and any(out.iterdir()):
            raise MxMoEError(f"--out {out} exists, is not empty and is not an mxmoe checkpoint; choose a new folder")
    if not out.parent.exists():
        raise MxMoEError(f"--out {out}: its parent folder {out.parent} does not exist")
    return out


def save_checkpoint(
    out: "str | Path",
    model: nn.Module,
    scheme_map: dict,
    int_weights: dict,
    manifest: dict,
    *,
    base_config=None,
    tokenizer=None,
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    dtype: "torch.dtype | None" = None,
    progress: bool = True,
) -> Path:
    """Write a quantized model as an mxmoe checkpoint folder ``out``, atomically; returns the path.

    ``manifest``: the recipe fields of mxmoe.json (format, version and the scheme rows are added
    here). ``base_config``: the base model's config as it was before quantization (default: the
    model's). ``dtype``: of the full-precision weights (default: the model's; bfloat16 halves an
    fp32 model's non-expert bytes, and the loaded logits then differ by bf16 rounding). Writes ``.out.tmp-<pid>`` beside ``out`` and renames it; on any error nothing is left.
    """
    from safetensors.torch import save_file

    out = check_out_dir(out, overwrite)
    tensors, tied = checkpoint_tensors(model, scheme_map, int_weights, dtype)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = copy.deepcopy(base_config if base_config is not None else model.config)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:  # eos / pad ids and sampling defaults
            model.generation_config.save_pretrained(tmp)
        groups = _shards(tensors, shard_bytes)
        files = (
            [SINGLE]
            if len(groups) == 1
            else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        )
        for f, names in tqdm(list(zip(files, groups)), desc="save", unit="shard", disable=not progress):
            save_file({n: tensors[n] for n in names}, str(tmp / f), metadata={"format": "pt"})
        if len(files) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {n: f for f, ns in zip(files, groups) for n in ns},
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            **manifest,
            "tied": tied,
            "files": files,
            "schemes": scheme_map_to_rows({k: v for k, v in scheme_map.items()}),
        }
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")  # last: a folder without it is not a checkpoint
        _readable(tmp)
        if out.exists():  # an old checkpoint (overwrite): move it aside, swap, then delete it
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readable(folder: Path) -> None:
    """Give the folder and its files the usual permissions (safetensors writes its files owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


# ---- reading ---------------------------------------------------------------------------------------


def read_manifest(path: "str | Path") -> dict:
    """mxmoe.json of a checkpoint folder, checked; CheckpointError for anything that is not a complete checkpoint."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: expected an mxmoe checkpoint written by `mxmoe quantize`")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} is not an mxmoe checkpoint (no {MANIFEST}); write one with `mxmoe quantize MODEL --out DIR`"
        )
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / MANIFEST} is not an mxmoe checkpoint manifest (format {doc.get('format') if isinstance(doc, dict) else None!r})"
        )
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {doc.get('version')!r}; this mxmoe reads "
            f"version {VERSION} and older: upgrade mxmoe"
        )
    for key in ("base", "schemes", "files", "online_hadamard"):
        if key not in doc:
            raise CheckpointError(f"{path / MANIFEST} lacks the field {key!r}")
    missing = [f for f in doc["files"] + ["config.json"] if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is incomplete: {', '.join(missing)} missing")
    return doc


def _load_tensors(path: Path, files: list, device: torch.device) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in files:
        try:
            out.update(load_file(str(path / f), device=str(device)))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path / f} cannot be read ({str(e).splitlines()[0][:200]})") from None
    return out


def _empty_model(config, dtype: torch.dtype):
    """The model class of ``config`` with parameters on the meta device (buffers real, e.g. rotary)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _pop_block(tensors: dict, layer: int, expert, name: str) -> dict:
    prefix = block_key(layer, expert, name) + "."
    return {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on a CPU (exactly the in-memory quantized model), bfloat16 on a GPU (the kernel's input)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_device_schemes(schemes, device: torch.device) -> None:
    """CheckpointError when ``device`` cannot run a scheme: fp8 needs sm_89 or newer on a GPU."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    check_capability(schemes, cap, torch.cuda.get_device_name(device))


def check_capability(schemes, capability: tuple, gpu: str) -> None:
    """CheckpointError naming every scheme a GPU of compute ``capability`` cannot run (fp8 before sm_89)."""
    if tuple(capability) >= (8, 9):
        return
    fp8 = sorted({str(s) for s in map(Scheme.parse, schemes) if s.fmt == "fp8"})
    if fp8:
        raise CheckpointError(
            f"scheme{'s' if len(fp8) > 1 else ''} {', '.join(repr(s) for s in fp8)} "
            f"need{'' if len(fp8) > 1 else 's'} fp8 tensor cores (sm_89 or newer); {gpu} is "
            f"sm_{capability[0]}{capability[1]}: quantize for this GPU without fp8 schemes"
        )


@torch.no_grad()
def load_quantized(path: "str | Path", device=None, dtype: "torch.dtype | None" = None, device_map=None):
    """Load an mxmoe checkpoint folder as a transformers model whose experts run packed.

    ``device`` defaults to ``mxmoe.models.default_device()``; ``dtype`` to float32 on a CPU and
    bfloat16 on a GPU. ``device_map`` spreads the model over several devices instead: "auto" (every
    visible GPU), a list of devices, or an accelerate device map; the decoder layers are split in
    contiguous runs balanced by their packed bytes (``mxmoe.models.placement.layer_device_map``),
    each layer's packed experts live and run on its device, and accelerate's hooks move the
    activations. The tensors are read into host memory first, so the host must hold the checkpoint.
    Routed experts run through the kernel on a GPU (or under the Triton interpreter) and through
    ``reference_group_gemm`` on a CPU (``mxmoe.packed``). The manifest is ``model.mxmoe_manifest``.
    Raises CheckpointError for a folder that is not a complete checkpoint.
    """
    from transformers import AutoConfig

    from mxmoe.models.placement import as_device, dispatch, layer_device_map

    path = Path(path).expanduser()
    doc = read_manifest(path)
    if device_map is not None:
        if device_map == "auto":
            if not torch.cuda.is_available():
                raise CheckpointError("device_map='auto' spreads the model over the GPUs, and there is none here")
            device_map = list(range(torch.cuda.device_count()))
        places = sorted(
            {as_device(d) for d in (device_map.values() if isinstance(device_map, dict) else device_map)}, key=str
        )
        device = places[0]
    else:
        device = torch.device(device) if device is not None else default_device()
        places = [device]
    dtype = dtype or default_dtype(device)
    plan = scheme_map_from_rows(doc["schemes"])
    for d in places:
        check_device_schemes(set(plan.values()), d)
    config = AutoConfig.from_pretrained(path)
    for k, v in doc.get("config_overrides", {}).items():
        setattr(config, k, v)
    model = _empty_model(config, dtype)
    tensors = _load_tensors(path, doc["files"], device if device_map is None else torch.device("cpu"))
    hadamard = bool(doc["online_hadamard"])
    names = {id(m): n for n, m in model.named_modules()}

    def stored(layer, e, name, shape, float_ok: bool) -> "IntWeight | torch.Tensor | None":
        """A block's IntWeight, its float weight (full precision, when ``float_ok``), or None."""
        t = _pop_block(tensors, layer, e, name)
        s = plan.get((layer, e, name))
        where = f"{path.name}: layer {layer} expert {e} {name}"
        if s is None or s.is_full_precision:
            w = t.get("weight")
            if not float_ok:
                return None
            if w is None or tuple(w.shape) != tuple(shape):
                raise CheckpointError(f"{where}: no full-precision weight {list(shape)} stored")
            return w.to(dtype)
        return block_int_weight(t, s, shape[0], shape[1], where)

    for b in moe_blocks(model):
        if b.fused:
            experts = b.experts
            shapes = (tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape))  # [E, 2I, H], [E, H, I]
            _, two_i, h = shapes[0]
            gate_up, down = [], []
            for e in range(b.num_experts):
                g = stored(b.layer, e, "gate", (two_i // 2, h), True)
                u = stored(b.layer, e, "up", (two_i // 2, h), True)
                gate_up.append(PackedBlock.from_weight(_stack(g, u, f"layer {b.layer} expert {e}")))
                down.append(PackedBlock.from_weight(stored(b.layer, e, "down", (h, two_i // 2), True)))
            del experts.gate_up_proj, experts.down_proj
            # meta placeholders keep the layer readable by moe_blocks (shapes); they hold no memory
            experts.gate_up_proj = torch.empty(shapes[0], device="meta")
            experts.down_proj = torch.empty(shapes[1], device="meta")
            experts.mxmoe_packed = PackedExperts(gate_up, down, hadamard)
        linears = [(f"shared{i}", m) for i, m in enumerate(b.shared)]
        if not b.fused:
            linears += list(enumerate(b.experts))
        for e, mlp in linears:
            for name in BLOCKS:
                lin = mlp_linear(mlp, name)
                w = stored(b.layer, e, name, tuple(lin.weight.shape), False)
                if w is None:
                    continue
                bias = tensors.pop(f"{names[id(lin)]}.bias", None)
                attr = next(a for a, m in mlp.named_children() if m is lin)
                setattr(mlp, attr, QuantLinear(PackedBlock.from_weight(w), bias, hadamard and name == "down"))
    leftover = [k for k in tensors if k.startswith(PREFIX + ".")]
    if leftover:
        raise CheckpointError(f"{path.name}: stored blocks {leftover[:3]} have no place in the model")
    fp = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(fp, strict=False, assign=True)
    tied = doc.get("tied", {})
    if result.unexpected_keys:
        raise CheckpointError(f"{path.name}: tensors {result.unexpected_keys[:3]} are not in the model of config.json")
    for dropped, kept in tied.items():
        owner, _, attr = dropped.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    still = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still:
        raise CheckpointError(f"{path.name}: no stored tensor for {len(still)} weights, e.g. {still[:3]}")
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    if device_map is None:
        model.to(device)
    else:
        dispatch(model, device_map if isinstance(device_map, dict) else layer_device_map(model, device_map))
    model.set_experts_implementation(register())
    model.eval()
    model.mxmoe_manifest = doc
    return model


def _stack(g: "IntWeight | torch.Tensor", u: "IntWeight | torch.Tensor", where: str) -> "IntWeight | torch.Tensor":
    """gate and up [I, H] (same scheme) -> the fused gate_up [2I, H] the kernel runs as one GEMM."""
    if isinstance(g, IntWeight) != isinstance(u, IntWeight) or (isinstance(g, IntWeight) and g.scheme != u.scheme):
        raise CheckpointError(
            f"{where}: gate ({getattr(g, 'scheme', 'bf16')}) and up ({getattr(u, 'scheme', 'bf16')}) "
            "differ; the kernel runs them as one GEMM"
        )
    if not isinstance(g, IntWeight):
        return torch.cat([g, u])
    return IntWeight(torch.cat([g.q, u.q]), torch.cat([g.scale, u.scale]), torch.cat([g.zero, u.zero]), g.scheme)


def stored_bytes(path: "str | Path") -> dict:
    """{"total_bytes", "expert_bytes", "expert_weights"} of a checkpoint's tensors on disk.

    expert: the blocks stored under ``mxmoe.`` (every routed block, and quantized shared blocks);
    expert_weights: how many weights those blocks hold (a code plane of B bytes holds 8·B, up to 7 of padding).
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    total = expert = weights = 0
    for f in read_manifest(path)["files"]:
        with safe_open(str(path / f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * _DTYPE_BYTES[sl.get_dtype()]
                total += nbytes
                if k.startswith(PREFIX + "."):
                    expert += nbytes
                    weights += 8 * sl.get_shape()[1] if k.endswith(".codes") else n if k.endswith(".weight") else 0
    return {"total_bytes": total, "expert_bytes": expert, "expert_weights": weights}


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def load_tokenizer(path: "str | Path"):
    """The tokenizer saved in a checkpoint folder, or None when the base model had none."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)


def open_model(name: str, dtype=None, build: bool = True, device=None):
    """(model, tokenizer) of a name as the command line takes it: an mxmoe checkpoint folder loads through
    ``load_quantized`` (bf16 on a GPU, what the kernel takes), anything else through ``mxmoe.models.load_model``."""
    import torch

    path = Path(name).expanduser()
    dtype = dtype or torch.float32
    if path.exists() and is_checkpoint(path):
        device = torch.device(device) if device is not None else default_device()
        return load_quantized(path, device, dtype if device.type == "cpu" else None), load_tokenizer(path)
    return load_model(name, dtype=dtype, build=build, device=device)
