"""Issue 12's architectures against transformers: every kind in tests/tiny_models.py, loaded from
its safetensors folder and from its GGUF twin, must give transformers' logits (every position of a
40-token prompt), transformers' greedy tokens, and the same answers split into two stages; sliding
windows must hold past the window, in decode and in chunked prefill. What we do not implement is
refused at load with an error naming the key and its value. The GGUF fixtures themselves are
checked against transformers' own GGUF reader, independently of our loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeserve.common.errors import ModelFormatError
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.loader import load_stage
from tests.engine_torch import run_stages
from tests.tiny_models import KINDS, N_LAYERS, llama3_rope_factors, make_tiny, write_gguf

ARCH_KINDS = [k for k in KINDS if k != "gemma3_gguf"]
# kind -> the checkpoint its GGUF is written from (a GGUF cannot say query_pre_attn_scalar=24)
GGUF_SOURCE = {"gemma3": "gemma3_gguf"}
NO_GGUF = {
    "llama_gelu": "a llama GGUF has no activation key: llama.cpp always computes SiLU",
    "qwen2_window": "a qwen2 GGUF has no sliding-window key: llama.cpp runs Qwen2 with full attention",
}
CASES = [(k, "safetensors") for k in ARCH_KINDS] + [(k, "gguf") for k in ARCH_KINDS if k not in NO_GGUF]
WINDOWED = [c for c in CASES if c[0] in ("mistral", "gemma3", "phi3_window", "qwen2_window")]  # window 8
PROMPT = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(12)).tolist()
N_NEW = 16


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


class Zoo:
    """Checkpoints, GGUFs, transformers references and loaded stages, each made once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memo: dict[tuple[Any, ...], Any] = {}

    def _once(self, key: tuple[Any, ...], make: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def folder(self, kind: str) -> Path:
        return self._once(("folder", kind), lambda: make_tiny(kind, self.root / kind))

    def gguf(self, kind: str, qtype: str = "F32") -> Path:
        src = GGUF_SOURCE.get(kind, kind)
        return self._once(
            ("gguf", kind, qtype),
            lambda: write_gguf(self.folder(src), self.root / f"{kind}-{qtype}.gguf", qtype),
        )

    def path(self, kind: str, fmt: str) -> str:
        return str(self.folder(kind) if fmt == "safetensors" else self.gguf(kind))

    def ref_kind(self, kind: str, fmt: str) -> str:
        """The checkpoint transformers runs as the reference of (kind, fmt)."""
        return GGUF_SOURCE.get(kind, kind) if fmt == "gguf" else kind

    def hf(self, kind: str) -> Any:
        import transformers

        return self._once(
            ("hf", kind),
            lambda: transformers.AutoModelForCausalLM.from_pretrained(
                self.folder(kind), dtype=torch.float32
            ).eval(),
        )

    def ref_logits(self, kind: str, tokens: tuple[int, ...]) -> torch.Tensor:
        """transformers' next-token logits after every prefix of tokens: [len, V]."""

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.hf(kind)(torch.tensor([tokens])).logits[0]

        return self._once(("logits", kind, tokens), run)

    def ref_greedy(self, kind: str, prompt: tuple[int, ...], n: int) -> list[int]:
        def run() -> list[int]:
            x = torch.tensor([prompt])
            with torch.inference_mode():
                out = self.hf(kind).generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            return out[0, len(prompt) :].tolist()

        return self._once(("greedy", kind, prompt, n), run)

    def loaded(self, kind: str, fmt: str, layers: tuple[int, int] | None = None) -> Any:
        return self._once(("loaded", kind, fmt, layers), lambda: load_stage(self.path(kind, fmt), layers))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("architectures"))


def all_prefix_logits(engines: list[StageEngine], tokens: list[int]) -> torch.Tensor:
    """Our next-token logits after every prefix of tokens, as one ragged batch: [len, V]."""
    rows = [SeqChunk(f"p{k}", 0, tokens[: k + 1], GREEDY) for k in range(len(tokens))]
    return run_stages(engines, rows)


def decode_trace(
    engines: list[StageEngine], prompt: list[int], steps: int, chunks: tuple[int, ...] = ()
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy prefill (in pieces ending at each of `chunks`, then the rest) + `steps` cached decode
    steps; returns the tokens and the logits after each prefill piece and each step."""
    logits, start = [], 0
    for end in (*chunks, len(prompt)):
        logits.append(run_stages(engines, [SeqChunk("t", start, prompt[start:end], GREEDY)])[0])
        start = end
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(run_stages(engines, [SeqChunk("t", len(tokens) - 1, [tokens[-1]], GREEDY)])[0])
    return tokens, logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# every kind x format against transformers


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_transformers(case, zoo):
    kind, fmt = case
    ours = all_prefix_logits([StageEngine(zoo.loaded(kind, fmt))], PROMPT)
    ref = zoo.ref_logits(zoo.ref_kind(kind, fmt), tuple(PROMPT))
    assert max_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_equals_transformers_generate(case, zoo):
    kind, fmt = case
    ours = generate([StageEngine(zoo.loaded(kind, fmt))], [PROMPT], N_NEW)[0]
    assert ours == zoo.ref_greedy(zoo.ref_kind(kind, fmt), tuple(PROMPT), N_NEW)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_split_stages_equal_whole(case, zoo):
    kind, fmt = case
    n = N_LAYERS[zoo.ref_kind(kind, fmt)]
    prompt = PROMPT[:20]
    whole_tokens, whole_logits = decode_trace([StageEngine(zoo.loaded(kind, fmt))], prompt, 8)
    for k in (1, n // 2):
        engines = [StageEngine(zoo.loaded(kind, fmt, (0, k))), StageEngine(zoo.loaded(kind, fmt, (k, n)))]
        tokens, logits = decode_trace(engines, prompt, 8)
        assert tokens == whole_tokens
        assert max(max_diff(a, b) for a, b in zip(logits, whole_logits, strict=True)) <= 1e-4


@pytest.mark.parametrize("case", WINDOWED, ids=case_id)
def test_sliding_window_decode_past_the_window(case, zoo):
    """20-token prompt + 16 decode steps with a window of 8: every step's logits and the tokens
    equal transformers' (whose mask lets query i see keys j with i - 8 < j <= i)."""
    kind, fmt = case
    ref_kind = zoo.ref_kind(kind, fmt)
    prompt = PROMPT[:20]
    tokens, logits = decode_trace([StageEngine(zoo.loaded(kind, fmt))], prompt, N_NEW)
    assert tokens[20:] == zoo.ref_greedy(ref_kind, tuple(prompt), N_NEW)
    ref = zoo.ref_logits(ref_kind, tuple(tokens))  # row i: logits after tokens[: i + 1]
    assert max(max_diff(step, ref[19 + i]) for i, step in enumerate(logits)) <= 1e-4


@pytest.mark.parametrize("case", WINDOWED, ids=case_id)
def test_sliding_window_chunked_prefill(case, zoo):
    """Prefill in three chunks (5 < window, 12 > window, 3) then decode: equal to transformers."""
    kind, fmt = case
    prompt = PROMPT[:20]
    tokens, logits = decode_trace([StageEngine(zoo.loaded(kind, fmt))], prompt, 8, chunks=(5, 17))
    ref = zoo.ref_logits(zoo.ref_kind(kind, fmt), tuple(tokens))
    rows = [4, 16, *range(19, 19 + 9)]  # after each chunk, then after each decode step
    assert max(max_diff(got, ref[r]) for got, r in zip(logits, rows, strict=True)) <= 1e-4
    assert tokens == decode_trace([StageEngine(zoo.loaded(kind, fmt))], prompt, 8)[0]


@pytest.mark.parametrize("kind", ["mistral", "phi3_window", "gemma3"])
def test_blocks_behind_a_sliding_window_are_freed(kind, zoo):
    """Blocks of 4 positions, window 8: a model whose every layer is windowed (Mistral, Phi-3 with
    a window) holds at most ceil((8 + chunk) / 4) + 1 blocks however long the sequence grows, its
    tokens still equal transformers', and the blocks it gave up stay cached by hash (a later
    request with the same prefix takes them). Gemma 3's global layers keep every block. A chunk
    that would reach back past the freed blocks is refused (the coordinator replays from 0)."""
    from pipeserve.common.errors import UnknownRequestError

    eng = StageEngine(zoo.loaded(kind, "safetensors"), block_size=4)
    windowed = kind != "gemma3"
    assert eng.cache.window == (8 if windowed else None)
    prompt = PROMPT[:20]
    held, start = [], 0
    for end in (7, 20):  # chunks of 7 and 13
        run_stages([eng], [SeqChunk("t", start, prompt[start:end], GREEDY)])
        held.append(eng.cache.used_blocks)
        start = end
    tokens = list(prompt)
    logits = run_stages([eng], [SeqChunk("t", 19, prompt[19:], GREEDY)])  # a re-sent last position
    for _ in range(N_NEW):
        tokens.append(int(logits[0].argmax()))
        logits = run_stages([eng], [SeqChunk("t", len(tokens) - 1, [tokens[-1]], GREEDY)])
        held.append(eng.cache.used_blocks)
    assert tokens[20:] == zoo.ref_greedy(zoo.ref_kind(kind, "safetensors"), tuple(prompt), N_NEW)
    seq = eng.cache.seqs["t"]
    eng.cache.check()
    if not windowed:
        assert seq.holes == 0 and held[-1] == -(-len(tokens) // 4)
        return
    assert max(held[2:]) <= -(-(8 + 1) // 4) + 1 and max(held) <= -(-(8 + 13) // 4) + 1, held
    assert seq.holes >= (len(tokens) - 8) // 4 - 1
    with pytest.raises(UnknownRequestError, match="freed behind the sliding window of 8"):
        eng.cache.reserve([("t", 5, 1)])
    # freed, not forgotten: every whole block but the last, then 3 tokens of it copied
    assert eng.lookup_prefix("again", tokens) == len(tokens) - 1
    eng.cache.check()


def test_a_stage_of_gemma3_local_layers_frees_behind_its_window(zoo):
    """Gemma 3 mixes local layers (window 8) with global ones, and one pool block holds a position
    for every layer of its stage, so a stage that holds a global layer keeps every block. A stage
    of local layers only is bounded like Mistral: the tiny Gemma 3 cut as [0, 5) (local) + [5, 6)
    (global), blocks of 4 positions. The first stage holds at most ceil((8 + 1) / 4) + 1 blocks in
    decode while the second holds the whole sequence, and the greedy tokens equal transformers'."""
    first = StageEngine(zoo.loaded("gemma3", "safetensors", (0, 5)), block_size=4)
    last = StageEngine(zoo.loaded("gemma3", "safetensors", (5, 6)), block_size=4)
    assert (first.cache.window, last.cache.window) == (8, None)
    prompt = PROMPT[:20]
    logits = run_stages([first, last], [SeqChunk("t", 0, prompt, GREEDY)])
    tokens, held = list(prompt), []
    for _ in range(N_NEW):
        tokens.append(int(logits[0].argmax()))
        logits = run_stages([first, last], [SeqChunk("t", len(tokens) - 1, [tokens[-1]], GREEDY)])
        held.append((first.cache.used_blocks, last.cache.used_blocks))
    assert tokens[20:] == zoo.ref_greedy(zoo.ref_kind("gemma3", "safetensors"), tuple(prompt), N_NEW)
    assert max(h[0] for h in held) <= -(-(8 + 1) // 4) + 1, held
    assert held[-1][1] == -(-len(tokens) // 4), held
    first.cache.check()
    last.cache.check()


def test_a_windowed_model_serves_requests_longer_than_its_nodes_pools(zoo):
    """Mistral (window 8) through two gRPC nodes whose pools hold 64 positions, 16-token steps: each
    node reports its window, the coordinator counts at most 48 positions per request on it, and
    two requests of 100 positions (40-token prompts + 60 tokens) complete, token for token equal to
    one engine with an unbounded pool (without the window such a request is refused at submit:
    test_scheduler_units)."""
    from tests.harness import greedy_through, start_cluster

    folder = str(zoo.folder("mistral"))
    prompts = [PROMPT, PROMPT[::-1]]
    want = generate([StageEngine(zoo.loaded("mistral", "safetensors"))], prompts, 60)
    c = start_cluster(
        folder, parts=2, node_defaults={"cache_budget_tokens": 64}, coordinator={"max_batch_tokens": 16}
    )
    try:
        got, nodes = greedy_through(c, prompts, 60)
        assert got == want
        assert [n.info.kv_window for n in nodes] == [8, 8]
        assert all(n.info.cache_budget_tokens == 64 for n in nodes)
    finally:
        c.stop()


def test_q8_0_gguf_matches_transformers_on_the_same_file(zoo):
    """Q8_0 blocks (convert --outtype q8_0) against transformers dequantizing the same file."""
    import transformers

    path = zoo.gguf("llama", "Q8_0")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    loaded = load_stage(str(path))
    with torch.inference_mode():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    assert max_diff(all_prefix_logits([StageEngine(loaded)], PROMPT), ref_logits) <= 1e-4
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        ref_tokens = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None
        )[0, len(PROMPT) :].tolist()
    assert generate([StageEngine(loaded)], [PROMPT], N_NEW)[0] == ref_tokens


# ---------------------------------------------------------------------------------------------
# the fixtures themselves, independent of our code

# kind -> why transformers must be handed the checkpoint's config to read the GGUF (its GGUF reader
# takes the config from GGUF metadata, but not these features); tensors still come from the GGUF
TRANSFORMERS_GGUF_GAPS = {
    "llama_bias": "reads no attention_bias/mlp_bias from a GGUF (drops the bias tensors)",
    "llama_rope_llama3": "ignores the rope_freqs tensor (no rope scaling)",
    "llama_rope_linear": "ignores rope.scaling.* for llama",
    "llama_rope_yarn": "ignores rope.scaling.* for llama",
    "qwen3": "reads neither head_count_kv nor key_length for qwen3",
    "gemma3": "leaves query_pre_attn_scalar at its default 256 (llama.cpp: key_length)",
    "gpt2": "maps context_length to n_ctx, not n_positions",
}


@pytest.mark.parametrize("kind", [k for k in ARCH_KINDS if k not in NO_GGUF])
def test_gguf_fixtures_load_in_transformers(kind, zoo):
    """transformers' GGUF reader (reverse Q/K permutation, norm - 1 for Gemma, GPT-2 transposes)
    turns our GGUF back into the checkpoint: logits equal on a 40-token prompt."""
    import gguf
    import transformers

    path = zoo.gguf(kind)
    src = GGUF_SOURCE.get(kind, kind)
    ref = zoo.hf(src)
    expected = zoo.ref_logits(src, tuple(PROMPT))
    kwargs: dict[str, Any] = {"config": ref.config} if kind in TRANSFORMERS_GGUF_GAPS else {}
    if kind in ("mistral", "phi3_window"):
        # transformers' GGUF reader drops the window (a llama GGUF comes back as LlamaForCausalLM,
        # a phi3 one without sliding_window): compare with no window
        unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
            zoo.folder(kind), dtype=torch.float32, sliding_window=None
        ).eval()
        with torch.inference_mode():
            expected = unwindowed(torch.tensor([PROMPT])).logits[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
    ).eval()
    with torch.inference_mode():
        got = model(torch.tensor([PROMPT])).logits[0]
    assert max_diff(got, expected) <= 1e-4
    if kind == "llama_rope_llama3":  # rope_freqs divide the base frequencies into transformers' llama3 ones
        reader = gguf.GGUFReader(path)
        factors = torch.from_numpy(
            np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data, dtype=np.float32)
        )
        hp = json.loads((zoo.folder(kind) / "config.json").read_text())
        assert torch.equal(factors, llama3_rope_factors(hp))
        base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        assert torch.allclose(base / factors, ref.model.rotary_emb.inv_freq, rtol=1e-6)
        assert set(factors.tolist()) - {1.0, 8.0}  # high frequencies kept, low ones / 8, one smoothed


def _with_feature_removed(zoo: Zoo, kind: str) -> Any:
    """The kind's checkpoint with its distinguishing feature switched off."""
    import transformers

    folder = zoo.folder(kind)
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    removed: dict[str, dict[str, Any]] = {
        "llama_rope_llama3": {"rope_parameters": default_rope},
        "llama_rope_linear": {"rope_parameters": default_rope},
        "llama_rope_yarn": {"rope_parameters": default_rope},
        "llama_gelu": {"hidden_act": "silu"},
        "mistral": {"sliding_window": None},
        "phi3_window": {"sliding_window": None},
        "qwen2_window": {"layer_types": ["full_attention"] * 4},
        "gemma3": {"query_pre_attn_scalar": 32},
    }
    overrides = removed.get(kind, {})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind in ("llama_bias", "qwen2") and name.endswith(".bias"):
                p.zero_()
            if kind == "qwen3" and ("q_norm" in name or "k_norm" in name):
                p.fill_(1.0)
    return model


@pytest.mark.parametrize(
    "kind",
    [
        "llama_bias",
        "llama_rope_llama3",
        "llama_rope_linear",
        "llama_rope_yarn",
        "llama_gelu",
        "mistral",
        "phi3_window",
        "qwen2_window",
        "qwen2",
        "qwen3",
        "gemma3",
    ],
)
def test_fixture_features_change_logits(kind, zoo):
    """Each kind's feature is load-bearing: ignoring it moves the logits far past 1e-4."""
    with torch.inference_mode():
        off = _with_feature_removed(zoo, kind)(torch.tensor([PROMPT])).logits[0]
    assert max_diff(off, zoo.ref_logits(kind, tuple(PROMPT))) > 0.05


def test_gguf_writer_refuses_what_a_gguf_cannot_say(zoo, tmp_path):
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        write_gguf(zoo.folder("llama_gelu"), tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="query_pre_attn_scalar=24"):
        write_gguf(zoo.folder("gemma3"), tmp_path / "y.gguf")
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        write_gguf(zoo.folder("qwen2_window"), tmp_path / "z.gguf")


# ---------------------------------------------------------------------------------------------
# refused by name


def assert_refused(path: Path | str, *named: str, layers: tuple[int, int] | None = None) -> None:
    """load_stage raises ModelFormatError whose message names every string in `named`."""
    with pytest.raises(ModelFormatError) as info:
        load_stage(str(path), layers)
    msg = str(info.value)
    for name in named:
        assert name in msg, f"{name!r} is not named in: {msg}"


def edited_copy(zoo: Zoo, kind: str, dest: Path, config: dict[str, Any]) -> Path:
    shutil.copytree(zoo.folder(kind), dest)
    cfg = json.loads((dest / "config.json").read_text()) | config
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "long_factor": [1.5] * 8,
    "short_factor": [1.0] * 8,
    "original_max_position_embeddings": 64,
}
HF_REFUSALS = [
    (
        "llama",
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
        "rope_type",
        "dynamic",
    ),
    ("llama", {"rope_parameters": LONGROPE}, "rope_type", "longrope"),
    (
        "phi3",
        {
            "rope_parameters": LONGROPE | {"partial_rotary_factor": 1.0},
            "original_max_position_embeddings": 64,
        },
        "rope_type",
        "longrope",
    ),
    (
        "phi3",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "partial_rotary_factor": 0.5,
        },
        "partial_rotary_factor",
        "0.5",
    ),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping", "30.0"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", "50.0"),
    ("llama", {"hidden_act": "relu2"}, "hidden_act", "relu2"),
    ("llama", {"model_type": "mamba"}, "model_type", "mamba"),
    ("llama", {"pretraining_tp": 2}, "pretraining_tp", "2"),
    (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32, "rope_theta": 1e4}},
        "beta_fast",
        "32",
    ),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor", "None"),
    (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "rope_theta": 1e4,
            }
        },
        "original_max_position_embeddings",
        "None",
    ),
    # the older `rope_scaling` form is read (and refused) the same way; both at odds: refused
    (
        "llama",
        {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "rope_scaling.rope_type",
        "dynamic",
    ),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling", "disagrees"),
    ("llama", {"head_dim": 15}, "head_dim", "15"),
    ("llama", {"num_key_value_heads": 3}, "n_kv_heads", "3"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention", "True"),
    ("gemma3", {"layer_types": ["chunked_attention"] * 6}, "layer_types", "chunked_attention"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 5}, "layer_types", "5"),
    ("gemma3", {"sliding_window": None}, "sliding_window", "None"),
    ("mistral", {"layer_types": ["full_attention"] * 4}, "layer_types", "mistral"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx", "True"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn", "True"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention", "True"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights", "False"),
]


@pytest.mark.parametrize(
    ("kind", "edit", "key", "value"), HF_REFUSALS, ids=lambda v: v if isinstance(v, str) else None
)
def test_hf_config_refusals_name_key_and_value(kind, edit, key, value, zoo, tmp_path):
    assert_refused(edited_copy(zoo, kind, tmp_path / "m", edit), key, value)


GGUF_REFUSALS = [
    ("llama", {"llama.attn_logit_softcapping": 50.0}, "llama.attn_logit_softcapping", "50.0"),
    ("llama", {"llama.rope.scaling.type": "longrope"}, "llama.rope.scaling.type", "longrope"),
    ("gemma3", {"gemma3.final_logit_softcapping": 30.0}, "gemma3.final_logit_softcapping", "30.0"),
    ("llama", {"llama.rope.dimension_count": 8}, "llama.rope.dimension_count", "8"),
    ("llama", {"llama.attention.value_length": 8}, "llama.attention.value_length", "8"),
    ("llama", {"general.architecture": "mamba"}, "general.architecture", "mamba"),
]


@pytest.mark.parametrize(
    ("kind", "fields", "key", "value"), GGUF_REFUSALS, ids=lambda v: v if isinstance(v, str) else None
)
def test_gguf_metadata_refusals_name_key_and_value(kind, fields, key, value, zoo, tmp_path):
    src = zoo.folder(GGUF_SOURCE.get(kind, kind))
    assert_refused(write_gguf(src, tmp_path / "m.gguf", extra_fields=fields), key, value)


def test_unknown_tensor_in_the_stage_range_is_refused(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    shutil.copytree(zoo.folder("llama"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.foo.weight"] = torch.zeros(64, 64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(folder, "model.layers.0.self_attn.foo.weight", layers=(0, 2))

    path = write_gguf(
        zoo.folder("llama"), tmp_path / "extra.gguf", extra_tensors={"blk.0.foo.weight": np.zeros(64)}
    )
    assert_refused(path, "blk.0.foo.weight", layers=(0, 2))


def test_longrope_factor_tensors_in_a_gguf_are_refused(zoo, tmp_path):
    """Phi-3's LongRoPE GGUFs carry rope_factors_long/short: refused, not ignored."""
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        path = write_gguf(zoo.folder("phi3"), tmp_path / f"{name}.gguf", extra_tensors={name: np.ones(8)})
        assert_refused(path, name, "LongRoPE")


def test_gemma3_27b_gguf_scales_attention_as_llama_cpp_does():
    """A Gemma 3 GGUF has no query_pre_attn_scalar: llama.cpp takes head_dim, except for the
    27B model (62 layers), whose scalar is hidden / heads (168, not head_dim 128)."""
    from pipeserve.modeling.config import ModelConfig

    def cfg(layers: int, hidden: int, heads: int) -> ModelConfig:
        fields = {
            "general.architecture": "gemma3",
            "gemma3.embedding_length": hidden,
            "gemma3.attention.head_count": heads,
            "gemma3.attention.head_count_kv": heads // 2,
            "gemma3.attention.key_length": 128,
            "gemma3.attention.value_length": 128,
            "gemma3.block_count": layers,
            "gemma3.context_length": 1024,
            "gemma3.feed_forward_length": 4 * hidden,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.attention.sliding_window": 1024,
            "gemma3.rope.freq_base": 1e6,
        }
        return ModelConfig.from_gguf(fields, {"token_embd.weight"})

    assert cfg(62, 5376, 32).attn_scale == pytest.approx(168**-0.5)
    assert cfg(34, 2560, 8).attn_scale == pytest.approx(128**-0.5)  # 4B: head_dim


def test_more_parts_than_layers_is_refused():
    from pipeserve.modeling.config import Shard

    with pytest.raises(ValueError) as info:
        Shard.even(4, 5, 0)
    assert "4" in str(info.value) and "5" in str(info.value)
    # the cluster config says it with the numbers before any node loads
    from fake_stages import fake_cluster_config

    from pipeserve.common.errors import ConfigError

    with pytest.raises(ConfigError, match="the config has 5 parts but the model has only 4 layers"):
        fake_cluster_config(5).part_layers(0, 4)
