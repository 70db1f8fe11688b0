import numpy as np
import pytest
import torch

import mxmoe.metrics
from mxmoe.errors import MxMoEError
from mxmoe.models.zoo import tiny_model
from mxmoe.routing import batch_workload, corpus_windows, gini, routing_report, skew_stats, top_share
from mxmoe.stages.routing import profile_corpora


torch.set_num_threads(1)  # tiny tensors: a second thread only spins on the shared 2-core machine


def char_tokenizer(text, add_special_tokens=False):
    """A stand-in tokenizer: one id per character."""
    return {"input_ids": [ord(c) % 500 for c in text]}


def test_gini_and_top_share_hand_worked():
    counts = np.array([[5, 5, 5, 5], [1, 2, 3, 4], [0, 0, 0, 10]])
    np.testing.assert_allclose(gini(counts), [0.0, 0.25, 0.75])
    np.testing.assert_allclose(top_share(counts), [0.25, 0.4, 1.0])  # ceil(0.1 * 4) = 1 expert
    wide = np.arange(1, 21)[None]  # 20 experts: the top 2 hold 39 of 210 tokens
    np.testing.assert_allclose(top_share(wide), [39 / 210])
    with pytest.raises(ValueError, match="no tokens"):
        gini(np.zeros((1, 4)))


def test_batch_workload_rounds_to_the_batch():
    counts = np.array([[1, 1, 1, 0], [600, 300, 90, 10]])
    w = batch_workload(counts, 512, top_k=2)
    assert w.dtype == np.int64 and (w.sum(axis=1) == 1024).all()
    assert w[0, 3] == 0 and sorted(w[0, :3]) == [341, 341, 342]
    np.testing.assert_array_equal(w[1], [615, 307, 92, 10])  # 614.4, 307.2, 92.16, 10.24: the one left over goes to .4


def test_skew_stats_flags_unused_experts():
    s = skew_stats(np.array([[4, 2, 0], [3, 3, 3]]))
    assert s["max_over_min"] == [None, 1.0] and s["unused_experts"] == [1, 0]


def test_routing_report_on_a_tiny_model():
    model = tiny_model("tiny-olmoe")
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    r = routing_report(model, ids, batches=(512, 8192))
    counts = np.array(r["counts"])
    assert r["layers"] == [0, 1] and counts.shape == (2, 8) and (counts.sum(axis=1) == 80 * 2).all()
    assert all(np.array(r["workloads"][b]).sum(axis=1).tolist() == [int(b) * 2] * 2 for b in ("512", "8192"))
    assert 0 <= min(r["skew"]["gini"]) and max(r["skew"]["top10_share"]) <= 1


def test_corpus_windows(shared_data, monkeypatch):
    w = corpus_windows(char_tokenizer, "wikitext2", 3, 64)
    assert w.shape == (3, 64)
    s = corpus_windows(char_tokenizer, "c4", 2, 64, seed=1)
    assert s.shape == (2, 64) and torch.equal(s, corpus_windows(char_tokenizer, "c4", 2, 64, seed=1))
    with pytest.raises(MxMoEError, match="unknown text"):
        corpus_windows(char_tokenizer, "python-code", 2, 64)
    with pytest.raises(MxMoEError, match="only"):
        corpus_windows(char_tokenizer, "wikitext2", 10**6, 64)
    monkeypatch.setattr(mxmoe.metrics, "load_text", lambda *a, **k: "")
    with pytest.raises(MxMoEError, match="fewer than one window"):
        corpus_windows(char_tokenizer, "wikitext2", 1, 64)


def test_profile_corpora_needs_a_tokenizer():
    with pytest.raises(MxMoEError, match="no tokenizer"):
        profile_corpora("tiny-mixtral", corpora=("wikitext2",))
