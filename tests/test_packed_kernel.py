"""The loaded checkpoint's kernel path computes what the fake-quant (accuracy) path computes.

Runs in a child process with TRITON_INTERPRET=1, so ``group_gemm`` executes on the CPU; the
interpreter switch never leaks into other test modules.
"""

import json

from interp import ROOT, run_interpreted

# Activations of the weight-activation schemes are quantized by the kernel's own launch and by
# quantize_activation in the fake-quant path; the SiLU output they quantize differs in its last bits
# between the two paths, so an activation code may round the other way (as in test_kernels' MoE cases).
TOL = 5e-4  # measured: 3.6e-5 on tiny-qwen2-moe with the MIX allocation

SCRIPT = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
import mxmoe.packed as packed
from mxmoe.checkpoint import load_quantized
from test_checkpoint import ids, quantized_checkpoint

calls = []
kernel_forward = packed.moe_experts_forward
packed.moe_experts_forward = lambda *a, **k: calls.append(1) or kernel_forward(*a, **k)
model, out = quantized_checkpoint("tiny-qwen2-moe", Path({out!r}))
loaded = load_quantized(out, device="cpu")
x = ids(n=8)[:1]  # [1, 8]
with torch.no_grad():
    want, got = model(x).logits, loaded(x).logits  # [1, 8, V]
print(json.dumps({{"kernel": packed.uses_kernel(torch.device("cpu")), "kernel_calls": len(calls),
                  "rel": float((got - want).norm() / want.norm()), "finite": bool(torch.isfinite(got).all())}}))
"""


def test_kernel_logits_equal_fake_quant_logits(tmp_path):
    stdout = run_interpreted(["-c", SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "ck"))])
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["kernel"] and r["kernel_calls"] == 2, r  # both MoE layers ran through group_gemm
    assert r["finite"] and r["rel"] < TOL, r
