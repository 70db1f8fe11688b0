import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mxmoe.errors import MxMoEError
from mxmoe.models import cmoe, heal, moefy


def tiny_dense(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.25,
    )  # large weights: the carving error is visible in the logits
    return LlamaForCausalLM(cfg).eval()


CFG = cmoe.CarveConfig(num_experts=8, top_k=2, shared_width=16, k_act=12, router_tokens=96, router_spread=1.0)


def carved(dense, method="cmoe"):
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs = moefy.collect_ffn_inputs(dense, ids)
    cfg = cmoe.CarveConfig(**{**CFG.__dict__, "method": method})
    return {i: cmoe.carve(dense.model.layers[i].mlp, x, cfg, seed=i)[0] for i, x in enumerate(inputs)}


def windows(n=6, seed=3):
    return torch.randint(0, 96, (n, 24), generator=torch.Generator().manual_seed(seed))


def test_balanced_assignment_gives_equal_clusters_and_own_representatives():
    markers = (torch.rand(200, 48, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    labels, reps = cmoe.balanced_assignment(markers, markers.mean(0), 6, iters=3)
    assert torch.bincount(labels, minlength=6).tolist() == [8] * 6
    assert [labels[r].item() for r in reps] == list(range(6))
    with pytest.raises(ValueError, match="equal experts"):
        cmoe.balanced_assignment(markers[:, :47], markers[:, :47].mean(0), 6, iters=1)


@pytest.mark.parametrize("method", ["cmoe", "kmeans"])
def test_carving_partitions_the_neurons(method):
    splits = carved(tiny_dense(), method)
    for sp in splits.values():
        assert sorted(torch.cat([sp.shared, sp.experts.flatten()]).tolist()) == list(range(80))
        assert sp.experts.shape == (8, 8) and sp.router.shape == (8, 32)


def test_carve_config_rejects_bad_structures():
    with pytest.raises(ValueError, match="equal experts"):
        cmoe.CarveConfig(num_experts=7, shared_width=16).check(80)
    with pytest.raises(ValueError, match="top_k"):
        cmoe.CarveConfig(num_experts=8, top_k=9, shared_width=16).check(80)
    with pytest.raises(ValueError, match="carving method"):
        cmoe.CarveConfig(method="random").check(1536)
    assert cmoe.CarveConfig().active_neurons(1536) == 768


def test_masked_dense_equals_the_qwen2_moe_block():
    dense = tiny_dense()
    splits = carved(dense)
    config = moefy.moe_config(dense.config, CFG, [0, 1])
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(5))
    for i, sp in splits.items():
        sp.router.mul_(40.0)  # far from uniform weights: the gates matter
        masked = heal.MaskedMoE(dense.model.layers[i].mlp, sp, CFG.top_k, rank=4)
        with torch.no_grad():
            for name, p in masked.named_parameters():
                if name.endswith("_b"):
                    p.normal_(0, 0.05)  # non-zero corrections: the merge is tested too
            wg, wu, wd = masked.merged()
            mlp = dense.model.layers[i].mlp.__class__(dense.config)
            mlp.gate_proj.weight.copy_(wg), mlp.up_proj.weight.copy_(wu), mlp.down_proj.weight.copy_(wd)
            block = moefy.sparse_block(config, mlp, masked.split())
            torch.testing.assert_close(masked(x), block(x), atol=1e-5, rtol=1e-4)
            assert masked.last_top.unique().numel() > CFG.top_k  # several experts in use


def test_masked_moe_rejects_a_split_that_is_not_a_partition():
    dense = tiny_dense()
    sp = carved(dense)[0]
    bad = moefy.LayerSplit(sp.shared[:-1], sp.experts, sp.router, sp.scale)
    with pytest.raises(ValueError, match="partition"):
        heal.MaskedMoE(dense.model.layers[0].mlp, bad, 2)


def kl_of(student, dense, w):
    with torch.no_grad():
        return heal.kl_to_teacher(student(w).logits, dense(w).logits).item()


HEAL = heal.HealConfig(
    rank=4,
    router_steps=8,
    router_tokens=64,
    router_lr=1e-2,
    e2e_steps=12,
    batch_windows=2,
    lr=1e-2,
    e2e_router_lr=1e-2,
    warmup=2,
    balance_coef=0.01,
    seed=0,
)


def test_a_few_heal_steps_lower_the_kl():
    dense = tiny_dense()
    splits = carved(dense)
    w = windows()
    before = kl_of(heal.masked_student(dense, splits, CFG.top_k, rank=0), dense, w)
    student, report = heal.heal(dense, splits, CFG.top_k, w, HEAL, skew_windows=w[:2])
    after = kl_of(student, dense, w)
    assert after < 0.8 * before
    assert report.kl[-1][1] < report.kl[0][1] and report.router_loss[-1][1] < report.router_loss[0][1]
    assert set(report.skew_per_layer) == {0, 1}


def test_a_passed_deadline_cuts_the_end_to_end_phase_and_says_where():
    import time

    dense = tiny_dense()
    splits, w = carved(dense), windows()
    _, full = heal.heal(dense, splits, CFG.top_k, w, HEAL)
    _, cut = heal.heal(dense, splits, CFG.top_k, w, HEAL, deadline=time.time() - 1)
    assert full.e2e_steps_done == HEAL.e2e_steps and cut.e2e_steps_done == 0 and not cut.kl
    assert cut.router_loss  # the router phase is not cut


def test_heal_is_deterministic_for_a_seed():
    dense = tiny_dense()
    w = windows()
    splits = carved(dense)  # one carving (least squares on a CPU is deterministic only up to rounding)
    a, _ = heal.heal(dense, splits, CFG.top_k, w, HEAL)
    b, _ = heal.heal(dense, splits, CFG.top_k, w, HEAL)
    c, _ = heal.heal(dense, splits, CFG.top_k, w, heal.HealConfig(**{**HEAL.__dict__, "seed": 1}))
    ta, tb, tc = heal.heal_tensors(a), heal.heal_tensors(b), heal.heal_tensors(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_stored_files_rebuild_the_healed_model(tmp_path):
    dense = tiny_dense()
    w = windows()
    student, _ = heal.heal(dense, carved(dense), CFG.top_k, w, HEAL)
    doc = heal.save_heal(student, tmp_path, {"recipe": "tiny"})
    assert doc["files"] and all((tmp_path / f).stat().st_size <= heal.SHARD_BYTES for f in doc["files"])
    meta, layers = heal.load_heal(tmp_path)
    fresh = tiny_dense()  # the build starts again from the source weights
    splits = heal.apply_heal(fresh, layers, CFG.top_k)
    moe = moefy.assemble(fresh, splits, CFG)
    with torch.no_grad():
        torch.testing.assert_close(moe(w).logits, student(w).logits, atol=2e-4, rtol=1e-4)
    shard = tmp_path / next(iter(doc["files"]))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a stored tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(MxMoEError, match="sha256"):
        heal.load_heal(tmp_path)


def test_load_balance_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    top = torch.tensor([[0, 1], [2, 3]] * 4)
    assert heal.load_balance_loss(probs, top, 4).item() == pytest.approx(1.0)
    assert heal.skew(torch.tensor([4.0, 2.0])) == 2.0 and heal.skew(torch.tensor([1.0, 0.0])) == float("inf")


def test_registry_names_and_the_default(tmp_path, monkeypatch):
    from mxmoe.models import smollm2

    monkeypatch.setattr(smollm2, "HEALED_DIR", tmp_path / "healed")
    assert smollm2.recipe("smollm2-moe") is smollm2.RECIPE  # no healed files: today's training-free model
    assert smollm2.recipe("smollm2-moe-tf") is smollm2.RECIPE and smollm2.recipe("smollm2-moe-v2") is smollm2.V2_RECIPE
    free_key = smollm2.cache_key(smollm2.V2_RECIPE)
    (tmp_path / "healed").mkdir()
    (tmp_path / "healed" / heal.HEAL_JSON).write_text('{"files": {"heal-00.safetensors": "ab"}}')
    assert smollm2.recipe("smollm2-moe") is smollm2.V2_RECIPE
    assert smollm2.cache_key(smollm2.V2_RECIPE) != free_key  # new files, new build
    assert smollm2.model_dir(smollm2.RECIPE).name.startswith("smollm2-moe-")  # the training-free cache keeps its folder
    free_id = smollm2.build_id(smollm2.V2_RECIPE)
    assert free_id.startswith("smollm2-moe-v2-") and free_id != smollm2.build_id(smollm2.RECIPE)
    (tmp_path / "healed" / heal.HEAL_JSON).write_text('{"files": {"heal-00.safetensors": "cd"}}')
    assert smollm2.build_id(smollm2.V2_RECIPE) != free_id  # other files, another model


def test_results_of_a_build_are_shared_across_library_versions(monkeypatch):
    """The build folder changes with transformers' version (the weights may differ in their last bits); the build's
    id, which keys every cached result, does not, so results measured on a GPU machine are found on a CPU."""
    from mxmoe.checkpoint import weights_id
    from mxmoe.models import smollm2

    key, ident = smollm2.cache_key(smollm2.V2_RECIPE), smollm2.build_id(smollm2.V2_RECIPE)
    monkeypatch.setattr(smollm2.transformers, "__version__", "0.0.1")
    assert smollm2.cache_key(smollm2.V2_RECIPE) != key and smollm2.build_id(smollm2.V2_RECIPE) == ident
    assert weights_id("smollm2-moe-v2", None) == f"build {ident}"
    with pytest.raises(MxMoEError, match="unknown smollm2 recipe"):
        smollm2.recipe("smollm2-moe-v3")


def test_v2_recipe_is_within_the_structure_bounds():
    from mxmoe.models import smollm2

    r = smollm2.V2_RECIPE
    assert r.num_experts >= 32 and r.top_k >= 4 and r.active_neurons(1536) <= 768


def test_save_refuses_files_over_the_limits(tmp_path, monkeypatch):
    dense = tiny_dense()
    student = heal.masked_student(dense, carved(dense), CFG.top_k, rank=4)
    monkeypatch.setattr(heal, "TOTAL_BYTES", 1000)
    with pytest.raises(MxMoEError, match="limit"):
        heal.save_heal(student, tmp_path, {})


class _Tok:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("with_files", [True, False])
def test_v2_build_merges_the_files_or_says_it_is_training_free(tmp_path, monkeypatch, capsys, with_files):
    import json

    from transformers import AutoModelForCausalLM

    from mxmoe.models import smollm2

    recipe = cmoe.CarveConfig(**{**CFG.__dict__, "calib_windows": 4, "calib_seqlen": 32})
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "cache"))
    healed = tmp_path / "repo" / "mxmoe" / "models" / "healed" / "smollm2-moe-v2"
    monkeypatch.setattr(smollm2, "HEALED_DIR", healed)
    monkeypatch.setattr(smollm2.moefy, "load_dense", lambda: (tiny_dense(), _Tok()))
    monkeypatch.setattr(smollm2, "calibration", lambda tok, n, seqlen, seed: windows(n, seed))
    w = windows()
    if with_files:
        student, _ = heal.heal(tiny_dense(), carved(tiny_dense()), CFG.top_k, w, HEAL)
        heal.save_heal(student, healed, {"recipe": smollm2.asdict(recipe)})
    path = smollm2.build(recipe)
    info = json.loads((path / "build.json").read_text())
    moe = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert info["moe_layers"] == [0, 1] and path.name.startswith("smollm2-moe-v2-")
    if with_files:
        assert info["healed"]["folder"] == "mxmoe/models/healed/smollm2-moe-v2" and info["layer_errors"] is None
        with torch.no_grad():
            torch.testing.assert_close(moe(w).logits, student(w).logits, atol=2e-4, rtol=1e-4)
        monkeypatch.setattr(smollm2, "V2_RECIPE", cmoe.CarveConfig(**{**recipe.__dict__, "top_k": 3}))
        with pytest.raises(MxMoEError, match="trained for recipe"):
            smollm2.build(smollm2.V2_RECIPE)
    else:
        assert info["healed"] is None and len(info["layer_errors"]) == 2
        assert "no healed files" in capsys.readouterr().out


def test_heal_stage_writes_files_that_the_build_turns_into_the_healed_model(tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    from mxmoe.metrics import perplexity
    from mxmoe.models import smollm2
    from mxmoe.stages import model as stage

    recipe = cmoe.CarveConfig(**{**CFG.__dict__, "calib_windows": 4, "calib_seqlen": 32})
    healed = tmp_path / "repo" / "mxmoe" / "models" / "healed" / "smollm2-moe-v2"
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "HEALED_DIR", healed)
    monkeypatch.setattr(smollm2, "V2_RECIPE", recipe)
    monkeypatch.setattr(smollm2.moefy, "load_dense", lambda: (tiny_dense(), _Tok()))
    monkeypatch.setattr(smollm2, "calibration", lambda tok, n, seqlen, seed: windows(n, seed))
    monkeypatch.setattr(stage, "eval_windows", lambda tok, seqlen, n, split: windows(n, 99))
    cfg = heal.HealConfig(**{**HEAL.__dict__, "calib_windows": 6, "seqlen": 24})
    doc = stage.heal_model(cfg=cfg, recipe=recipe)
    on_disk = json.loads((healed / heal.HEAL_JSON).read_text())
    assert on_disk["files"] == doc["files"] and on_disk["recipe"] == smollm2.asdict(recipe)
    check = doc["check"]
    assert check["ppl_healed"] < check["ppl_carved"]
    moe = AutoModelForCausalLM.from_pretrained(smollm2.build(recipe), dtype=torch.float32).eval()
    assert perplexity(moe, windows(check["windows"], 99)) == pytest.approx(check["ppl_healed"], rel=1e-4)


def test_v2_targets_say_which_target_is_met():
    from mxmoe.stages.model import v2_targets

    card = {
        "moe_layers": list(range(30)),
        "layers": 30,
        "windows": 16,
        "seqlen": 1024,
        "ppl_moe": 26.0,
        "ppl_dense": 22.9,
        "ppl_ratio": 26.0 / 22.9,
        "freq_skew_per_layer": [6.0] * 16 + [2.0] * 14,
        "build_seconds": 17.0,
        "device": "CPU",
    }
    zeroshot = {"MoE": 0.40, "dense": 0.42, "MoE - dense": -2.0, "limit": 500, "device": {"MoE": "GPU", "dense": "CPU"}}
    rows = {
        r["measure"].split(" (")[0]: r for r in v2_targets(card, zeroshot, {"seconds": {"total": 500}, "device": "GPU"})
    }
    assert rows["sparse layers"]["met"] and rows["routing skew, max/min tokens per expert"]["met"]
    assert rows["WikiText-2 test PPL, MoE / dense"]["met"] is True  # 1.135x
    assert rows["mean zero-shot accuracy, MoE − dense"]["met"] is False  # 2 points apart
    assert rows["`mxmoe model heal`"]["met"] is False and "500 s on GPU" in rows["`mxmoe model heal`"]["measured"]
    assert len(v2_targets(card, None, None)) == 4


def test_routing_headroom_measures_the_routed_block_and_an_oracle_choice():
    dense = tiny_dense(1)
    split = carved(dense)[0]
    mlp = dense.model.layers[0].mlp
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    y = mlp(x).detach()
    block = heal.MaskedMoE(mlp, split, top_k=2, rank=4)
    with torch.no_grad():
        block.gate_b.normal_(0, 0.05)  # a correction, merged by routing_headroom as the build merges it
        routed = ((block(x) - y).pow(2).sum() / y.pow(2).sum()).item()
    h = heal.routing_headroom(block, x, y)
    assert h["router"] == pytest.approx(routed, rel=1e-4)
    assert 0 <= h["overlap"] <= 1 and h["oracle"] != h["router"]
    every = heal.routing_headroom(heal.MaskedMoE(mlp, split, top_k=8), x, y)  # all experts: one choice
    assert every["overlap"] == 1 and every["oracle"] == pytest.approx(every["router"])


def test_zeroshot_of_the_dense_model_is_measured_once_and_set_beside_the_moe(tmp_path, monkeypatch):
    from mxmoe.profiles import get_profile
    from mxmoe.stages import model as stage

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    tasks = {"arc_easy": 0.5, "piqa": 0.7}
    calls = []
    monkeypatch.setattr(stage, "TASKS", tuple(tasks))
    monkeypatch.setattr(
        stage, "evaluate_config", lambda *a, **k: {"tasks": {"arc_easy": 0.4, "piqa": 0.7}, "device": "GPU"}
    )
    monkeypatch.setattr(stage.moefy, "load_dense", lambda: (torch.nn.Linear(1, 1), "tok"))

    def fake_tasks(model, tok, names, limit):
        calls.append(limit)
        return {t: {"value": tasks[t]} for t in names}

    monkeypatch.setattr(stage, "evaluate_tasks", fake_tasks)
    P = get_profile("quick")
    first = stage.zeroshot_dense_vs_moe(P.model, P)
    assert stage.zeroshot_dense_vs_moe(P.model, P) == first and calls == [P.zeroshot_limit]  # cached
    assert first["dense"] == pytest.approx(0.6) and first["MoE"] == pytest.approx(0.55)
    assert first["MoE - dense"] == pytest.approx(-5.0) and first["tasks"]["arc_easy"] == {"dense": 0.5, "MoE": 0.4}
