"""``mxmoe bench occupancy`` and ``mxmoe bench route``: what they switch reaches the call and goes away after
it; without a GPU they exit 2."""

from __future__ import annotations

import pytest
import torch

from mxmoe.bench import occupancy
from mxmoe.kernels import triton_kernel as tk


def test_register_cap_adds_maxnreg_inside_the_block_only(monkeypatch):
    calls = []
    monkeypatch.setattr(tk.group_gemm_kernel, "run", lambda *a, **kw: calls.append(kw))
    with occupancy.register_cap(128):
        tk.group_gemm_kernel.run(grid=(1,))
    with occupancy.register_cap(None):
        tk.group_gemm_kernel.run(grid=(2,))
    tk.group_gemm_kernel.run(grid=(3,))
    assert calls == [{"grid": (1,), "maxnreg": 128}, {"grid": (2,)}, {"grid": (3,)}]


def test_variants_are_valid_tiles():
    from mxmoe.kernels.configs import TileConfig, check_config
    from mxmoe.schemes import Scheme

    for variants in occupancy.VARIANTS.values():
        assert "default" in variants
        for per_sm, cap, tile in variants.values():
            assert per_sm >= 1 and (cap is None or 24 <= cap <= 255)
            for s in occupancy.SCHEMES:
                if tile is not None:
                    check_config(Scheme.parse(s), TileConfig(tile[0], 128, 128, tile[1], swap_ab=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_exit_2(capsys):
    assert occupancy.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_route_benchmark_switches_the_path_for_the_call_only():
    from mxmoe.bench import route
    from mxmoe.kernels import moe

    ids = torch.tensor([[3, 1], [1, 0], [3, 3]])
    before = moe.ROUTE_ONE_PROGRAM_CELLS
    for limit in (0, 1 << 30):
        order, inv, offsets = route.timed_route(limit)(ids, 4)
        assert order.tolist() == [3, 1, 2, 0, 4, 5] and offsets.tolist() == [0, 1, 3, 3, 6]
        assert torch.equal(order[inv], torch.arange(6))
        assert moe.ROUTE_ONE_PROGRAM_CELLS == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_route_benchmark_without_a_gpu_exit_2(capsys):
    from mxmoe.bench import route

    assert route.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
