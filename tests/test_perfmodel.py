"""Performance model: wave effect, monotonicity, source labels, and validation against the H100 benchmark."""

from pathlib import Path

import pytest

from mxmoe.bench.runs import COUNTED
from mxmoe.bench.validate import validate
from mxmoe.kernels.configs import TileConfig
from mxmoe.perfmodel import SOURCES, block_time, launch_time, load_table, roofline_table, tile_cost, tiles_of
from mxmoe.schemes import Scheme

BENCH = (
    Path(__file__).resolve().parents[1] / "results" / "kernels" / next(n for n in COUNTED if n.endswith("_all.json"))
)


@pytest.fixture(scope="module")
def h100():
    return load_table("nvidia_h100")


def test_tiles_and_wave_floor(h100):
    assert tiles_of(130, 300, TileConfig(64, 128, 128)) == 3 * 3
    assert tiles_of(0, 300, TileConfig(64, 128, 128)) == 0
    one = block_time("w8a8_g-1_sym", 128, 256, 2048, h100, standalone=True)  # one tile: a whole tile time
    full = block_time("w8a8_g-1_sym", 128 * h100.sms, 256, 2048, h100, standalone=True)  # one tile per SM
    assert one.tiles == 1 and full.tiles == h100.sms
    assert one.ms == pytest.approx(full.ms)  # under one wave the time does not shrink
    share = block_time("w8a8_g-1_sym", 128, 256, 2048, h100)
    assert share.ms == pytest.approx(one.ms / h100.sms)  # the ILP's additive share
    two = block_time("w8a8_g-1_sym", 2 * 128 * h100.sms, 256, 2048, h100, standalone=True)
    assert two.ms == pytest.approx(2 * full.ms)


def test_time_grows_with_rows_and_k(h100):
    for s in ("bf16", "w4a16_g-1_asym", "w8a8_g-1_sym", "w3a16_g128_asym"):
        times = [block_time(s, m, 2816, 2048, h100, rows_per_expert=64).ms for m in (1, 65, 300, 3000)]
        assert times == sorted(times) and times[0] > 0
        ks = [
            tile_cost(Scheme.parse(s), TileConfig(64, 128, 128 if s != "bf16" else 64), k, h100)[0]
            for k in (32, 576, 1408, 2048, 4096)
        ]
        assert ks == sorted(ks) and ks[0] > 0


def test_source_labels(h100):
    assert block_time("w8a8_g-1_sym", 512, 2816, 2048, h100, rows_per_expert=40).source == "cost-table"
    assert block_time("w3a16_g128_asym", 512, 2816, 2048, h100, rows_per_expert=40).source == "cost-table"
    assert block_time("w3a16_g-1_asym", 512, 2816, 2048, h100, rows_per_expert=40).source == "cost-table-scaled"
    bare = roofline_table("some gpu", 100, 2000.0, 500.0, 1000.0, 1000.0)
    est = block_time("w8a8_g-1_sym", 512, 2816, 2048, bare)
    assert est.source == "predicted-roofline" and est.ms > 0
    vendor = load_table("nvidia_h100", tables_dir="/nonexistent")
    assert not vendor.measured and block_time("bf16", 64, 256, 256, vendor).source == "predicted-roofline"
    mixed = launch_time([("w8a8_g-1_sym", 40, 2816, 2048), ("w3a16_g-1_asym", 40, 2816, 2048)], h100)
    assert mixed.source == "cost-table-scaled" and set(SOURCES) >= {mixed.source}


@pytest.mark.parametrize("scheme", ["w4a8_g-1_sym_fp8", "w4a8_g128_sym_fp8"])
def test_unmeasured_fp8_int_codes_are_scaled_from_the_fp8_path_and_say_so(h100, scheme):
    """Without cost points of their own the estimate comes from the measured w8a8 fp8 fit (same kernel path),
    labelled."""
    import dataclasses

    from mxmoe.perfmodel import tile_fit

    s = Scheme.parse(scheme)
    unmeasured = tuple(p for p in h100.points if not p["scheme"].startswith("w4a8_"))  # no fp8 integer codes
    h100 = dataclasses.replace(h100, points=unmeasured)
    est = block_time(s, 4096, 2816, 2048, h100, rows_per_expert=500)
    assert est.source == "cost-table-scaled" and est.ms > 0
    fit, factor, _ = tile_fit(s, TileConfig(128, 128, 128), h100)
    w8 = {tile_fit(Scheme.parse("w8a8_g-1_sym_fp8"), TileConfig(bm, bn, 128), h100)[0] for bm, bn in _tiles(h100)}
    assert fit in w8 and factor > 0  # a w8a8 fp8 fit, scaled by the roofline ratio of the two tiles


def _tiles(table) -> set:
    return {(p["tile"]["bm"], p["tile"]["bn"]) for p in table.points if p["scheme"] == "w8a8_g-1_sym_fp8"}


def test_unknown_gpu_is_clear():
    from mxmoe.errors import MxMoEError

    with pytest.raises(MxMoEError, match="no cost table .* vendor"):
        load_table("mi300x", tables_dir="/nonexistent")


def test_validation_on_h100_bench(h100):
    v = validate(BENCH, h100)
    assert v["n_mixed"] >= 10 and v["mixed_median_abs_err"] < 0.15
    held = validate(BENCH, h100, holdout=True)
    assert held["mixed_median_abs_err"] < 0.15  # each shape predicted without its own points
