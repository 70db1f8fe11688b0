import pytest

from mxmoe.cli import main, parser


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("model", "eval", "routing"):
        assert stage in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["model", "info", "no-such-model"], "unknown model 'no-such-model'"),
        (["eval", "ppl", "tiny-mixtral"], "has no tokenizer"),
        (["routing", "profile", "not/a-real-model-id"], "could not load 'not/a-real-model-id'"),
        (["model", "heal", "--budget-s", "0"], "--budget-s must be > 0 seconds"),  # before any model loads
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxmoe: error: ") and message in err and "Traceback" not in err


def test_model_info_on_tiny_model(capsys):
    assert main(["model", "info", "tiny-deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "experts (routed + shared)" in out and "8 + 1" in out and "2 / 3" in out


def test_parser_defaults():
    args = parser().parse_args(["eval", "ppl"])
    assert (args.name, args.seqlen, args.windows) == ("smollm2-moe", 1024, 16)
