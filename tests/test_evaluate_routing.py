import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mxmoe.errors import SeqLenTooLong
from mxmoe.metrics import perplexity
from mxmoe.models import moe_blocks
from mxmoe.models.zoo import TINY_CONFIGS, tiny_model
from mxmoe.routing import profile_routing, skew


def test_perplexity_matches_manual_nll():
    model = tiny_model("tiny-qwen2-moe")
    windows = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert perplexity(model, windows, batch_size=2) == pytest.approx(perplexity(model, windows), rel=1e-6)


def test_seqlen_longer_than_context():
    model = tiny_model("tiny-mixtral")  # context 256
    with pytest.raises(SeqLenTooLong, match="longer than the model's context of 256"):
        perplexity(model, torch.zeros(1, 512, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_routing_rows_sum_to_tokens_times_topk(name):
    model = tiny_model(name)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    counts = profile_routing(model, ids)
    blocks = moe_blocks(model)
    assert counts.shape == (len(blocks), blocks[0].num_experts) and counts.dtype.kind == "i"
    assert (counts.sum(axis=1) == ids.numel() * blocks[0].top_k).all()


def test_skew():
    assert skew(np.array([[4, 2, 1], [3, 3, 3]])).tolist() == [4.0, 1.0]
    assert np.isinf(skew(np.array([[5, 0]])))[0]
