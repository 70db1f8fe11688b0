"""The kernel compiled for sm_90a without a GPU (mxmoe.bench.sass): the listing parser and the facts of real compiles."""

import pytest

from mxmoe.bench import sass
from mxmoe.kernels.configs import TileConfig, default_config
from mxmoe.schemes import Scheme

LISTING = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   LDS.U16 R2, [R3] ;
        /*0120*/                   LOP3.LUT R4, R2, 0xf000f, RZ, 0xc0, !PT ;
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, R4, gdesc[UR4], R24 ;
        /*0140*/               @P0 BRA 0x110 ;
        /*0150*/                   HADD2.BF16_V2 R5, R4, R4 ;
        /*0160*/              @!P1 BRA 0x100 ;
        /*0170*/                   EXIT ;
"""


def test_listing_parser_finds_the_innermost_loop_around_the_mma():
    insns = sass.sass_instructions(LISTING)
    assert [op for _, op, _ in insns][:3] == ["MOV", "LDS.U16", "LOP3.LUT"]
    loop = sass.k_loop(insns)
    assert [a for a, _, _ in loop] == [0x110, 0x120, 0x130, 0x140]  # not the outer loop from 0x100
    assert [sass._class(op) for _, op, _ in loop] == ["load_shared", "int_logic", "mma", "other"]


def test_no_loop_without_an_mma():
    assert sass.k_loop(sass.sass_instructions(LISTING.replace("HGMMA.64x64x16.F32.BF16", "FFMA"))) == []


needs_tools = pytest.mark.skipif(not (sass.TOOLS / "ptxas").exists(), reason="this Triton wheel has no ptxas")


@needs_tools
def test_w4a16_prefill_tile_compiles_without_spills_and_reads_as_a_wgmma_loop():
    s = Scheme.parse("w4a16_g128_asym")
    f = sass.kernel_facts([(s, default_config(s, 34.0))])
    assert f.spill_bytes == 0 and not f.serialized_wgmma
    assert 0 < f.registers <= 255
    assert f.wgmma > 0 and f.loop_mix.get("mma", 0) > 0  # register-operand wgmma in the K loop
    assert f.cp_async > 0  # weight and activation loads are multi-buffered copies to shared memory
    assert 5 < f.alu_per_8 < 100
    assert f.as_dict()["slots"][0][0] == "w4a16_g128_asym"


@needs_tools
def test_bf16_tile_keeps_a_wgmma_in_flight():
    f = sass.kernel_facts([("bf16", TileConfig(64, 128, 64, 4))])
    assert f.async_wgmma and f.wait_depths[-1] >= 1
    assert f.alu_per_8 is None  # no weight to dequantize


@needs_tools
def test_mixed_launch_reports_shared_resources_only():
    slots = [
        (Scheme.parse("w8a8_g-1_sym_fp8"), TileConfig(64, 128, 128, 3)),
        ("w4a16_g-1_asym", TileConfig(64, 128, 128, 3, True)),
    ]
    f = sass.kernel_facts(slots)
    assert f.loop_instructions is None and f.registers > 0 and len(f.slots) == 2


def test_survey_compiles_the_mixes_with_the_tiles_group_gemm_picks(monkeypatch):
    """A mixed launch is surveyed as ``launch_plan`` plans it: the fp8 4.25-bit mix at 8192 tokens stays on one
    warpgroup (both slots' one-warpgroup tiles), not each scheme's tile alone."""
    import importlib

    from mxmoe.bench.cases import MIXES

    monkeypatch.setattr(importlib.import_module("mxmoe.kernels.group_gemm"), "INTERPRET", False)
    seen = []

    class Facts:
        def as_dict(self):
            return {}

    monkeypatch.setattr(sass, "kernel_facts", lambda slots, arch=90: seen.append(slots) or Facts())
    mix = "mix4.25_w4a8+w8a8_fp8"
    sass.survey(schemes=(), regimes={"prefill 8192": 546.0}, mixes={mix: MIXES[mix]})
    (slots,) = seen
    tiles = {str(s): c for s, c in slots}
    assert tiles == {
        "w8a8_g-1_sym_fp8": TileConfig(128, 128, 128, 3, warps=4),
        "w4a8_g-1_sym_fp8": TileConfig(128, 128, 128, 3, swap_ab=True, warps=4),
    }
