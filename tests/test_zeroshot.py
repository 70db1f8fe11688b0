"""Zero-shot tasks: the repo's lm-eval YAMLs render the documented prompts; evaluate_tasks end to end."""

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mxmoe.cli import main
from mxmoe.errors import MxMoEError
from mxmoe.models.zoo import tiny_model
from mxmoe.zeroshot import UnknownTask, evaluate_tasks, load_tasks


def _first(task) -> dict:
    return (task.test_docs() if task.has_test_docs() else task.validation_docs())[0]


def test_yamls_render_the_documented_prompts(shared_data):
    tasks = load_tasks(
        ["arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "lambada_standard", "hellaswag", "boolq"]
    )
    assert {t.task_name for t in tasks.values()} == {f"mxmoe_{n}" for n in tasks}
    assert all(t.config.target_delimiter == " " for t in tasks.values())

    arc = tasks["arc_easy"]
    doc = _first(arc)
    assert arc.doc_to_text(doc) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert arc.doc_to_choice(doc)[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.doc_to_target(doc) == 0
    assert _first(tasks["arc_challenge"])["question"].startswith("An astronomer observes")

    piqa = tasks["piqa"]
    doc = _first(piqa)
    assert piqa.doc_to_text(doc) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]] and piqa.doc_to_target(doc) == 0

    wino = tasks["winogrande"]
    doc = _first(wino)
    assert wino.multiple_input == 2  # partial scoring: two contexts, one continuation
    assert wino.doc_to_choice(doc) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino.doc_to_text(doc) == 1 and wino.doc_to_target(doc) == "always got the easier cases."

    for name in ("lambada_openai", "lambada_standard"):
        lam = tasks[name]
        doc = _first(lam)
        context, target = doc["text"].rsplit(" ", 1)
        assert lam.doc_to_text(doc) == context and lam.doc_to_target(doc) == " " + target
    assert tasks["lambada_openai"].doc_to_target(_first(tasks["lambada_openai"])) == " signs"

    hs = tasks["hellaswag"]
    doc = _first(hs)
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert hs.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof." and hs.doc_to_target(doc) == 3

    bq = tasks["boolq"]
    doc = _first(bq)
    assert (
        bq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert bq.doc_to_choice(doc) == ["no", "yes"] and bq.doc_to_target(doc) == 0


def _byte_tokenizer():
    """A byte-level tokenizer without merges: ids 0-2 special, then the 256 bytes (fits vocab 512)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def test_evaluate_tasks_on_a_tiny_model(shared_data):
    model = tiny_model("tiny-qwen2-moe")
    model.set_experts_implementation("eager")  # grouped_mm is slow on CPU
    res = evaluate_tasks(model, _byte_tokenizer(), tasks=["piqa", "winogrande"], limit=2, batch_size=4)
    assert res["piqa"]["metric"] == "acc_norm" and res["winogrande"]["metric"] == "acc"
    for r in res.values():
        assert r["n"] == 2 and 0.0 <= r["value"] <= 1.0


@pytest.mark.parametrize(
    "tasks, limit, error",
    [
        (["arc_easy", "mmlu"], None, UnknownTask),
        ([], None, MxMoEError),
        (["piqa"], 0, MxMoEError),
        (["piqa"], -3, MxMoEError),
    ],
)
def test_bad_input_is_a_clear_error(tasks, limit, error):
    with pytest.raises(error, match="mmlu|no zero-shot task|limit must be a positive"):
        evaluate_tasks(None, None, tasks=tasks, limit=limit)


def test_cli_rejects_bad_input_with_exit_2(capsys):
    assert main(["eval", "zeroshot", "tiny-qwen2-moe", "--tasks", "nope"]) == 2
    assert main(["eval", "zeroshot", "tiny-qwen2-moe", "--limit", "0"]) == 2
    assert main(["eval", "zeroshot", "tiny-qwen2-moe", "--tasks", "piqa"]) == 2  # no tokenizer
    err = capsys.readouterr().err
    assert "unknown zero-shot task" in err and "limit must be a positive" in err and "needs a tokenizer" in err
