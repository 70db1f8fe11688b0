"""``mxmoe.quantize``: the whole pipeline on tiny random MoEs, its checks, and its sensitivity cache."""

import json

import pytest
import torch
from tiny import fresh

import mxmoe
from mxmoe.errors import MxMoEError
from mxmoe.pipeline import Recipe, check_calib_file, check_recipe

FEW = "w4a16_g-1_asym,w2a16_g-1_asym,w4a4_g-1_sym,w8a8_g-1_sym"  # few candidates keep the CPU run short


def run(tmp_path, name="tiny-qwen2-moe", **kw):
    model = fresh(name)
    args = dict(
        wbits=3.0,
        method="gptq-had",
        schemes=FEW,
        calib="random",
        calib_windows=2,
        seqlen=32,
        base_id=name,
        cache=tmp_path / "cache",
        progress=False,
    )
    return model, mxmoe.quantize(model, None, **{**args, **kw})


def test_gptq_had_end_to_end_and_the_checkpoint_matches(tmp_path):
    model, res = run(tmp_path, out=tmp_path / "ck", seqlen=64)
    m = res.manifest
    assert m["online_hadamard"] and m["recipe"]["method"] == "gptq-had" and m["base"]["id"] == "tiny-qwen2-moe"
    assert m["bits"]["weight"] <= 3.0 + 1e-9 and m["cost_table"]["gpu"] == "nvidia_h100"
    assert set(res.stage_seconds) == {"calibration", "routing", "sensitivity", "allocation", "quantization", "save"}
    assert len(res.scheme_map) == 2 * (8 + 1) * 3 and len(res.int_weights) == sum(
        not s.is_full_precision for s in res.scheme_map.values()
    )
    saved = json.loads((tmp_path / "ck" / "mxmoe.json").read_text())
    assert saved["stage_seconds"]["sensitivity"] == round(res.stage_seconds["sensitivity"], 2)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    loaded = mxmoe.load_quantized(tmp_path / "ck", device="cpu")
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_the_fp8_set_allocates_w4a8_on_fp8_tensor_cores(tmp_path):
    """``--abits 8`` offers W4A8 on fp8 tensor cores; the "fp8" set alone, at 4.25 bits, mixes its 4-bit codes
    (per channel or per group) with w8a8 fp8, and the checkpoint gives the model it was made from."""
    from mxmoe.pipeline import ABITS
    from mxmoe.schemes import Scheme, scheme_set

    assert set(scheme_set("fp8")) <= set(ABITS[8]) and Scheme.parse("w8a8_g-1_sym") in ABITS[8]
    model, res = run(tmp_path, method="rtn", schemes="fp8", wbits=4.25, out=tmp_path / "ck")
    chosen = set(res.scheme_map.values())
    assert chosen <= set(scheme_set("fp8")) and any(s.w_bits == 4 for s in chosen)
    assert res.manifest["bits"]["weight"] <= 4.25 + 1e-9
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    loaded = mxmoe.load_quantized(tmp_path / "ck", device="cpu")
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_sensitivity_cache_resumes_per_layer(tmp_path):
    _, first = run(tmp_path, method="rtn")
    cache = list((tmp_path / "cache").rglob("sensitivity_rtn_*.json"))
    assert len(cache) == 1
    doc = json.loads(cache[0].read_text())
    assert sorted(doc["layers"]) == ["0", "1"]
    del doc["layers"]["1"]  # as if killed after the first layer
    cache[0].write_text(json.dumps(doc))
    _, again = run(tmp_path, method="rtn")
    assert sorted(json.loads(cache[0].read_text())["layers"]) == ["0", "1"]
    assert again.scheme_map == first.scheme_map


def test_model_budget_and_expert_granularity(tmp_path):
    _, res = run(tmp_path, name="tiny-mixtral", method="rtn", budget="model", granularity="expert", wbits=3.5)
    assert res.manifest["bits"]["weight"] <= 3.5 + 1e-9
    for (layer, e, _), s in res.scheme_map.items():  # one scheme per expert
        assert s == res.scheme_map[layer, e, "gate"]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(wbits=1.5), "smallest achievable is 2 bits per weight and the largest 16"),
        (dict(wbits=3.0, r=1.5), "--r must be in"),
        (dict(wbits=3.0, abits=6), "--abits must be one of"),
        (dict(wbits=3.0, method="awq"), "--method must be one of"),
        (dict(wbits=3.0, calib_windows=0), "--calib-windows must be a positive"),
        (dict(wbits=3.0, schemes="w4a16_g64_asym"), "group sizes -1 or multiples of 128"),
        (dict(wbits=3.0, gpu="tpu-v9"), "no cost table"),
    ],
)
def test_bad_recipes(kw, message):
    with pytest.raises(MxMoEError, match=message.replace("[", r"\[")):
        check_recipe(Recipe(**kw))


def test_never_calibrates_on_test_or_task_data(tmp_path, shared_data):
    with pytest.raises(MxMoEError, match="refusing to calibrate on evaluation data"):
        check_calib_file(str(shared_data / "wikitext-2" / "wiki.test.raw"))
    with pytest.raises(MxMoEError, match="refusing"):
        check_calib_file(str(shared_data / "tasks" / "piqa.jsonl"))
    with pytest.raises(MxMoEError, match="neither"):
        check_calib_file(str(tmp_path / "missing.txt"))


def test_a_model_without_tokenizer_needs_random_calibration(tmp_path):
    with pytest.raises(MxMoEError, match="use --calib random"):
        run(tmp_path, calib="wikitext2")


def test_routing_read_off_the_sensitivity_pass_equals_profile_routing():
    from mxmoe.models.blocks import moe_blocks
    from mxmoe.pipeline import routing_from_sensitivity
    from mxmoe.profiles import random_windows
    from mxmoe.routing import profile_routing
    from mxmoe.sensitivity import compute_sensitivity

    model = fresh("tiny-deepseek-v2")
    windows = random_windows(512, 2, 32, 0)  # [2, 32]
    sens = compute_sensitivity(model, windows, ["w4a16_g-1_asym"], "rtn", progress=False)
    rout = routing_from_sensitivity(sens, moe_blocks(model), 512, "random")
    assert rout["counts"] == profile_routing(model, windows).tolist() and rout["tokens"] == 64
    assert [sum(row) for row in rout["workloads"]["512"]] == [512 * 2] * len(rout["layers"])


def test_gptq_hands_back_the_int_weights_the_model_holds():
    from mxmoe.models.blocks import moe_blocks
    from mxmoe.profiles import random_windows
    from mxmoe.quant.apply import block_weight, uniform_scheme_map
    from mxmoe.quant.sequential import quantize_model_gptq

    model = fresh("tiny-olmoe")
    plan = uniform_scheme_map(model, "w3a16_g-1_asym")
    got: dict = {}
    quantize_model_gptq(
        model, random_windows(512, 2, 32, 0), plan, hadamard=True, int_weights=got, min_tokens=4, progress=False
    )
    assert set(got) == set(plan)
    blocks = {b.layer: b for b in moe_blocks(model)}
    for (layer, e, name), iw in got.items():  # down as the model holds it: rotated for the online Hadamard
        assert torch.equal(iw.dequantize(), block_weight(blocks[layer], e, name).float()), (layer, e, name)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 500 for c in text]}


def test_calibration_from_a_text_file(tmp_path):
    from mxmoe.pipeline import calibration

    text = "".join(chr(97 + i % 26) for i in range(3000)) + "\n"
    (tmp_path / "mine.txt").write_text(text)
    windows, tag = calibration(
        Recipe(3.0, calib=str(tmp_path / "mine.txt"), calib_windows=3, seqlen=100), _CharTokenizer(), 512
    )
    assert tuple(windows.shape) == (3, 100) and tag == "file-mine.txt-n3-s100-seed0"
    ids = torch.tensor(_CharTokenizer()(text)["input_ids"])
    for w in windows:  # every window is a slice of the file's tokens
        assert any(torch.equal(ids[s : s + 100], w) for s in range(len(ids) - 100))
    with pytest.raises(MxMoEError, match="fewer than one window"):
        calibration(Recipe(3.0, calib=str(tmp_path / "mine.txt"), seqlen=5000), _CharTokenizer(), 512)
