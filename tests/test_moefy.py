import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mxmoe.models import moe_blocks, moefy


def tiny_dense():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_balanced_kmeans_gives_equal_clusters():
    feats = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))
    labels = moefy.balanced_kmeans(feats, 6, iters=5, seed=0)
    assert torch.bincount(labels, minlength=6).tolist() == [8] * 6


def test_all_experts_selected_reproduces_the_dense_model():
    dense = tiny_dense()
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = moefy.MoefyConfig(
        num_experts=8, top_k=8, shared_width=16, router_tokens=64, router_spread=1e-6, kmeans_iters=3
    )
    inputs = moefy.collect_ffn_inputs(dense, ids)
    splits = {}
    for i in range(2):
        splits[i], err = moefy.split_layer(dense.model.layers[i].mlp, inputs[i], cfg, seed=i)
        assert err < 2e-3  # every expert is selected: only the ridge shrinks the scales
        assert sorted(torch.cat([splits[i].shared, splits[i].experts.flatten()]).tolist()) == list(range(80))
    moe = moefy.assemble(dense, splits, cfg)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=5e-3, rtol=1e-3)
    blocks = moe_blocks(moe)
    assert [b.layer for b in blocks] == [0, 1] and blocks[0].expert_width == 8


def test_sparse_layers_subset_keeps_other_layers_dense():
    dense = tiny_dense()
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = moefy.MoefyConfig(num_experts=8, top_k=2, shared_width=16, router_tokens=48, kmeans_iters=2)
    inputs = moefy.collect_ffn_inputs(dense, ids)
    split, err = moefy.split_layer(dense.model.layers[1].mlp, inputs[1], cfg, seed=0)
    assert 0 < err < 1.5
    moe = moefy.assemble(dense, {1: split}, cfg)
    assert [b.layer for b in moe_blocks(moe)] == [1] and moe_blocks(moe)[0].top_k == 2
    torch.testing.assert_close(moe.model.layers[0].mlp.gate_proj.weight, dense.model.layers[0].mlp.gate_proj.weight)


def test_half_written_cache_is_not_used(tmp_path, monkeypatch):
    import pytest

    from mxmoe.errors import ModelNotFound
    from mxmoe.models import load_model, smollm2

    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path))
    partial = smollm2.model_dir()
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # a build killed before build.json was written
    assert not smollm2.is_built()
    with pytest.raises(ModelNotFound, match="not built yet"):
        load_model("smollm2-moe", build=False)


def test_choose_moe_layers_takes_the_most_that_fit(monkeypatch):
    import pytest

    from mxmoe.errors import MxMoEError

    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=7,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    dense = LlamaForCausalLM(cfg)
    layers = dense.model.layers
    errors = {i: 0.1 * i for i in range(7)}
    blocks = {i: torch.nn.Identity() for i in range(7)}

    def fake_ppl(model, dev, desc=""):  # 10 + 1 per sparse layer
        return 10.0 + sum(isinstance(layer.mlp, torch.nn.Identity) for layer in model.model.layers)

    monkeypatch.setattr(moefy, "perplexity", fake_ppl)
    chosen, ppl = moefy.choose_moe_layers(dense, blocks, errors, None, 10.0, max_ratio=1.35)
    assert chosen == [0, 1, 2] and ppl == 13.0  # lowest-error layers first; 4 would give 14 > 13.5
    assert all(not isinstance(layer.mlp, torch.nn.Identity) for layer in layers)  # originals restored
    assert moefy.choose_moe_layers(dense, blocks, errors, None, 10.0, max_ratio=2.0)[0] == list(range(7))
    with pytest.raises(MxMoEError, match="even one sparse layer"):
        moefy.choose_moe_layers(dense, blocks, errors, None, 10.0, max_ratio=1.05)
