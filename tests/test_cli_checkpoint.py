"""CLI: quantize, bench and generate on checkpoints, and bad input stopped before any model loads."""

import pytest
import torch

import mxmoe.models
from mxmoe.cli import main


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command loads or builds a model (validation must come first)."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    from mxmoe.models import smollm2

    monkeypatch.setattr(mxmoe.models, "load_model", refuse)
    monkeypatch.setattr(smollm2, "build", refuse)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny-mixtral checkpoint written by the CLI (RTN, random calibration ids)."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "ck"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MXMOE_CACHE_DIR", str(root / "cache"))  # the sensitivity cache, not the user's
        code = main(
            [
                "quantize",
                "tiny-mixtral",
                "--wbits",
                "3.25",
                "--method",
                "rtn",
                "--calib",
                "random",
                "--calib-windows",
                "2",
                "--seqlen",
                "32",
                "--schemes",
                "w4a16_g-1_asym,w2a16_g-1_asym,w8a16_g-1_sym",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    return out


def test_quantize_prints_stage_times_and_writes_a_checkpoint(checkpoint, capsys, monkeypatch, tmp_path):
    from mxmoe.checkpoint import read_manifest

    doc = read_manifest(checkpoint)
    assert doc["base"]["id"] == "tiny-mixtral" and doc["bits"]["weight"] <= 3.25
    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path))
    out = tmp_path / "again"
    assert (
        main(
            [
                "quantize",
                "tiny-mixtral",
                "--wbits",
                "3.25",
                "--method",
                "rtn",
                "--calib",
                "random",
                "--calib-windows",
                "2",
                "--seqlen",
                "32",
                "--schemes",
                "w4a16_g-1_asym,w2a16_g-1_asym",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "stage times: calibration" in text and "sensitivity" in text and f"written to {out}" in text


def test_bench_on_cpu_says_so(checkpoint, capsys):
    assert main(["bench", str(checkpoint), "--tokens", "16", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bf16 base" in out and "mxmoe" in out and "a CPU measurement" in out and "tokens/s" in out


def test_bench_refuses_another_base(checkpoint, capsys):
    assert main(["bench", str(checkpoint), "--base", "tiny-olmoe", "--tokens", "16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "was quantized from weights sha256" in err and "Traceback" not in err


def test_eval_takes_a_checkpoint_folder(checkpoint, capsys):
    assert main(["eval", "ppl", str(checkpoint)]) == 2  # it loads, then: a random tiny model has no tokenizer
    assert "has no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "ppl", "smollm2-moe", "--seqlen", "0"], "--seqlen must be a positive number, got 0"),
        (["eval", "ppl", "smollm2-moe", "--windows", "-2"], "--windows must be 0 or more"),
        (["routing", "profile", "tiny-mixtral", "--windows", "-1"], "--windows must be 0 or more, got -1"),
        (["routing", "corpora", "smollm2-moe", "--windows", "0"], "--windows must be a positive number"),
        (["sensitivity", "smollm2-moe", "--seqlen", "-5"], "--seqlen must be a positive number"),
        (["eval", "zeroshot", "smollm2-moe", "--limit", "0"], "limit must be a positive"),
        (["eval", "zeroshot", "smollm2-moe", "--batch-size", "0"], "--batch-size must be a positive"),
        (
            ["quantize", "smollm2-moe", "--wbits", "1.5", "--out", "{tmp}/q"],
            "smallest achievable is 2 bits per weight and the largest 16",
        ),
        (
            ["quantize", "smollm2-moe", "--wbits", "3", "--abits", "4", "--out", "{tmp}/q"],
            "smallest achievable is 4 bits per weight and the largest 4.25",
        ),
        (["quantize", "smollm2-moe", "--wbits", "3", "--r", "-0.1", "--out", "{tmp}/q"], "--r must be in [0, 1]"),
        (
            ["quantize", "smollm2-moe", "--wbits", "3", "--calib", "{tmp}/none.txt", "--out", "{tmp}/q"],
            "nor an existing",
        ),
        (
            ["quantize", "smollm2-moe", "--wbits", "3", "--schemes", "w4a4_g-1_asym", "--out", "{tmp}/q"],
            "must be symmetric",
        ),
        (["quantize", "no-such-model", "--wbits", "3", "--out", "{tmp}/q"], "unknown model 'no-such-model'"),
        (["quantize", "smollm2-moe", "--wbits", "3", "--out", "{tmp}/missing/q"], "parent folder"),
        (["eval", "ppl", "{tmp}"], "neither an mxmoe checkpoint (no mxmoe.json) nor a model folder"),
        (["eval", "ppl", "./no/such/folder"], "no such folder"),
        (["bench", "tiny-mixtral"], "is not a folder: expected an mxmoe checkpoint"),
        (["bench", "{tmp}"], "neither an mxmoe checkpoint"),
        (["bench", "{tmp}", "--tokens", "0"], "--tokens must be a positive"),
        (["generate", "smollm2-moe", "hello", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
        (["generate", "smollm2-moe", "  "], "the prompt is empty"),
    ],
)
def test_bad_input_exits_2_before_any_model_loads(no_model_loads, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxmoe: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "q").exists()


def test_checkpoint_is_not_a_base_model(no_model_loads, checkpoint, tmp_path, capsys):
    for argv in (
        ["sensitivity", str(checkpoint)],
        ["quantize", str(checkpoint), "--wbits", "3", "--out", str(tmp_path / "q")],
        ["bench", str(checkpoint), "--base", str(checkpoint)],
    ):
        assert main(argv) == 2
        assert "is a quantized mxmoe checkpoint; this command needs its full-precision base" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_asked_without_gpu(no_model_loads, checkpoint, capsys):
    assert main(["generate", str(checkpoint), "hi", "--device", "cuda"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_missing_out_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        main(["quantize", "tiny-mixtral", "--wbits", "3"])
    assert e.value.code == 2


def test_model_info_on_a_checkpoint(checkpoint, capsys):
    assert main(["model", "info", str(checkpoint)]) == 0
    assert "experts (routed + shared)  8 + 0" in capsys.readouterr().out


@pytest.fixture
def a100(monkeypatch):
    """Pretend this machine has a GPU of compute capability 8.0 (no fp8 tensor cores)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")


def test_fp8_schemes_on_a_pre_sm89_gpu(a100, no_model_loads, tmp_path, capsys):
    assert main(["quantize", "tiny-mixtral", "--wbits", "8", "--abits", "8", "--out", str(tmp_path / "q")]) == 2
    assert "fp8 tensor cores (sm_89 or newer); NVIDIA A100-SXM4-80GB is sm_80" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_fp8_checkpoint_does_not_load_on_a_pre_sm89_gpu(a100, tmp_path, capsys):
    from test_checkpoint import quantized_checkpoint  # its MIX allocation has fp8 blocks

    _, out = quantized_checkpoint("tiny-mixtral", tmp_path / "ck")
    assert main(["generate", str(out), "hi", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'w8a8_g-1_sym_fp8'" in err and "need fp8 tensor cores" in err and err.count("\n") == 1
