"""The committed healed files rebuild the healed smollm2-moe-v2 (skipped until `mxmoe model heal` has written them)."""

import pytest
import torch

from mxmoe.models import heal, smollm2

pytestmark = pytest.mark.skipif(
    not heal.heal_files_present(smollm2.HEALED_DIR),
    reason="no healed files committed yet (run `mxmoe model heal` on a GPU)",
)


def test_healed_files_are_small_and_match_their_hashes():
    doc, layers = heal.load_heal(smollm2.HEALED_DIR)  # checks every sha256
    sizes = [(smollm2.HEALED_DIR / f).stat().st_size for f in doc["files"]]
    assert max(sizes) <= heal.SHARD_BYTES and sum(sizes) <= heal.TOTAL_BYTES
    assert sorted(layers) == list(range(30))


def test_build_with_files_reproduces_the_healed_perplexity(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mxmoe.metrics import eval_windows, perplexity

    monkeypatch.setenv("MXMOE_CACHE_DIR", str(tmp_path))
    doc, _ = heal.load_heal(smollm2.HEALED_DIR)
    path = smollm2.build(smollm2.V2_RECIPE)
    moe = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, tok = smollm2.moefy.load_dense()
    check = doc["check"]
    ppl = perplexity(moe, eval_windows(tok, check["seqlen"], check["windows"], split="valid"))
    assert ppl == pytest.approx(check["ppl_healed"], rel=0.01)
