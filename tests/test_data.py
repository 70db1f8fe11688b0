import pytest
import torch

from mxmoe import data
from mxmoe.errors import DataUnavailable


class CharTokenizer:  # a deterministic stand-in: one token per byte
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(autouse=True)
def clear_caches():
    data.load_text.cache_clear()
    data._load_task_cached.cache_clear()
    yield
    data.load_text.cache_clear()
    data._load_task_cached.cache_clear()


def test_wikitext_test_is_the_gptq_string(shared_data):
    assert len(data.load_text("wikitext2", "test")) == 1_294_336


@pytest.mark.parametrize(
    "task,count,keys",
    [
        ("arc_easy", 2376, {"question", "choices", "label_index"}),
        ("arc_challenge", 1172, {"question", "choices", "label_index"}),
        ("piqa", 1838, {"goal", "sol1", "sol2", "label"}),
        ("winogrande", 1267, {"context_options", "continuation", "label"}),
        ("lambada_openai", 5153, {"text"}),
        ("lambada_standard", 5153, {"text"}),
        ("hellaswag", 10042, {"activity_label", "ctx", "endings", "label"}),
        ("boolq", 3270, {"passage", "question", "label"}),
    ],
)
def test_local_tasks(shared_data, task, count, keys):
    rows = data.load_task(task)
    assert len(rows) == count and set(rows[0]) == keys
    assert len(data.load_task(task, limit=5)) == 5


def test_calibration_windows_are_deterministic(shared_data):
    tok = CharTokenizer()
    a = data.calibration_windows(tok, "wikitext2", n=4, seqlen=64, seed=3)
    b = data.calibration_windows(tok, "wikitext2", n=4, seqlen=64, seed=3)
    c = data.calibration_windows(tok, "wikitext2", n=4, seqlen=64, seed=4)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    big = data.calibration_windows(tok, "sotu", n=2, seqlen=32, seed=0)  # sliced path for a large corpus
    assert big.shape == (2, 32) and torch.equal(big, data.calibration_windows(tok, "sotu", n=2, seqlen=32, seed=0))


def test_refuses_to_calibrate_on_test_split(shared_data):
    with pytest.raises(ValueError, match="test split"):
        data.calibration_windows(CharTokenizer(), "wikitext2", n=1, seqlen=8, split="test")


def test_missing_local_folder_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MXMOE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataUnavailable, match="wiki.test.raw does not exist.*MXMOE_DATA_DIR"):
        data.load_text("wikitext2", "test")


def test_neither_source_gives_one_clear_error(monkeypatch):
    monkeypatch.delenv("MXMOE_DATA_DIR", raising=False)

    def offline(*a, **k):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(data, "_hub", offline)
    with pytest.raises(DataUnavailable) as e:
        data.load_task("piqa")
    msg = str(e.value)
    assert "MXMOE_DATA_DIR is not set" in msg and "Hugging Face hub" in msg and "no route" in msg


def test_hub_fallback_converts_to_local_schema(monkeypatch):
    monkeypatch.delenv("MXMOE_DATA_DIR", raising=False)
    rows = {
        "allenai/winogrande": [
            {
                "sentence": "Sarah was better than Maria so _ got the easy cases.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": "2",
            }
        ],
        "allenai/ai2_arc": [
            {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}
        ],
        "wikitext": {"text": [" = A = \n", "", " b \n"]},
    }
    monkeypatch.setattr(data, "_hub", lambda path, name=None, split="test", **kw: rows[path])
    (w,) = data.load_task("winogrande")
    assert w == {
        "context_options": ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"],
        "continuation": "got the easy cases.",
        "label": 1,
    }
    assert data.load_task("arc_easy")[0]["label_index"] == 2
    assert data.load_text("wikitext2", "test") == " = A = \n\n\n\n\n b \n"


def test_local_only_corpus_without_folder(monkeypatch):
    monkeypatch.delenv("MXMOE_DATA_DIR", raising=False)
    with pytest.raises(DataUnavailable, match="local-only"):
        data.load_text("gutenberg", "train")
