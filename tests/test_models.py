import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mxmoe.errors import ModelNotFound, NotMoEModel
from mxmoe.models import load_model, moe_blocks
from mxmoe.models.zoo import TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def block_output_via_view(b, x):
    weights, idx = b.route(x)  # [T, k]
    out = b.shared_forward(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], idx[t]):
            out[t] += w * b.expert_forward(int(e), x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_view_reproduces_block_forward(name):
    model = tiny_model(name)
    blocks = moe_blocks(model)
    assert len(blocks) == 2 and all(b.num_experts == 8 and b.top_k == 2 for b in blocks)
    if "deepseek" in name:  # first layer is dense and skipped
        assert [b.layer for b in blocks] == [1, 2]
        assert len(blocks[0].shared) == 1
    torch.manual_seed(1)
    for b in blocks:
        x = torch.randn(6, b.hidden_size)
        with torch.no_grad():
            expected = b.module(x[None])[0] if not isinstance(b.module(x[None]), tuple) else b.module(x[None])[0][0]
            got = block_output_via_view(b, x)
        torch.testing.assert_close(got, expected.reshape_as(got), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_expert_weights_read_write(name):
    b = moe_blocks(tiny_model(name))[0]
    for block, shape in (
        ("gate", (b.expert_width, b.hidden_size)),
        ("up", (b.expert_width, b.hidden_size)),
        ("down", (b.hidden_size, b.expert_width)),
    ):
        w = b.expert_weight(3, block)
        assert tuple(w.shape) == shape
        new = torch.randn(shape)
        b.set_expert_weight(3, block, new)
        torch.testing.assert_close(b.expert_weight(3, block), new)
        assert not torch.equal(b.expert_weight(2, block), new)
    with pytest.raises(ValueError, match="shape"):
        b.set_expert_weight(0, "gate", torch.zeros(1, 1))
    with pytest.raises(IndexError):
        b.expert_weight(8, "gate")


class LegacyExpert(nn.Module):  # transformers-4 Mixtral expert: w1 gate, w3 up, w2 down
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3, self.w2 = (
            nn.Linear(h, i, bias=False),
            nn.Linear(h, i, bias=False),
            nn.Linear(i, h, bias=False),
        )

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class LegacyMixtralSparseMoeBlock(nn.Module):
    def __init__(self, h=16, i=8, e=4, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(LegacyExpert(h, i) for _ in range(e))

    def forward(self, x):  # x: [T, H]
        probs = torch.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                out[t] += w[t, j] * self.experts[int(idx[t, j])](x[t])
        return out


def test_per_expert_legacy_layout():
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].block_sparse_moe = LegacyMixtralSparseMoeBlock()
    (b,) = moe_blocks(model)
    assert not b.fused and (b.num_experts, b.top_k, b.hidden_size, b.expert_width, b.layer) == (4, 2, 16, 8, 0)
    assert b.expert_weight(1, "down") is model.layers[0].block_sparse_moe.experts[1].w2.weight
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(block_output_via_view(b, x), b.module(x), atol=1e-5, rtol=1e-4)


def test_dense_model_is_rejected_with_supported_classes():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(NotMoEModel, match="Mixtral.*Qwen2-MoE.*Qwen3-MoE.*OLMoE.*DeepSeek-V2.*DeepSeek-V3"):
        moe_blocks(LlamaForCausalLM(cfg))


def test_unknown_model_name():
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'.*smollm2-moe"):
        load_model("no-such-model")


def test_tiny_models_are_deterministic():
    a, b = tiny_model("tiny-qwen2-moe"), tiny_model("tiny-qwen2-moe")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_model_card_follows_the_build(tmp_path, monkeypatch):
    """A card written for another build id (smollm2-moe before its healed files landed) is rewritten; one of the
    same build id is kept, also when it was measured on another machine's build folder (other library versions)."""
    import json

    from mxmoe.models import smollm2
    from mxmoe.stages import model as stage

    monkeypatch.setenv("MXMOE_RESULTS_DIR", str(tmp_path))
    build = tmp_path / "cache" / "smollm2-moe-v2-abc"
    build.mkdir(parents=True)
    (build / "build.json").write_text("{}")
    monkeypatch.setattr(smollm2, "build", lambda recipe, force=False: build)
    monkeypatch.setattr(smollm2, "build_id", lambda recipe: "smollm2-moe-v2-id")
    monkeypatch.setattr(stage.moefy, "load_dense", lambda: (None, None))
    monkeypatch.setattr(stage.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: torch.nn.Identity())
    written = []
    monkeypatch.setattr(stage, "write_card", lambda dense, moe, tok, info, name: written.append(info["build_id"]))
    card = tmp_path / "smollm2-moe" / "model.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"build": "smollm2-moe-1b1885197761"}))  # the training-free build's card
    stage.build_model(name="smollm2-moe")
    assert written == ["smollm2-moe-v2-id"]
    card.write_text(json.dumps({"build": "smollm2-moe-v2-gpu", "build_id": "smollm2-moe-v2-id"}))
    stage.build_model(name="smollm2-moe")
    assert written == ["smollm2-moe-v2-id"]  # same build id, another folder: not measured again
    stage.build_model(force=True, name="smollm2-moe")
    assert written == ["smollm2-moe-v2-id"] * 2
