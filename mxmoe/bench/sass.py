"""What the compiler made of the grouped GEMM for a Hopper GPU, read without a GPU.

Triton compiles for any NVIDIA architecture on a machine without one, and its wheel carries
``ptxas`` and ``cuobjdump``. ``kernel_facts`` compiles ``group_gemm_kernel`` for one launch (its
slots' schemes and tile configs, exactly the constants ``mxmoe.kernels.group_gemm`` passes) for
sm_90a and reads the three outputs a Hopper kernel engineer reads:

* ptxas ``-v``: registers per thread, spill stores/loads, and warning C7515 ("wgmma.mma_async
  instructions are serialized"), which makes every MMA wait for the one before it;
* PTX: ``wgmma.mma_async`` count and the ``wgmma.wait_group N`` depths (only 0 = the dots are
  synchronous: Triton's pipeliner did not keep one in flight), ``cp.async`` (multi-buffered loads
  from global to shared memory) and ``cp.async.bulk.tensor`` (TMA);
* SASS: the K loop (the innermost backward branch around the warpgroup MMAs): its instruction
  count per iteration and its mix (MMA, global/shared loads, integer/logic, 16-bit and 32-bit
  floating point, conversions, barriers). For a weight-only slot, the loop's ALU instructions (integer,
  logic, 16/32-bit floating point, conversions; not MMA, loads or barriers) per 8 weight values a thread
  dequantizes per iteration (``alu_per_8``): the unpacking, scaling and address work that must fit under
  the memory time of a memory-bound kernel (Triton's own Hopper mxfp4 path spends about 14 on the upcast).

These are static facts: they explain a timing (or a missed target), they do not replace one.
``mxmoe bench sass`` tabulates them for every Hopper scheme at the default tiles of the three
benchmark sizes and writes ``results/kernels/sass_<arch>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from tqdm.auto import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mxmoe.bench.cases import MIXES
from mxmoe.errors import MxMoEError
from mxmoe.files import write_json_atomic
from mxmoe.kernels import gluon_kernel as gk
from mxmoe.kernels import triton_kernel as tk
from mxmoe.kernels.configs import TileConfig, default_config, kind_of
from mxmoe.kernels.group_gemm import ExpertGroup, Launch, launch_plan
from mxmoe.kernels.pack import pack
from mxmoe.paths import kernel_results_dir
from mxmoe.schemes import HOPPER_SCHEMES, Scheme

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Rows per expert at the benchmark sizes (16 / 512 / 8192 tokens, top-8 of 60-128 experts, skewed):
# the regimes default_config distinguishes (bm 16, 64, 128).
REGIMES = {"decode (16 tokens)": 2.0, "prefill 512": 34.0, "prefill 8192": 546.0}
# Every kernel path: the Hopper scheme set and the fp8 W4A8 schemes not yet in it.
SCHEMES = tuple(
    dict.fromkeys(HOPPER_SCHEMES + tuple(Scheme.parse(s) for s in ("w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8")))
)
# Instruction classes of the SASS mix (first matching prefix wins).
CLASSES = (
    ("mma", ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")),
    ("load_global", ("LDG", "LDGSTS")),
    ("load_shared", ("LDS", "LDSM")),
    ("store_shared", ("STS",)),
    ("sync", ("BAR", "DEPBAR", "WARPGROUP", "LDGDEPBAR", "ARRIVES", "SYNCS")),
    ("convert", ("F2F", "I2F", "F2I", "I2I", "F2FP")),
    ("fp16x2", ("HFMA2", "HADD2", "HMUL2", "HMNMX2")),
    ("fp32", ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP")),
    ("int_logic", ("LOP3", "PRMT", "SHF", "IADD3", "IMAD", "LEA", "ISETP", "SEL", "MOV", "IABS", "BMSK", "SGXT")),
)
_SIGNATURE = {
    "x_ptr": "*bf16",
    "xq_ptr": "*u8",
    "xs_ptr": "*fp32",
    "y_ptr": "*bf16",
    "off_ptr": "*i32",
    "sched_ptr": "*i32",
    "addr_ptr": "*i64",
    "E": "i32",
    "N": "i32",
    "K": "i32",
    "KP": "i32",
    "NG": "i32",
    "stride_xm": "i32",
    "stride_ym": "i32",
}
# Arguments the JIT marks 16-divisible at a real launch (aligned tensors; N, K and strides of the
# paper's shapes, multiples of 128): the same hints, so the offline compile is the launched kernel.
_ALIGNED = (
    *("x_ptr", "xq_ptr", "xs_ptr", "y_ptr", "off_ptr", "sched_ptr", "addr_ptr"),
    *("N", "K", "KP", "stride_xm", "stride_ym"),
)


@dataclass(frozen=True)
class Facts:
    """Static facts of one compiled launch (see the module docstring)."""

    slots: tuple
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    serialized_wgmma: bool
    wgmma: int
    wait_depths: tuple
    cp_async: int
    tma: int
    loop_instructions: "int | None"
    loop_mix: dict
    alu_per_8: "float | None"

    @property
    def async_wgmma(self) -> bool:
        """True when a warpgroup MMA stays in flight across another (some ``wgmma.wait_group N`` with N > 0)."""
        return any(d > 0 for d in self.wait_depths)

    def as_dict(self) -> dict:
        """JSON form."""
        return {
            "slots": [[s, c.as_dict()] for s, c in self.slots],
            "num_warps": self.num_warps,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "serialized_wgmma": self.serialized_wgmma,
            "wgmma": self.wgmma,
            "wait_depths": list(self.wait_depths),
            "async_wgmma": self.async_wgmma,
            "cp_async": self.cp_async,
            "tma": self.tma,
            "loop_instructions": self.loop_instructions,
            "loop_mix": self.loop_mix,
            "alu_per_8": self.alu_per_8,
        }


def compile_launch(
    slots: "list[tuple[Scheme, TileConfig]]", arch: int = 90, num_warps: "int | None" = None, experts=64
):
    """``group_gemm_kernel`` compiled for ``sm_<arch>`` (a for 90) with these slots, as ``group_gemm`` launches it
    (its warps and register cap)."""
    if not slots:
        raise ValueError("a launch needs at least one (scheme, tile config) slot")
    plan = [(Scheme.parse(s), c) for s, c in slots]
    sched = torch.zeros(experts, 2, dtype=torch.int32)  # [E', 2] (expert, slot): only its length counts here
    constants = dict(Launch.prepare(plan, sched, sched.device, 1, num_warps).meta)  # group_gemm's own arguments
    options = {k: constants.pop(k) for k in ("num_warps", "maxnreg") if k in constants}
    fn = tk.group_gemm_kernel
    signature = {**_SIGNATURE, **{k: "constexpr" for k in constants}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _ALIGNED}
    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    path = TOOLS / name
    if not path.exists():
        raise MxMoEError(f"{path} not found: this Triton wheel carries no NVIDIA tools; install triton from PyPI")
    return subprocess.run([str(path), *args], capture_output=True, text=True, check=True)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> "tuple[str, str]":
    """ptxas ``-v`` output (resources and warnings) and the SASS listing of ``ptx`` compiled for ``arch``."""
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        log = _tool("ptxas", "-v", f"--gpu-name={arch}", str(src), "-o", str(cubin)).stderr
        sass = _tool("cuobjdump", "-sass", str(cubin)).stdout
    return log, sass


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_instructions(sass: str) -> "list[tuple[int, str, str]]":
    """(address, opcode with modifiers, operands) of every instruction in a cuobjdump SASS listing."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _INSN.findall(sass)]


def k_loop(insns: "list[tuple[int, str, str]]") -> "list[tuple[int, str, str]]":
    """Instructions of the innermost loop that contains a matrix-multiply instruction (the K loop).

    A loop is a backward branch ``BRA target`` at address b > target; the K loop is the shortest
    [target, b] range holding an MMA. Empty when there is none (e.g. a slot with no dot)."""
    best = None
    for addr, op, rest in insns:
        m = re.match(r"(0x[0-9a-f]+)", rest.strip())
        if not op.startswith("BRA") or m is None or int(m.group(1), 16) >= addr:
            continue
        lo, hi = int(m.group(1), 16), addr
        body = [i for i in insns if lo <= i[0] <= hi]
        if any(_class(op2) == "mma" for _, op2, _ in body) and (best is None or len(body) < len(best)):
            best = body
    return best or []


def _class(op: str) -> str:
    base = op.split(".")[0]
    for name, prefixes in CLASSES:
        if base in prefixes:
            return name
    return "other"


def kernel_facts(slots: "list[tuple[Scheme, TileConfig]]", arch: int = 90, num_warps: "int | None" = None) -> Facts:
    """Compile one launch for ``sm_<arch>`` and read its registers, spills, MMA waits, loads and K loop."""
    compiled = compile_launch(slots, arch, num_warps)
    ptx = compiled.asm["ptx"]
    log, sass = ptxas_report(ptx, f"sm_{arch}a" if arch == 90 else f"sm_{arch}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    # one slot: its K loop; several: one K loop per slot, told apart by nothing in the SASS, so none is read
    loop = k_loop(sass_instructions(sass)) if len(slots) == 1 else []
    mix = dict(Counter(_class(op) for _, op, _ in loop))
    warps = compiled.metadata.num_warps
    alu = None
    if len(slots) == 1 and kind_of(Scheme.parse(slots[0][0])) in (tk.W_INT, tk.W_FP8) and loop:
        c = slots[0][1]
        values = c.bn * 128 / (32 * warps)  # weight values one thread dequantizes per 128-long K block
        work = sum(v for k, v in mix.items() if k in ("int_logic", "fp16x2", "fp32", "convert", "other"))
        alu = round(8 * work / values, 1)
    return Facts(
        slots=tuple((str(Scheme.parse(s)), c) for s, c in slots),
        num_warps=warps,
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=sum(spills),
        shared_bytes=int(compiled.metadata.shared),
        serialized_wgmma="C7515" in log or "serialized" in log,
        wgmma=ptx.count("wgmma.mma_async"),
        wait_depths=tuple(sorted({int(v) for v in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})),
        cp_async=len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
        tma=ptx.count("cp.async.bulk.tensor"),
        loop_instructions=len(loop) if loop else None,
        loop_mix=mix,
        alu_per_8=alu,
    )


def survey(schemes=SCHEMES, regimes=REGIMES, mixes=MIXES, arch: int = 90) -> list[dict]:
    """``kernel_facts`` of every scheme alone at its default tile for each rows-per-expert regime, then of
    the benchmark's mixed launches (``mxmoe.bench.cases.MIXES``) as ``launch_plan`` plans them (slots in launch
    order, heaviest tile first)."""
    rows = []
    for s in tqdm(schemes, desc="compile for sm_90a", unit="scheme"):
        for regime, rows_per_expert in regimes.items():
            c = default_config(s, rows_per_expert)
            rows.append({"scheme": str(s), "regime": regime, **kernel_facts([(s, c)], arch).as_dict()})
    for name, (heavy, light, _) in mixes.items():
        group = ExpertGroup([pack(torch.zeros(128, 128), s) for s in (heavy, light)])  # tiles: schemes and rows only
        for regime, rows_per_expert in regimes.items():
            slots = launch_plan(group, round(2 * rows_per_expert))  # the tiles group_gemm picks for the two slots
            rows.append({"scheme": name, "regime": regime, **kernel_facts(slots, arch).as_dict()})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of a survey."""
    head = "| scheme | regime | tile (bm×bn, stages, swap) | warps | regs | spill B | smem KiB | wgmma waits | C7515 | cp.async | loop insns | ALU insns per 8 weights |"
    out = [head, "|" + "---|" * 12]
    for r in rows:
        tiles = " + ".join(
            f"{c['bm']}×{c['bn']}, {c['stages']}, {'yes' if c['swap_ab'] else 'no'}" for _, c in r["slots"]
        )
        out.append(
            f"| {r['scheme']} | {r['regime']} | {tiles} "
            f"| {r['num_warps']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} "
            f"| {','.join(map(str, r['wait_depths'])) or '-'} | {'yes' if r['serialized_wgmma'] else 'no'} "
            f"| {r['cp_async']} | {r['loop_instructions'] or '-'} | {r['alu_per_8'] if r['alu_per_8'] is not None else '-'} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    """``mxmoe bench sass``: compile every kernel path's default tiles for sm_90a (no GPU needed) and
    write the facts to results/kernels/sass_sm90a.json, with a table on stdout."""
    p = argparse.ArgumentParser(prog="mxmoe bench sass", description=main.__doc__)
    p.add_argument("--schemes", default=None, help="comma-separated schemes (default: every kernel path's schemes)")
    p.add_argument("--out", default=None, help="output JSON (default: results/kernels/sass_sm90a.json)")
    args = p.parse_args(argv)
    try:
        schemes = SCHEMES if args.schemes is None else [Scheme.parse(s) for s in args.schemes.split(",")]
    except ValueError as e:
        raise MxMoEError(str(e)) from None
    rows = survey(schemes)
    ptxas = _tool("ptxas", "--version").stdout.strip().splitlines()[-1]
    doc = {
        "arch": "sm_90a",
        "triton": triton.__version__,
        "ptxas": ptxas,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "regimes": REGIMES,
        "rows": rows,
    }
    out = Path(args.out) if args.out else kernel_results_dir() / "sass_sm90a.json"
    write_json_atomic(out, doc)
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


# ---- the Gluon prototype (mxmoe.kernels.gluon_kernel) ---------------------------------------------

# the Triton kernel's arguments less the quantized activations' (weight-only schemes only), same types and hints
_GLUON_SIGNATURE = {a: t for a, t in _SIGNATURE.items() if a not in ("xq_ptr", "xs_ptr", "NG")}
_GLUON_ALIGNED = tuple(a for a in _ALIGNED if a in _GLUON_SIGNATURE)


def compile_gluon(
    bm: int = 64,
    stages: "int | tuple[int, int] | None" = None,
    *,
    group: int = 128,
    sym: bool = False,
    producer_warps: int = gk.PRODUCER_WARPS,
    producer_regs: int = gk.PRODUCER_REGS,
    depth: int = 0,
    fence: bool = True,
    operand: str = "registers",
    split: str = "rows",
    arch: int = 90,
    maxnreg: "int | None" = None,
):
    """The Gluon prototype compiled for sm_<arch>a without a GPU, with the constants ``gluon_group_gemm`` passes
    (``operand`` "registers": ``gluon_group_gemm_kernel``; "shared": ``gluon_shared_group_gemm_kernel``, stages a
    (ring, weight ring) pair, ``split`` how its two converters share the work); maxnreg defaults to the launch's.
    Returns Triton's CompiledKernel (``.asm["ttgir"]``, ``.asm["ptx"]``, ``.metadata.shared``)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    if gk.GLUON_ERROR is not None:
        raise RuntimeError(f"this Triton has no usable Gluon: {gk.GLUON_ERROR}")
    common = {"BM": bm, "GROUP": group, "SYM": sym, "PW": producer_warps, "PREGS": producer_regs, "FENCE": fence}
    if operand == "shared":
        ring, wring = stages or gk.shared_stages(bm)
        constants = {**common, "STAGES": ring, "WSTAGES": wring, "CREGS": gk.CONVERTER_REGS[split]}
        constants["USES"] = split == "uses"
        fn, maxnreg = gk.gluon_shared_group_gemm_kernel, maxnreg or gk.SHARED_MAXNREG
    else:
        constants = {**common, "STAGES": stages or gk.default_stages(bm), "DEPTH": depth}
        fn, maxnreg = gk.gluon_group_gemm_kernel, maxnreg or gk.MAXNREG
    signature = {**_GLUON_SIGNATURE, **{k: "constexpr" for k in constants}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _GLUON_ALIGNED}
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def gluon_facts(bm: int = 64, stages: "int | tuple[int, int] | None" = None, **kw) -> dict:
    """Static facts of one offline compile of the Gluon prototype (``compile_gluon`` arguments): ptxas registers (the kernel's
    count, the most any partition uses) and spills, ptxas's C751x notes (wgmma serialised, and why) and warnings, the
    ``setmaxnreg`` requests per partition, shared bytes, wgmma count and ``wgmma.wait_group`` depths, cp.async
    and mbarrier instructions, and the SASS size."""
    compiled = compile_gluon(bm, stages, **kw)
    ptx = compiled.asm["ptx"]
    log, sass = ptxas_report(ptx)
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    warnings = sorted({w.strip() for w in re.findall(r"warning[^\n]*", log)})
    return {
        "bm": bm,
        "stages": stages or (gk.shared_stages(bm) if kw.get("operand") == "shared" else gk.default_stages(bm)),
        **kw,
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": sum(spills),
        "setmaxnreg": re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx),
        "shared_bytes": int(compiled.metadata.shared),
        "serialized_wgmma": sorted(set(re.findall(r"\(C751\d\)[^\n]*?serialized due to [^\n]*?(?= for|$)", log))),
        "ptxas_warnings": warnings,
        "wgmma": ptx.count("wgmma.mma_async"),
        "wait_depths": sorted({int(v) for v in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}),
        "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
        "cp_async_mbarrier_arrive": ptx.count("cp.async.mbarrier.arrive"),
        "mbarrier_arrive": len(re.findall(r"mbarrier\.arrive\.", ptx)) - ptx.count("cp.async.mbarrier.arrive"),
        "fence_proxy_async": ptx.count("fence.proxy.async"),
        "bar_sync": len(re.findall(r"\bbar\.sync\b|barrier\.sync", ptx)),
        "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
    }
