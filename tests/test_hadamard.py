import math

import pytest
import torch

from mxmoe.quant.hadamard import (
    Rotation,
    _paley,
    _paley_kind,
    apply_online_hadamard,
    hadamard_factors,
    hadamard_matrix,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    rotate_model,
)


def test_every_paley_order_up_to_108_and_a_prime_power_field():
    orders = [m for m in range(4, 109, 4) if _paley_kind(m)] + [244]  # 244 = 3^5 + 1 needs GF(243)
    assert {12, 20, 28, 36, 44, 52, 60, 108}.issubset(orders)
    for m in orders:
        H = _paley(m)
        assert set(H.unique().tolist()) == {-1, 1}
        assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.int64)), m


@pytest.mark.parametrize(
    "n, factors",
    [
        (576, (36, 16)),
        (2048, (1, 2048)),
        (3584, (28, 128)),
        (4096, (1, 4096)),
        (14336, (28, 512)),
        (1408, (44, 32)),
        (2560, (20, 128)),
        (1536, (12, 128)),
        (40, (20, 2)),
        (52, (52, 1)),
        (156, None),
        (7, None),
    ],
)
def test_factors_of_model_widths(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [1, 2, 12, 40, 52, 96, 576])
def test_hadamard_matrix_is_hadamard(n):
    H = hadamard_matrix(n)
    assert H.dtype == torch.float64 and torch.equal(H.abs(), torch.ones(n, n))
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_no_construction_is_a_clear_error():
    with pytest.raises(ValueError, match="no Hadamard construction for order 156"):
        hadamard_matrix(156)


@pytest.mark.parametrize("n", [64, 576])
def test_random_hadamard_is_seeded_and_orthogonal(n):
    Q = random_hadamard_matrix(n, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert torch.equal(Q, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(Q, random_hadamard_matrix(n, seed=4))
    signs = (Q * math.sqrt(n) / hadamard_matrix(n))[0]  # Q = H diag(s) / √n
    assert torch.equal(Q * math.sqrt(n), hadamard_matrix(n) * signs[None, :])


def test_fallback_to_random_orthogonal_warns():
    with pytest.warns(UserWarning, match="order 156"):
        Q = random_hadamard_matrix(156, seed=1)
    torch.testing.assert_close(Q @ Q.T, torch.eye(156, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(Q, random_orthogonal_matrix(156, seed=1))


@pytest.mark.parametrize("n", [20, 64, 576, 1408])
def test_online_hadamard_matches_the_matrix(n):
    x = torch.randn(5, 3, n, dtype=torch.float64)
    want = x @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(apply_online_hadamard(x), want, rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    out = apply_online_hadamard(xb)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.double(), xb.double() @ hadamard_matrix(n) / math.sqrt(n), rtol=2e-2, atol=2e-2)


def test_online_hadamard_rejects_widths_without_construction():
    with pytest.raises(ValueError, match="width 156"):
        apply_online_hadamard(torch.randn(2, 156))


def test_rotation_save_load_round_trip(tmp_path):
    rot = Rotation.random(576, seed=11)
    assert rot.kind == "hadamard"
    path = tmp_path / "sub" / "rotation.pt"
    rot.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["rotation.pt"]  # no temp file left behind
    back = Rotation.load(path)
    assert back.seed == 11 and back.kind == "hadamard" and torch.equal(back.matrix, rot.matrix)
    with pytest.warns(UserWarning):
        assert Rotation.random(156, seed=0).kind == "orthogonal"


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a saved mxmoe Rotation"):
        Rotation.load(path)


def _tiny(name: str, tied: bool):
    """A tiny random MoE with non-trivial norm scales (so that fusing them matters)."""
    from mxmoe.models.zoo import tiny_model

    model = tiny_model(name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    if tied:  # as in SmolLM2, which smollm2-moe is built from
        model.lm_head.weight = model.get_input_embeddings().weight
    return model


# qwen2-moe: shared expert + its sigmoid gate; deepseek-v2: a dense first layer, MLA; mixtral: tied head
@pytest.mark.parametrize("name, tied", [("tiny-qwen2-moe", False), ("tiny-deepseek-v2", False), ("tiny-mixtral", True)])
def test_rotate_model_keeps_logits(name, tied, tmp_path):
    model = _tiny(name, tied)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    embed = model.get_input_embeddings().weight.clone()
    rot = rotate_model(model, seed=5)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # a missed reader/writer gives ~5e-3
    torch.testing.assert_close(model.get_input_embeddings().weight, (embed.double() @ rot.matrix).float())
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    fused = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")
    assert rot.seed == 5 and all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith(fused))
    rot.save(tmp_path / "rot.pt")
    again = _tiny(name, tied)
    rotate_model(again, rotation=Rotation.load(tmp_path / "rot.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_rotate_model_rejects_a_rotation_of_the_wrong_size():
    from mxmoe.models.zoo import tiny_model

    with pytest.raises(ValueError, match="hidden size is 64"):
        rotate_model(tiny_model("tiny-mixtral"), rotation=Rotation.random(32, seed=0))
