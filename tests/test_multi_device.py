"""A model spread over several devices with accelerate's device map: every stage on CPU placements.

No GPU is needed. Two kinds of second placement are used, each for what it can prove:

* **CPU + meta.** Layer 1 (and the head) sit on the meta device, which has shapes but no data; any
  tensor left on the CPU that meets a meta tensor in an elementwise op raises, and a meta result
  cannot be copied into a CPU tensor. Code that takes "the model's device" from its first
  parameter (the embeddings, on the CPU) or from ``cuda:0`` keeps layer 1's activations on the CPU
  and fails, or hands back CPU tensors where the assertions demand meta ones. This proves *where*
  things go: calibration inputs and hidden states on each layer's device, packed experts packed
  where their weights are, a checkpoint's packed experts loaded onto their layer's device.
* **CPU + CPU through accelerate's hooks.** The same model dispatched over two CPU placements runs
  every stage through the hook path with real numbers, so its results must equal the single-device
  run exactly: routing counts, sensitivity Δ, GPTQ weights, logits, a checkpoint's logits.
"""

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from interp import run_interpreted

from mxmoe.bench import multi_gpu as mg
from mxmoe.bench.paper_models import apply_setting, config_of, model_dims, moe_layer_ids
from mxmoe.errors import MxMoEError
from mxmoe.models.blocks import moe_blocks
from mxmoe.models.paper import LARGE_CONFIGS, LARGE_MODELS, MODEL_SHAPES, PAPER_MODELS, paper_config
from mxmoe.models.placement import (
    decoder_layers,
    execution_device,
    input_device,
    is_multi_device,
    layer_device_map,
    model_devices,
    split_contiguous,
)
from mxmoe.models.random_init import build_random
from mxmoe.quant.apply import uniform_scheme_map
from mxmoe.quant.layerwise import LayerwiseRunner
from mxmoe.quant.sequential import quantize_model_gptq
from mxmoe.routing import profile_routing
from mxmoe.sensitivity import compute_sensitivity
from mxmoe.stages.routing import embedded_profile

ROOT = Path(__file__).resolve().parents[1]
META_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "meta",
    "model.norm": "meta",
    "lm_head": "meta",
}
CPU = torch.device("cpu")
META = torch.device("meta")


def _pair(name="tiny-qwen3-moe", **kw):
    """The same random model on one device and dispatched over two CPU placements (accelerate hooks)."""
    kw = dict(dtype=torch.float32, seed=3, measured=embedded_profile(), calib_shape=(2, 64), **kw)
    one, _ = build_random(name, device="cpu", **kw)
    two, _ = build_random(name, device_map=["cpu", "cpu"], **kw)
    return one, two


def _meta_model(name="tiny-qwen3-moe"):
    """A tiny model with layer 0 on the CPU and layer 1, the final norm and the head on the meta device."""
    m, _ = build_random(name, device_map=META_MAP, dtype=torch.float32, seed=3, skew=0)
    m.set_experts_implementation("batched_mm")  # data-independent: it runs on meta tensors
    return m


def _windows(n=3, length=24):
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(5))


# ---- the large model's table and the device map ------------------------------------------------------


def test_qwen3_235b_config_is_the_public_one():
    """235.1 B parameters on the meta device; shape row and config agree; kept out of the paper's tables."""
    from transformers import AutoModelForCausalLM

    assert "qwen3-235b" not in PAPER_MODELS and MODEL_SHAPES["qwen3-235b"] is LARGE_MODELS["qwen3-235b"]
    cfg = paper_config("qwen3-235b")
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (94, 64, 4, 128)
    assert (cfg.vocab_size, cfg.rope_theta if hasattr(cfg, "rope_theta") else 1e6) == (151936, 1e6)
    shape = LARGE_MODELS["qwen3-235b"][1]
    d = model_dims(config_of("qwen3-235b"))
    assert (
        (d["num_experts"], d["hidden"], d["expert_width"], d["top_k"])
        == (128, 4096, 1536, 8)
        == (
            shape.num_experts,
            shape.hidden,
            shape.expert_width,
            shape.top_k,
        )
    )
    assert len(moe_layer_ids(cfg)) == shape.moe_layers == 94 and set(LARGE_CONFIGS) == set(LARGE_MODELS)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(235.09, abs=0.01)


def test_layer_device_map_is_contiguous_and_balanced():
    """Qwen3-235B over 4 GPUs: contiguous runs of 23-24 layers, embeddings first, head last; sizes sane."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(paper_config("qwen3-235b"), dtype=torch.bfloat16)
    dmap = layer_device_map(m, [0, 1, 2, 3])
    layers = [dmap[f"model.layers.{i}"].index for i in range(94)]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2, 3}
    assert all(23 <= layers.count(g) <= 24 for g in range(4))
    assert dmap["model.embed_tokens"] == dmap["model.rotary_emb"] == torch.device("cuda", 0)
    assert dmap["lm_head"] == dmap["model.norm"] == torch.device("cuda", 3)
    assert split_contiguous([1, 1, 1, 10], 2) == [0, 0, 0, 1]
    assert split_contiguous([5] * 7, 7) == list(range(7))
    with pytest.raises(MxMoEError, match="cannot fill"):
        split_contiguous([1, 2], 3)


# ---- building over a device map -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_build_over_two_placements_equals_one_device(name):
    """Same weights, router biases, routing counts and logits as the single-device build; hooks on every layer."""
    one, two = _pair(name)
    assert all(hasattr(layer, "_hf_hook") for layer in two.model.layers) and hasattr(two, "hf_device_map")
    for (n, a), (n2, b) in zip(one.named_parameters(), two.named_parameters()):
        assert n == n2 and torch.equal(a, b), n
    for b1, b2 in zip(moe_blocks(one), moe_blocks(two)):
        assert torch.equal(b1.router.mxmoe_bias, b2.router.mxmoe_bias)
    ids = _windows()
    assert np.array_equal(profile_routing(one, ids), profile_routing(two, ids))
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)


def test_build_places_each_weight_on_its_layers_device():
    """Layer 1 mapped to meta holds only meta weights; layer 0, the embeddings and the rotary buffers stay real."""
    m, _ = build_random("tiny-qwen3-moe", device_map=META_MAP, dtype=torch.float32, seed=3, skew=0)
    assert {p.device for p in m.model.layers[0].parameters()} == {CPU}
    assert {p.device for p in m.model.layers[1].parameters()} == {META}
    assert m.lm_head.weight.device == META and m.model.rotary_emb.inv_freq.device == CPU
    assert execution_device(m.model.layers[1]) == META and input_device(m) == CPU
    assert model_devices(m) == [CPU, META] and is_multi_device(m)


# ---- calibration layer by layer -----------------------------------------------------------------------


def test_layerwise_runner_keeps_each_layers_calibration_on_its_device():
    """Block inputs and hidden states live on the device of the layer that is running: CPU for layer 0,
    meta for layer 1. Keeping them on the first parameter's device (the CPU) fails here."""
    m = _meta_model()
    blocks = moe_blocks(m)
    runner = LayerwiseRunner(m, _windows(2, 16))
    x0 = runner.advance(capture=blocks[0].module)
    assert x0.device == CPU and x0.shape == (32, 64) and runner.hidden.device == CPU
    x1 = runner.block_inputs(blocks[1].module)
    assert x1.device == META and runner.hidden.device == META
    assert all(t.device == META for kw in runner.kwargs for v in kw.values() for t in _tensors(v))
    x1 = runner.advance(capture=blocks[1].module)
    assert x1.device == META and x1.shape == (32, 64) and runner.hidden.device == META


def test_layerwise_runner_moves_inputs_without_accelerate_hooks():
    """A model placed by hand (no hooks): the runner itself moves what each layer needs to the layer's weights."""
    from mxmoe.models.zoo import tiny_model

    m = tiny_model("tiny-qwen3-moe")
    m.set_experts_implementation("batched_mm")
    m.model.layers[1].to("meta")
    blocks = moe_blocks(m)
    runner = LayerwiseRunner(m, _windows(2, 16))
    assert runner.advance(capture=blocks[0].module).device == CPU
    assert runner.advance(capture=blocks[1].module).device == META


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _tensors(x)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sensitivity_over_two_placements_equals_one_device(method):
    """Δ of every block, expert and scheme: identical through the hooks and on one device."""
    one, two = _pair()
    schemes = ["w4a16_g128_asym", "w2a16_g128_asym", "w8a8_g-1_sym"]
    a = compute_sensitivity(one, _windows(), schemes, method, progress=False)
    b = compute_sensitivity(two, _windows(), schemes, method, progress=False)
    assert a["layers"].keys() == b["layers"].keys()
    for layer in a["layers"]:
        da = np.array(a["layers"][layer]["delta"], dtype=float)
        db = np.array(b["layers"][layer]["delta"], dtype=float)
        assert np.allclose(da, db, rtol=1e-6, atol=0, equal_nan=True), layer
        assert a["layers"][layer]["tokens"] == b["layers"][layer]["tokens"]


def test_gptq_over_two_placements_equals_one_device():
    """Sequential GPTQ (layer by layer through the runner): the same quantized weights."""
    one, two = _pair()
    plan = {
        (b.layer, e, n): "w3a16_g128_asym"
        for b in moe_blocks(one)
        for e in range(b.num_experts)
        for n in "gate up down".split()
    }
    quantize_model_gptq(one, _windows(), plan, progress=False)
    quantize_model_gptq(two, _windows(), plan, progress=False)
    for (n, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.equal(a, b), n


def test_quantize_pipeline_over_two_placements_equals_one_device(tmp_path):
    """``mxmoe.quantize`` (sensitivity, routing, allocation, GPTQ, checkpoint) through the hooks: the same
    allocation and the same quantized weights as on one device; its checkpoint loads over two placements
    with the same logits as on one device."""
    import mxmoe
    from mxmoe.checkpoint import load_quantized

    one, two = _pair("tiny-qwen2-moe")
    kw = dict(wbits=3.0, method="gptq", schemes="w4a16_g-1_asym,w2a16_g-1_asym,w8a8_g-1_sym", calib="random")
    kw.update(calib_windows=2, seqlen=32, progress=False)
    a = mxmoe.quantize(one, None, cache=tmp_path / "c1", **kw)
    b = mxmoe.quantize(two, None, cache=tmp_path / "c2", out=tmp_path / "ck", **kw)
    assert a.scheme_map == b.scheme_map
    for (n, x), y in zip(one.named_parameters(), two.parameters()):
        assert torch.equal(x, y), n
    # (the checkpoint holds no imposed router bias: it is compared with itself loaded on one device)
    loaded = load_quantized(tmp_path / "ck", device_map=["cpu", "cpu"])
    ids = _windows(1, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, load_quantized(tmp_path / "ck", device="cpu")(ids).logits)


def test_gptq_had_is_refused_on_a_model_over_several_devices():
    """gptq-had rotates a copy of the model: refused, with the way out, before any work."""
    import mxmoe

    with pytest.raises(MxMoEError, match="spread over cpu, meta.*'gptq'"):
        compute_sensitivity(_meta_model(), _windows(), ["w4a16_g128_asym"], "gptq-had", progress=False)
    with pytest.raises(MxMoEError, match="spread over"):  # the pipeline refuses before any work
        mxmoe.quantize(_meta_model(), None, wbits=3.0, method="gptq-had", calib="random", progress=False)


def _recording_moves(model) -> list:
    """(layer index, device) of every ``.to`` call on a decoder layer of ``model``, in order."""
    moves = []
    for i, layer in enumerate(decoder_layers(model)):
        real = layer.to
        layer.to = lambda device, i=i, real=real: moves.append((i, str(device))) or real(device)
    return moves


def test_streamed_gptq_visits_the_device_one_layer_at_a_time():
    """A model held in CPU memory, quantized with ``stream_to``: every layer up to the last quantized one goes to
    the device for its turn and back before the next one; the weights are those of an unstreamed run."""
    one, _ = _pair("tiny-qwen2-moe")
    streamed, whole = copy.deepcopy(one), copy.deepcopy(one)
    moves = _recording_moves(streamed)
    plan = {k: "w3a16_g128_asym" for k in uniform_scheme_map(one, "w3a16_g128_asym") if k[0] == 0}  # layer 0 only
    codes: dict = {}
    quantize_model_gptq(one, _windows(), plan, progress=False)
    quantize_model_gptq(streamed, _windows(), plan, progress=False, stream_to="cpu", int_weights=codes)
    assert moves == [(0, "cpu"), (0, "cpu")]  # layer 1 has nothing to quantize: never streamed
    for (n, a), b in zip(one.named_parameters(), streamed.parameters()):
        assert torch.equal(a, b), n
    assert codes and all(w.q.device == CPU for w in codes.values())
    moves = _recording_moves(whole)
    quantize_model_gptq(
        whole, _windows(), uniform_scheme_map(whole, "w3a16_g128_asym"), progress=False, stream_to="cpu"
    )
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]


def test_streamed_sensitivity_and_pipeline_equal_the_model_in_place(tmp_path):
    """Sensitivity and the whole ``mxmoe.quantize`` streamed layer by layer give what they give unstreamed;
    gptq-had, which rotates a copy of the model, is refused before any work."""
    import mxmoe

    one, _ = _pair("tiny-qwen2-moe")
    streamed = copy.deepcopy(one)
    moves = _recording_moves(streamed)
    schemes = ["w4a16_g128_asym", "w2a16_g128_asym"]
    a = compute_sensitivity(one, _windows(), schemes, "gptq", progress=False)
    b = compute_sensitivity(streamed, _windows(), schemes, "gptq", progress=False, stream_to="cpu")
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]
    for layer in a["layers"]:
        assert [a["layers"][layer][k] for k in ("delta", "tokens")] == [
            b["layers"][layer][k] for k in ("delta", "tokens")
        ]
    kw = dict(wbits=3.0, method="gptq", schemes="w4a16_g-1_asym,w2a16_g-1_asym,w8a8_g-1_sym", calib="random")
    kw.update(calib_windows=2, seqlen=32, progress=False)
    x = mxmoe.quantize(one, None, cache=tmp_path / "c1", **kw)
    y = mxmoe.quantize(streamed, None, cache=tmp_path / "c2", stream_to="cpu", **kw)
    assert x.scheme_map == y.scheme_map
    for (n, p), q in zip(one.named_parameters(), streamed.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(MxMoEError, match="streamed to cuda.*'gptq'"):
        mxmoe.quantize(one, None, wbits=3.0, method="gptq-had", calib="random", stream_to="cuda", progress=False)
    with pytest.raises(MxMoEError, match="held on one device"):
        LayerwiseRunner(_meta_model(), _windows(), stream_to="cpu")


def test_a_cpu_model_drawn_elsewhere_is_the_cpu_drawn_model_without_hooks():
    """``draw_on`` draws each weight on another device and moves it home: here CPU to CPU, the same weights as
    ``build_random(device="cpu")``, and no accelerate hooks (streaming moves the layers itself)."""
    a, _ = build_random("tiny-qwen3-moe", device="cpu", dtype=torch.float32, seed=3, skew=0)
    b, _ = build_random("tiny-qwen3-moe", device="cpu", dtype=torch.float32, seed=3, skew=0, draw_on="cpu")
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n
    assert not any(hasattr(m, "_hf_hook") for m in b.modules()) and model_devices(b) == [CPU]


def test_streamed_benchmark_measures_the_first_layers_and_projects_the_rest(tmp_path, capsys):
    """``mxmoe bench streamed --smoke``: sensitivity and GPTQ of the first MoE layer only, streamed (to the CPU
    here), projected to both layers; a layer count the model does not have is one clear error."""
    from mxmoe.bench import streamed

    assert streamed.main(["--model", "tiny-qwen2-moe", "--smoke", "--layers", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "tiny-qwen2-moe_streamed_cpu.json").read_text())
    assert doc["layers_measured"] == [0] and doc["moe_layers"] == 2 and doc["larger_than_gpu"] is False
    assert len(doc["sensitivity"]["seconds_per_layer"]) == 1 and doc["gptq"]["gptq_blocks"] > 0
    assert doc["gptq"]["gptq_blocks"] + doc["gptq"]["rtn_fallbacks"] == 9 * 3  # one layer of 8 + 1 experts
    assert doc["sensitivity"]["projected_all_layers_s"] == pytest.approx(2 * doc["sensitivity"]["seconds"])
    assert doc["model_bytes"] == streamed.model_bytes(build_random("tiny-qwen2-moe", device="cpu", skew=0)[0])
    assert streamed.main(["--model", "tiny-qwen2-moe", "--smoke", "--layers", "3", "--out", str(tmp_path)]) == 2
    assert "--layers must be between 1 and 2" in capsys.readouterr().err


# ---- packing and running the packed experts ------------------------------------------------------------


def test_packed_experts_are_packed_on_their_layers_device():
    """Each layer's packed experts (storage and launch tables) sit on the device of its expert weights."""
    m = _meta_model()
    blocks = moe_blocks(m)
    for setting in ("mxmoe w8a8 fp8", "mxmoe bf16"):  # integer packing checks code ranges: data, not meta
        apply_setting(m, blocks, setting, None)
        for b, want in zip(blocks, (CPU, META)):
            gate_up, down = b.experts.mxmoe_groups
            assert gate_up.device == down.device == gate_up.addr.device == want, (setting, b.layer)
            assert all(pw.data.device == want for pw in gate_up.packed + down.packed)


def test_lean_settings_free_and_restore_the_bf16_experts():
    """A packed setting leaves meta expert tensors; the bf16 setting draws the same values again, same logits."""
    _, two = _pair()
    blocks = moe_blocks(two)
    ids = _windows(1, 16)
    before = [b.experts.gate_up_proj.detach().clone() for b in blocks]
    with torch.no_grad():
        want = two(ids).logits
    held = mg.held_bytes(two)
    apply_setting(two, blocks, "mxmoe w4a16 g128", None, lean=True)
    assert all(b.experts.gate_up_proj.device == META and b.experts.down_proj.device == META for b in blocks)
    assert mg.held_bytes(two) < held
    apply_setting(two, blocks, "bf16 grouped_mm", None, lean=True)
    assert all(torch.equal(b.experts.gate_up_proj, w) for b, w in zip(blocks, before))
    with torch.no_grad():
        assert torch.equal(two(ids).logits, want)


def test_checkpoint_loads_over_a_device_map(tmp_path):
    """load_quantized(device_map=...): the same logits over two CPU placements; over CPU + meta each
    layer's packed experts are on its own device."""
    from test_checkpoint import ids, quantized_checkpoint

    from mxmoe.checkpoint import load_quantized
    from mxmoe.packed import PackedExperts

    _, out = quantized_checkpoint("tiny-qwen3-moe", tmp_path / "ck")
    one = load_quantized(out, device="cpu")
    two = load_quantized(out, device_map=["cpu", "cpu"])
    assert all(hasattr(layer, "_hf_hook") for layer in two.model.layers)
    with torch.no_grad():
        assert torch.equal(one(ids()).logits, two(ids()).logits)
    split = load_quantized(out, device_map=META_MAP)
    packed = [m for m in split.modules() if isinstance(m, PackedExperts)]
    assert [pe.gate_up[0].data.device for pe in packed] == [CPU, META]


# ---- the kernels launch on their tensors' GPU ---------------------------------------------------------


def test_every_triton_launch_is_device_guarded():
    """Triton launches on the current GPU: every ``kernel[grid](...)`` in the kernel package sits inside
    ``with device_guard(...)`` (a new launch without it would run on GPU 0 with another GPU's tensors)."""
    found = 0
    for path in (ROOT / "mxmoe" / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "device_guard"
                for i in node.items
            ):
                guarded |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                found += 1
                assert id(node) in guarded, f"{path.name}:{node.lineno}: a Triton launch outside device_guard"
    assert found >= 4


def test_device_guard_makes_the_tensors_gpu_current(monkeypatch):
    """On a CUDA device it enters torch.cuda.device(that device); elsewhere it does nothing."""
    from mxmoe.env import device_guard

    entered = []

    class Recorder:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(self.d)

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with device_guard(torch.device("cuda", 2)):
        pass
    with device_guard(CPU), device_guard(None):
        pass
    assert entered == [torch.device("cuda", 2)]


# ---- the benchmark command ------------------------------------------------------------------------------


def test_min_gpus_fills_units_in_order():
    gib = 2**30
    r = mg.min_gpus([10 * gib] * 10, capacity=40 * gib, headroom=3 * gib, reserve=2 * gib)  # 35 GiB usable
    assert r["gpus"] == 4 and r["per_gpu_gib"] == [30.0, 30.0, 30.0, 10.0]
    assert mg.min_gpus([50 * gib], capacity=40 * gib, headroom=0)["gpus"] is None  # one unit does not fit
    assert mg.min_gpus([gib] * 3, capacity=80 * gib, headroom=gib)["gpus"] == 1


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--gpus", "0"], "--gpus must be 1 or more"),
        (["--gpus", "4"], "asks for 4 CUDA GPUs and this machine has"),
        (["--model", "qwen9"], "unknown model"),
        (["--dry-run", "--model", "qwen3-235b"], "tiny config"),
        (["--settings", "mxmoe 9 bits"], "unknown settings"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    from mxmoe.cli import main

    if "--gpus" in argv and torch.cuda.is_available() and torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs")
    assert main(["bench", "multi-gpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mxmoe bench multi-gpu: error:")
    assert __import__("re").search(match, err), err


DRY = ["-m", "mxmoe", "bench", "multi-gpu", "--dry-run"]


def test_dry_run_on_two_cpu_placements_and_resume(tmp_path):
    """The whole command on a tiny config over two CPU placements, in two invocations: the second builds
    again and measures only what the first left (one more setting, its correctness case); a third has
    nothing left and changes nothing."""

    def invoke(*settings):
        stdout = run_interpreted(DRY + ["--out", str(tmp_path), "--settings", *settings], timeout=900)
        return stdout.splitlines()[-1], json.loads(path.read_text())

    path = tmp_path / "multi-gpu" / "tiny-qwen3-moe_2x_cpu.json"
    last, first = invoke("bf16 grouped_mm")
    assert last.endswith("complete") and first["complete"]
    last, doc = invoke("bf16 grouped_mm", "mxmoe 3.25 (w-only)")
    assert last.endswith("complete")
    mg.validate_doc(doc)
    assert doc["devices"] == {"count": 2, "kind": "cpu (dry run)"} and len(doc["invocations"]) == 2
    assert doc["stages"]["pipeline"] == first["stages"]["pipeline"]  # not redone
    pipe = doc["stages"]["pipeline"]
    assert pipe["routing_profile_s"] > 0 and pipe["gptq_sensitivity_projected_s"] > 0 and pipe["allocation_s"] > 0
    check = doc["stages"]["correctness"]
    assert check["passed"] and check["devices"] == ["cpu", "cpu"] and "mxmoe 3.25 (w-only)" in check["cases"]
    rows = {r["setting"]: r for r in doc["settings"]}
    assert rows["bf16 grouped_mm"] == first["settings"][0]  # measured by the first invocation, kept
    assert set(rows) == {"bf16 grouped_mm", "mxmoe 3.25 (w-only)"} and not any("error" in r for r in rows.values())
    assert rows["mxmoe 3.25 (w-only)"]["expert_bytes_vs_bf16"] < 1
    assert set(rows["mxmoe 3.25 (w-only)"]["prefill"]) == {"1x16", "2x16"}
    assert doc["summary"]["mxmoe 3.25 (w-only)"]["prefill_1x16_speedup"] > 0
    last, again = invoke("bf16 grouped_mm", "mxmoe 3.25 (w-only)")
    assert "nothing left" in last and again == doc
