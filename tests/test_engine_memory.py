"""What a stage holds in memory: the weights read in place from the GGUF (no copy, the tied head
once), logits only for the rows that sample, the MLP's scratch bounded by MLP_ROWS whatever the
batch, and the peak RSS of a whole-model process within its file + KV + a small allowance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeserve.common.model_files import embedded_gguf_path, open_gguf
from pipeserve.kernels import QLinear
from pipeserve.modeling import layers, llama
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.layers import modules
from tests.engine_torch import run_stages
from tests.layer_reference import module_forward
from tests.tiny_models import make_tiny


def _file_mapped(addrs: list[int]) -> list[bool]:
    """Whether each address lies in a mapping of a .gguf file (not anonymous memory)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi, len(parts) > 5 and parts[5].endswith(".gguf")))
    return [next(gguf for lo, hi, gguf in spans if lo <= a < hi) for a in addrs]


def test_weights_are_read_in_place_and_the_tied_head_is_the_embedding(smol_full):
    """Every matrix of the whole SmolLM2 stays in the GGUF's map, the tied head included (one
    copy, never dequantized); the only anonymous ones are llama's q and k, whose rows the loader
    reorders (a copy of exactly their file bytes)."""
    model = smol_full.model
    assert model.lm_head.parts[0] is model.embed_tokens.weight
    mats = {id(q): q for m in modules(model) if isinstance(m, QLinear) for q in m.parts}
    mats[id(model.embed_tokens.weight)] = model.embed_tokens.weight
    qs = list(mats.values())
    in_file = _file_mapped([q.data.ctypes.data for q in qs])
    assert all(q.type_name != "F32" for q in qs)  # blocks as stored, no fp32 matrix
    copied = sum(q.nbytes for q, f in zip(qs, in_file, strict=True) if not f)
    sizes = {t.name: t.n_bytes for t in open_gguf(embedded_gguf_path()).tensors}
    qk = sum(sizes[f"blk.{i}.attn_{n}.weight"] for i in range(30) for n in "qk")
    assert copied == qk, (copied, qk)
    assert _file_mapped([model.embed_tokens.weight.data.ctypes.data]) == [True]


def test_logits_only_for_the_rows_that_sample(tiny_llama):
    """The head runs on the last row of each chunk that samples, nothing else: [S, V] logits."""
    from pipeserve.modeling.loader import load_stage

    loaded = load_stage(str(tiny_llama))
    head = loaded.model.lm_head
    seen: list[int] = []

    class Spy:
        def __call__(self, x: np.ndarray) -> np.ndarray:
            seen.append(x.shape[0])
            return head(x)

    loaded.model.lm_head = Spy()
    eng = StageEngine(loaded)
    chunks = [
        SeqChunk("a", 0, [5, 9, 33, 100, 7, 8, 9], GREEDY),
        SeqChunk("b", 0, [300, 2, 4]),  # a prefill chunk that does not sample
        SeqChunk("c", 0, [11] * 17, GREEDY),
    ]
    out = eng.forward(chunks)
    assert seen == [2]
    assert out.logits is not None and out.logits.shape == (2, loaded.cfg.vocab_size)
    assert [s.request_id for s in out.samples] == ["a", "c"]


@pytest.mark.parametrize("kind", ["smollm2", "qwen2", "gemma3", "gpt2"])
def test_mlp_in_row_chunks_equals_one_call(kind, smol_full, tiny_gpt2, tmp_path, monkeypatch):
    """A batch longer than MLP_ROWS runs its MLP in calls of MLP_ROWS rows (bounded scratch): the
    logits equal one call's up to the kernels' summation order, and LlamaLayer's native forward
    still equals its modules (tests/layer_reference.py) bit for bit."""
    from pipeserve.modeling.loader import load_stage

    if kind == "smollm2":
        loaded = smol_full
    else:
        loaded = load_stage(str(tiny_gpt2 if kind == "gpt2" else make_tiny(kind, tmp_path / kind)))
    v = loaded.cfg.vocab_size
    prompts = [[(t * 37 + 5) % v for t in range(n)] for n in (7, 13, 5)]  # 25 rows

    def logits() -> torch.Tensor:
        chunks = [SeqChunk(f"s{i}", 0, p, GREEDY) for i, p in enumerate(prompts)]
        return run_stages([StageEngine(loaded)], chunks)

    whole = logits()
    monkeypatch.setattr(layers, "MLP_ROWS", 4)
    monkeypatch.setattr(llama, "MLP_ROWS", 4)
    chunked = logits()
    assert (chunked - whole).abs().max().item() <= 1e-4 * max(1.0, whole.abs().max().item())
    if isinstance(loaded.model, llama.LlamaStage) and type(loaded.model.layers[0]) is llama.LlamaLayer:
        monkeypatch.setattr(llama.LlamaLayer, "forward", module_forward)
        assert torch.equal(logits(), chunked)  # the native forward equals its modules, in chunks too


_PEAK = """
import json
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.loader import load_stage
import numpy as np
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
idle = kib("VmRSS")
eng = StageEngine(load_stage("smollm2-135m-instruct"))
rng = np.random.default_rng(0)
ids = [f"r{i}" for i in range(8)]
out = eng.forward([SeqChunk(r, 0, rng.integers(100, 40000, 64).tolist(), GREEDY) for r in ids])
for step in range(8):
    nxt = [s.token_id for s in out.samples]
    out = eng.forward([SeqChunk(r, 64 + step, [t], GREEDY) for r, t in zip(ids, nxt)])
eng.release(ids)
eng.forward([SeqChunk("p", 0, rng.integers(100, 40000, 256).tolist(), GREEDY)])
print(json.dumps(dict(idle=idle, peak=kib("VmHWM"), anon=kib("RssAnon"), kv=eng.cache.resident_bytes // 1024)))
"""


def test_peak_rss_is_the_file_plus_kv_plus_a_small_rest():
    """A whole-model process (SmolLM2: batch 8 prefill + decode, then a 256-token prefill) peaks
    within its idle interpreter + the GGUF's bytes + the KV pages it wrote + 64 MiB: an anonymous
    copy of the weights (94 MiB) or fp32 buffers sized by vocabulary x rows would exceed it. (The
    peak is VmHWM: ru_maxrss would count the forked parent's pages, which exec carries over.)"""
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    file_kib = embedded_gguf_path().stat().st_size // 1024
    rest = m["peak"] - m["idle"] - file_kib - m["kv"]
    assert rest <= 64 * 1024, (m, file_kib, rest)
    assert m["anon"] - m["kv"] <= 0.5 * file_kib + m["idle"], m  # the weights are not anonymous
