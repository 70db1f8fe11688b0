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
    [(576, (36, 16)), (2048, (1, 2048)), (3584, (28, 128)), (4096, (1, 4096)), (14336, (28, 512)),
     (1408, (44, 32)), (2560, (20, 128)), (1536, (12, 128)), (40, (20, 2)), (52, (52, 1)), (156, None), (7, None)],
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
