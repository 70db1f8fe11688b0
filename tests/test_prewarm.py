"""mxmoe.prewarm: its rows land in the cache the notebooks read, under the same keys."""

from __future__ import annotations

import pytest

from mxmoe import prewarm
from mxmoe.profiles import get_profile
from mxmoe.stages.evaluate import evaluate_config


def test_parts_and_bad_part():
    assert [c.label for c, _, z in prewarm.part_configs("table1")] == [
        "fp16",
        "gptq*-3.25",
        "gptq*-2.25",
        "quarot-w4a4",
    ]
    assert all(z for _, _, z in prewarm.part_configs("table1"))
    assert len(prewarm.part_configs("table4")) == 26 and not any(z for _, _, z in prewarm.part_configs("table4"))
    with pytest.raises(ValueError, match="unknown part"):
        prewarm.part_configs("table9")


def test_prewarmed_rows_are_cache_hits_for_the_notebooks(tmp_path, monkeypatch):
    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    assert prewarm.main(["--profile", "smoke", "--part", "table5"]) == 0
    runs = sorted((tmp_path / "tiny-qwen2-moe" / "eval" / "runs").glob("*.json"))
    assert len(runs) == 5
    P = get_profile("smoke")
    config, _, zeroshot = prewarm.part_configs("table5")[0]
    before = {p: p.stat().st_mtime_ns for p in runs}
    row = evaluate_config(config, P, zeroshot=zeroshot, progress=False)  # what notebook 05 calls: a cache hit
    assert row["label"] == config.label
    assert {p: p.stat().st_mtime_ns for p in runs[0].parent.glob("*.json")} == before  # nothing new, nothing rewritten


def test_perplexity_only_request_reuses_a_zero_shot_row(tmp_path, monkeypatch):
    from mxmoe.baselines import rtn_grid_config

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    P = get_profile("smoke")
    with_tasks = evaluate_config(rtn_grid_config(4, 8), P, zeroshot=True, progress=False)
    runs = list((tmp_path / "tiny-qwen2-moe" / "eval" / "runs").glob("*.json"))
    ppl_only = evaluate_config(rtn_grid_config(4, 8), P, zeroshot=False, progress=False)
    assert ppl_only["ppl"] == with_tasks["ppl"]
    assert list(runs[0].parent.glob("*.json")) == runs  # nothing quantized or written again


def test_every_part_reads_only_parts_that_exist():
    assert set(prewarm.DEPENDS) <= set(prewarm.PARTS)
    assert all(set(deps) <= set(prewarm.PARTS) for deps in prewarm.DEPENDS.values())
    assert set(prewarm.EVAL_PARTS) <= set(prewarm.PARTS)


def test_run_all_starts_a_part_after_what_it_reads_and_skips_it_when_that_failed(tmp_path, monkeypatch):
    started, events, shards = [], [], []  # events: ("start" | "end", part) in the order they happened

    class FakeProcess:  # finishes at its first poll; routing fails
        def __init__(self, cmd, **kw):
            self.part = cmd[cmd.index("--part") + 1]
            if "--shard" in cmd:
                shards.append((self.part, cmd[cmd.index("--shard") + 1]))
            self.returncode = None
            started.append(self.part)
            events.append(("start", self.part))

        def poll(self):
            if self.returncode is None:
                self.returncode = 1 if self.part == "routing" else 0
                events.append(("end", self.part))
            return self.returncode

    monkeypatch.setattr(prewarm.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(prewarm.time, "sleep", lambda s: None)
    failed = prewarm.run_all(get_profile("smoke"), 3, tmp_path)
    after_routing = {"alloc", "mxmoe", "fp8", "sweep", "calibrated-rtn", "calibrated"}
    assert {t.partition(":")[0] for t in failed} == {"routing"} | after_routing
    assert set(started) == set(prewarm.PARTS) - after_routing
    for part in started:  # everything a part reads had finished before it started
        assert all(events.index(("end", d)) < events.index(("start", part)) for d in prewarm.DEPENDS.get(part, ()))
    # evaluation parts run as their shards, each once; table1's every shard ends before zeroshot-dense starts
    assert sorted(shards) == sorted(tuple(t.split(":")) for t in prewarm.tasks(["table1", "table4", "table5"]))
    assert max(i for i, e in enumerate(events) if e == ("end", "table1")) < events.index(("start", "zeroshot-dense"))
    # one log per process started: every task but the skipped ones (routing started, then failed)
    assert len(list(tmp_path.glob("*.log"))) == len(started) == len(prewarm.tasks()) - len(failed) + 1


def test_shards_split_an_evaluation_part_into_disjoint_row_sets_that_cover_it():
    rows = [c.label for c, _, _ in prewarm.part_configs("table4")]
    n = prewarm.SHARDS["table4"]
    got = [
        c.label for j in range(n) for c, _, _ in prewarm.part_configs("table4")[prewarm.parse_shard(f"{j}/{n}")[0] :: n]
    ]
    assert sorted(got) == sorted(rows) and len(got) == len(rows)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="j/n"):
            prewarm.parse_shard(bad)
    with pytest.raises(SystemExit) as e:
        prewarm.main(["--profile", "smoke", "--part", "routing", "--shard", "1/2"])
    assert e.value.code == 2


def test_allocations_are_solved_again_only_when_an_input_is_newer(tmp_path, monkeypatch):
    import os

    from mxmoe import plan

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    P = get_profile("quick")
    root = tmp_path / P.model
    inputs = [
        root / "sensitivity" / f"{plan.ALLOCATION_METHOD}_13schemes.json",
        root / "routing" / f"{plan.ALLOCATION_CORPUS}_n8_s512.json",
        root / "model.json",
    ]
    outputs = [root / "alloc" / f"{a.name}.json" for a in plan.ALLOCATIONS]
    for i, p in enumerate(inputs + outputs):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
        os.utime(p, (2e9 + i, 2e9 + i))  # outputs written after inputs
    assert prewarm.allocations_current(P)
    os.utime(inputs[1], (3e9, 3e9))  # a newer routing profile
    assert not prewarm.allocations_current(P)
    outputs[0].unlink()
    assert not prewarm.allocations_current(P)
    assert not prewarm.allocations_current(get_profile("smoke"))
