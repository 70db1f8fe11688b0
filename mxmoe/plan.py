"""The paper's settings as plain data: one place to change what the reproduction runs.

Run sizes per profile (``PROFILES``), the sensitivity and routing settings of chapters 01-02, the
allocations of chapter 04 (``ALLOCATIONS``) and what chapter 05 evaluates with them (Table 1 rows,
Table 3 granularities, Table 5 widths, the Figure 6 r sweep, the Figure 5 batches). Notebooks,
``mxmoe.prewarm``, the stages and the claims read these names; nothing here computes anything.

Changing Table 1 is an edit of ``TABLE1``; adding an allocation is a row of ``ALLOCATIONS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# ---------------------------------------------------------------------------------------------------
# Run sizes


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. ``None`` windows means the whole split."""

    name: str
    model: str
    calib_windows: int  # calibration windows (WikiText-2 train) for sensitivity and GPTQ
    calib_seqlen: int
    eval_windows: "int | None"  # WikiText-2 test windows for perplexity (None: the whole split)
    eval_seqlen: int
    routing_windows: int  # windows per corpus for routing profiles
    zeroshot_limit: "int | None"  # examples per lm-eval task (None: all)
    description: str

    def as_dict(self) -> dict:
        """JSON-ready parameters, stored with every result this profile produced."""
        return asdict(self)


PROFILES = {
    "smoke": Profile(
        "smoke",
        "tiny-qwen2-moe",
        calib_windows=2,
        calib_seqlen=64,
        eval_windows=2,
        eval_seqlen=64,
        routing_windows=2,
        zeroshot_limit=2,
        description="CI plumbing check: tiny random MoE, random token ids; numbers mean nothing",
    ),
    "quick": Profile(
        "quick",
        "smollm2-moe",
        calib_windows=8,
        calib_seqlen=512,
        eval_windows=4,
        eval_seqlen=1024,
        routing_windows=8,
        zeroshot_limit=10,
        description="2-core CPU: 8x512 calibration windows, 4x1024 WikiText-2 test windows, "
        "10 examples per task (accuracies are +-15 points: a run check, not a result)",
    ),
    # whole task sets take ~6 min per model on an H100 (lm-eval through the launch-bound fake-quant
    # forward): Table 1's seven models would not fit one GPU session, so 500 per task (±2.2 points)
    "full": Profile(
        "full",
        "smollm2-moe",
        calib_windows=128,
        calib_seqlen=512,
        eval_windows=None,
        eval_seqlen=1024,
        routing_windows=64,
        zeroshot_limit=500,
        description="one GPU: 128x512 calibration windows, the whole WikiText-2 test split, "
        "500 examples per zero-shot task",
    ),
}

# ---------------------------------------------------------------------------------------------------
# 01 sensitivity (Figure 1a, Table 4)

SENSITIVITY_METHODS = ("rtn", "gptq", "gptq-had")
SENSITIVITY_SCHEMES = "hopper"  # the scheme set every block is measured under (mxmoe.schemes.SCHEME_SETS)
FIG1A_SCHEMES = ("w8a8_g-1_sym", "w4a16_g128_asym", "w3a16_g128_asym", "w4a4_g-1_sym")
SUMMARY_SCHEME = "w4a4_g-1_sym"  # the layer x block summary
TABLE4_BITS = (4, 5, 6, 7, 8)  # weight bits x activation bits of the RTN grid

# ---------------------------------------------------------------------------------------------------
# 02 routing (Figure 1b)

# WikiText-2 test and C4 as in the paper; State of the Union addresses as the corpus "of a different
# kind": political speech from 1790 to 2021 differs in register from encyclopedia and web text, and,
# unlike Gutenberg (half of the windows that fitted smollm2-moe's routers), the routers never saw it.
ROUTING_CORPORA = ("wikitext2", "c4", "sotu")
ROUTING_SEQLEN = 512
BATCHES = (512, 8192)  # tokens per batch: kernel workloads (02), Figure 5 (05)

# ---------------------------------------------------------------------------------------------------
# 04 allocation


@dataclass(frozen=True)
class AllocationSetting:
    """One allocation: scheme set, bit budget, r, granularity and whether the budget is model-wide."""

    name: str
    scheme_set: str  # "weight_only" | "w5a5" | "fp8" (mxmoe.schemes.SCHEME_SETS)
    budget_bits: float
    r: float  # accuracy weight of L^r * T^(1-r)
    granularity: str = "block"  # "block" (gate, up, down each) | "expert" (one scheme per expert)
    global_budget: bool = False  # one budget over all layers instead of one per layer
    used_by: str = ""


ALLOCATION_METHOD = "gptq-had"  # sensitivity the allocations minimise
ALLOCATION_BATCH = 512  # batch whose routed tokens per expert time the blocks
ALLOCATION_CORPUS = "wikitext2"  # routing profile
ALLOCATION_GPU = "nvidia_h100"  # cost table cost_tables/<gpu>.json

ALLOCATIONS = (
    AllocationSetting("mxmoe-3.25", "weight_only", 3.25, 1.0, used_by="Table 1"),
    AllocationSetting("mxmoe-2.25", "weight_only", 2.25, 1.0, used_by="Table 1"),
    AllocationSetting("mxmoe-w5a5", "w5a5", 5.0, 0.75, used_by="Tables 1, 3, 5; Figures 5, 6"),
    AllocationSetting("mxmoe-w5a5-expert", "w5a5", 5.0, 0.75, granularity="expert", used_by="Table 3"),
    AllocationSetting("mxmoe-w5a5-global", "w5a5", 5.0, 0.75, global_budget=True, used_by="chapter 04"),
    AllocationSetting("mxmoe-3.25-global", "weight_only", 3.25, 1.0, global_budget=True, used_by="chapter 04"),
    AllocationSetting("mxmoe-fp8-4.25", "fp8", 4.25, 0.75, used_by="chapter 05, fp8 extension"),
)
R_FRONT = (0.0, 0.25, 0.5, 0.75, 1.0)  # r values marked on the W5A5 Pareto front
FRONT_SCHEME_SET, FRONT_BUDGET = "w5a5", 5.0

# ---------------------------------------------------------------------------------------------------
# 05 end to end (Tables 1, 3, 5; Figures 5, 6)

TABLE1_BASELINES = ("fp16", "gptq*-3.25", "gptq*-2.25", "quarot-w4a4")  # mxmoe.baselines.BASELINES names
TABLE1_MXMOE = {
    "mxmoe-3.25": "mxmoe-3.25",
    "mxmoe-2.25": "mxmoe-2.25",
    "mxmoe-w5a5": "mxmoe-w5a5",
}  # label -> allocation
TABLE3 = {"linear block": "mxmoe-w5a5", "expert": "mxmoe-w5a5-expert"}  # granularity -> allocation
TABLE5_BITS = (4, 5, 6, 7, 8)  # uniform w<b>a<b> with rotation
# the proxy check (mxmoe.stages.proxy): one layer RTN-quantized at a time with each of these schemes,
# the per-channel/group and 2/3/4-bit choices the weight-only allocations trade against each other
PROXY_SCHEMES = (
    "w2a16_g-1_asym",
    "w2a16_g128_asym",
    "w3a16_g-1_asym",
    "w3a16_g128_asym",
    "w4a16_g-1_asym",
    "w4a16_g128_asym",
)
PROXY_WINDOWS = {"smoke": 2, "quick": 2, "full": 16}  # WikiText-2 validation windows per profile


@dataclass(frozen=True)
class CalibratedSetting:
    """An allocation of the calibrated-Δ extension (``mxmoe.stages.calibrated``) and the Table 1 rows it is set
    beside: the uniform baseline of the same budget and the paper's allocation."""

    label: str
    name: str  # allocation setting (alloc/<name>.json)
    budget_bits: float
    uniform: str  # mxmoe.baselines.BASELINES name
    paper: str  # TABLE1_MXMOE label


# an extension beside the paper's rows: Δ rescaled to the proxy check's measured whole-model damage, the proxy
# schemes only, one budget per model; each also quantized with RTN, as are its two comparison rows
CALIBRATED = (
    CalibratedSetting("mxmoe-2.25 calibrated", "mxmoe-2.25-calibrated", 2.25, "gptq*-2.25", "mxmoe-2.25"),
    CalibratedSetting("mxmoe-3.25 calibrated", "mxmoe-3.25-calibrated", 3.25, "gptq*-3.25", "mxmoe-3.25"),
)
# an extension for Hopper: fp8 activations everywhere, as torch's fp8 grouped GEMM (the peer a Hopper user picks
# instead) computes; uniform w8a8 fp8 (RTN, what that GEMM serves), uniform per-channel W4A8 fp8 and an allocation
# over the "fp8" scheme set (both GPTQ after a rotation), each with its MoE-block time from the cost table
FP8_BASELINES = ("w8a8-fp8", "w4a8-fp8")  # mxmoe.baselines.BASELINES names; the first is the speed reference
FP8_MXMOE = "mxmoe-fp8-4.25"  # allocation setting
R_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)  # Figure 6 (W5A5 scheme set, 5-bit budget)
FIG5_UNIFORM = {"fp16": "bf16", "w4a16": "w4a16_g128_asym", "w8a8": "w8a8_g-1_sym", "w4a4": "w4a4_g-1_sym"}
FIG5_MIXED = "mxmoe-w5a5"
THROUGHPUT_GPU = "nvidia_h100"  # cost table of the predicted throughput


def allocation(name: str) -> AllocationSetting:
    """The allocation setting called ``name`` (``ALLOCATIONS``), or a KeyError naming the settings."""
    for a in ALLOCATIONS:
        if a.name == name:
            return a
    raise KeyError(f"unknown allocation setting {name!r}; settings: {[a.name for a in ALLOCATIONS]}")
