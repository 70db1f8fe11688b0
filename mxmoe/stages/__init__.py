"""The pipeline's stages: one numbered notebook each, names in, result files out.

``STAGES`` is the one list of them. ``mxmoe.reproduce`` runs and skips notebooks by it, the claims
manifest maps paper items to notebooks and result files by it, and the pipeline figure draws it.
Each stage's functions live in this package (``model``, ``sensitivity``, ``routing``,
``allocation``, ``evaluate``, ``endtoend``, ``proxy``); only these, the benchmarks, the plots and the apps
touch ``results/``.

Paths in ``reads`` and ``items`` are globs relative to the results root; ``{model}`` is the model's
results folder and ``@repo/`` marks a path relative to the repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# the kernel's fingerprinted sources (mxmoe.kernels.version.SOURCES; a test holds them equal): what stage 04's
# cost-table timings depend on, without importing the kernels here
KERNEL_SOURCES = ("triton_kernel.py", "configs.py", "group_gemm.py", "act_quant.py", "pack.py")


@dataclass(frozen=True)
class Stage:
    """One notebook: what it is, the files it reads, the stages it needs and the paper items it shows."""

    stem: str  # notebook file name without .ipynb
    reads: tuple = ()  # result files and package modules whose change re-runs the notebook
    needs: tuple = ()  # stages whose notebooks must exist for this one to run
    title: str = ""  # box title in the pipeline figure
    summary: str = ""  # one to three short lines: what it computes
    items: dict = field(default_factory=dict)  # paper item -> (result globs, what our counterpart is)


# what every chapter reads to put the paper beside ours and give its verdicts
CHAPTER = (
    "@repo/mxmoe/claims/chapter.py",
    "@repo/mxmoe/claims/rules.py",
    "@repo/mxmoe/paper.py",
    "@repo/docs/paper_results.json",
)

STAGES = (
    Stage(
        "00_model",
        title="MoE model + calibration",
        summary="HF MoE or smollm2-moe;\nWikiText-2 train, C4",
        reads=(
            *CHAPTER,
            "{model}/model.json",
            "@repo/mxmoe/models/*.py",
            "@repo/mxmoe/models/healed/*/*",  # the healed files change what smollm2-moe(-v2) builds
            "@repo/mxmoe/stages/model.py",
        ),
        items={"table2": (["{model}/model.json"], "the models: smollm2-moe card and the paper models' shapes")},
    ),
    Stage(
        "01_sensitivity",
        title="01 sensitivity",
        summary="Δ[layer, expert, block, scheme]:\nMoE-block output error, one block\nquantized (RTN, GPTQ, +Hadamard)",
        reads=(
            *CHAPTER,
            "{model}/model.json",
            "@repo/mxmoe/sensitivity.py",
            "@repo/mxmoe/quant/*.py",
            "@repo/mxmoe/stages/sensitivity.py",
            "@repo/mxmoe/plots/accuracy.py",
        ),
        items={
            "fig1a": (["{model}/sensitivity/*.json"], "per-expert block sensitivity (Delta) of one layer, log scale"),
            "table4": (["{model}/**/table4*.json"], "RTN PPL grid over weight x activation bits"),
        },
    ),
    Stage(
        "02_activation_frequency",
        title="02 routing",
        summary="tokens per expert per layer\non several corpora",
        reads=(
            *CHAPTER,
            "{model}/model.json",
            "@repo/mxmoe/routing.py",
            "@repo/mxmoe/stages/routing.py",
            "@repo/mxmoe/plots/accuracy.py",
        ),
        items={
            "fig1b": (
                ["{model}/routing/*.json", "kernels/bench_*.json"],
                "right: per-expert frequencies on several corpora (02); left: roofline of the GPU (03)",
            )
        },
    ),
    Stage(
        "03_kernels",
        title="03 kernels",
        summary="Triton mixed-precision GroupGEMM,\none launch; tuned tiles and\nper-tile cost tables (Hopper)",
        reads=(
            *CHAPTER,
            "kernels/*.json",
            "@repo/cost_tables/*.json",
            "@repo/mxmoe/bench/runs.py",
            "@repo/mxmoe/plots/kernels.py",
        ),
        items={
            "fig2": (
                ["kernels/bench_*.json"],
                "grouped-GEMM throughput: bf16 loop, torch grouped, ours uniform and mixed",
            ),
            "fig4": (["kernels/bench_*.json", "@repo/cost_tables/*.json"], "tile configurations fused in one launch"),
            "table6": (["kernels/bench_*.json"], "fused vs unified vs one launch per precision"),
        },
    ),
    Stage(
        "04_allocation",
        title="04 allocation",
        summary="per layer: min L^r · T^(1−r)\ns.t. bit budget; exact Pareto\nfront with PuLP/CBC",
        reads=(
            *CHAPTER,
            "{model}/sensitivity/*.json",
            "{model}/routing/*.json",
            "kernels/*.json",
            "@repo/cost_tables/*.json",
            "@repo/mxmoe/allocate.py",
            "@repo/mxmoe/perfmodel.py",
            # tile choices the model times, and the kernel the cost table is held to (kernels.version.SOURCES)
            *(f"@repo/mxmoe/kernels/{name}" for name in KERNEL_SOURCES),
            "@repo/mxmoe/plan.py",
            "@repo/mxmoe/stages/allocation.py",
            "@repo/mxmoe/plots/allocation.py",
        ),
        needs=("01_sensitivity", "02_activation_frequency"),
        items={
            "table7": (["{model}/alloc/*.json", "{model}/**/table7*.json"], "W5A5 allocation of one layer as a map")
        },
    ),
    Stage(
        "05_end_to_end",
        title="05 end-to-end",
        summary="GPTQ + Hadamard per allocation;\nPPL, zero-shot, block throughput\nthrough the real kernel",
        reads=(
            *CHAPTER,
            "{model}/alloc/*.json",
            "{model}/sensitivity/*.json",
            "{model}/routing/*.json",
            "kernels/*.json",
            "@repo/cost_tables/*.json",
            "@repo/mxmoe/baselines.py",
            "@repo/mxmoe/plan.py",
            "@repo/mxmoe/stages/evaluate.py",
            "@repo/mxmoe/stages/endtoend.py",
            "@repo/mxmoe/stages/proxy.py",
            "@repo/mxmoe/stages/calibrated.py",
            "@repo/mxmoe/plots/endtoend.py",
            "@repo/mxmoe/plots/accuracy.py",
        ),
        needs=("04_allocation",),
        items={
            "fig5": (
                [
                    "{model}/eval/figure5.json",
                    "kernels/figure5.json",
                    "{model}/eval/table1.json",
                    "kernels/bench_*.json",
                ],
                "MoE-block throughput vs PPL; paper models as throughput only",
            ),
            "fig6": (
                ["{model}/eval/figure6.json", "{model}/alloc/*.json"],
                "r sweep: throughput vs PPL with the ILP front",
            ),
            "table1": (
                ["{model}/eval/table1.json", "{model}/eval/zeroshot*.json"],
                "PPL + zero-shot, GPTQ*, QuaRot-style, MxMoE",
            ),
            "table3": (["{model}/**/table3*.json"], "linear-block vs expert granularity at W5A5"),
            "table5": (["{model}/**/table5*.json"], "uniform w4a4..w8a8 with rotation vs the mixed 5-bit result"),
        },
    ),
    Stage(
        "06_claims",
        title="06 claims + book",
        summary="paper vs ours, a verdict\nper claim; Jupyter Book",
        reads=(
            "{model}/model.json",
            "{model}/sensitivity/*.json",
            "{model}/routing/*.json",
            "{model}/alloc/*.json",
            "{model}/eval/*.json",
            "kernels/*.json",
            "kernels/NOTES.md",
            "@repo/mxmoe/claims/*.py",
            "@repo/mxmoe/paper.py",
            "@repo/docs/paper_results.json",
        ),
    ),
    Stage(
        "07_paper_models",
        title="07 paper models",
        summary="full-size random-weight models:\nwhole-model speed and memory",
        reads=(
            "@repo/results/paper-models/*.json",
            "@repo/results/paper-models/alloc/*.json.gz",
            "@repo/mxmoe/bench/paper_models.py",
            "@repo/mxmoe/plots/paper_models.py",
            "@repo/mxmoe/plots/__init__.py",  # label_points
        ),
    ),
)
# paper items shown outside the numbered notebooks
OTHER_ITEMS = {
    "fig3": ("intro", ["@repo/book/figures/pipeline.svg"], "our own pipeline diagram (mxmoe.plots.pipeline)")
}


def stage(stem: str) -> Stage:
    """The stage whose notebook is ``stem``."""
    for s in STAGES:
        if s.stem == stem:
            return s
    raise KeyError(f"no stage {stem!r}; stages: {[s.stem for s in STAGES]}")


def paper_items() -> dict:
    """{paper item: (notebook, result globs, what)} over every stage, in figure/table order."""
    items = {k: (s.stem, globs, what) for s in STAGES for k, (globs, what) in s.items.items()}
    items.update(OTHER_ITEMS)
    return dict(sorted(items.items(), key=lambda kv: _item_order(kv[0])))


def _item_order(item: str) -> tuple:
    """'fig1a' -> ('fig', 1, 'a'): figures before tables, by number."""
    kind, number, rest = re.fullmatch(r"([a-z]+?)(\d+)(\w*)", item).groups()
    return kind, int(number), rest
