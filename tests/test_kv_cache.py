"""Paged KV caches and the prefix cache (src/modeling/kv_cache.py), on the block pool alone and
through the engine on real weights (the tiny Llama and the embedded SmolLM2).

Paged attention must equal the contiguous computation (transformers' logits; runs with tiny blocks
so every chunk crosses block boundaries); shared prefixes must give the same tokens as a cold run,
reference-count back to zero, survive eviction under pressure, and never be written in place.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeserve.common.errors import CacheBudgetError
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, generate
from pipeserve.modeling.kv_cache import KVCachePool
from pipeserve.modeling.loader import load_stage
from tests.conftest import make_tiny_checkpoint
from tests.engine_torch import run_stages


def pool(blocks: int = 8, bs: int = 4) -> KVCachePool:
    return KVCachePool(2, 1, 8, blocks * bs, 1000, block_size=bs)


def test_blocks_are_taken_freed_and_counted():
    p = pool()
    (a,) = p.reserve([("a", 0, 9)])  # 9 tokens -> 3 blocks of 4
    p.commit(a, 0, list(range(9)))
    assert len(a.blocks) == 3 and p.used_blocks == 3 and p.used_tokens == 12
    p.reserve([("a", 9, 3)])  # fits the third block
    assert p.used_blocks == 3
    p.commit(a, 9, [9, 10, 11])
    assert p.cached_blocks == 3  # every full block is published by hash
    with pytest.raises(CacheBudgetError, match=r"needs 6 more blocks .* 5 of 8 are free"):
        p.reserve([("b", 0, 24)])
    assert "b" not in p.seqs and p.used_blocks == 3  # a refused batch leaves no trace
    assert p.release(["a", "zzz"]) == {"a": 12, "zzz": 0}
    assert p.used_blocks == 0 and p.cached_blocks == 3  # freed, still reusable
    p.check()


def test_prefix_lookup_shares_blocks_and_keeps_the_last_token_to_compute():
    p = pool()
    (a,) = p.reserve([("a", 0, 12)])
    p.commit(a, 0, list(range(12)))
    p.k[a.blocks[2]] = np.arange(p.k[0].size, dtype=np.float32).reshape(p.k[0].shape)
    # all 3 blocks match, but the last token is computed: 2 blocks shared, 3 tokens of the third copied
    assert p.lookup_prefix("b", list(range(12))) == 11
    b = p.seqs["b"]
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] not in a.blocks
    assert np.array_equal(p.k[b.blocks[2]], p.k[a.blocks[2]]) and p.refs[a.blocks[2]] == 1
    assert p.lookup_prefix("c", [*range(6), 99, 98, 97]) == 6  # diverges inside block 2: [4, 5] copied
    assert p.lookup_prefix("d", [5, *range(11)]) == 0  # same tokens, other positions: no hit
    assert p.seqs["c"].blocks[0] == a.blocks[0] and p.refs[a.blocks[0]] == 3
    assert p.hit_tokens == 11 + 6 and p.lookup_tokens == 12 + 9 + 12
    assert p.lookup_prefix("b", [*range(8), 7]) == 8  # started afresh: its old blocks are dropped
    assert p.refs[a.blocks[0]] == 3 and p.refs[a.blocks[2]] == 1
    p.release(["a", "b", "c", "d"])
    assert all(r == 0 for r in p.refs)
    p.check()


def test_a_partial_match_is_a_copy_and_needs_a_free_block():
    p = pool(blocks=4)
    (a,) = p.reserve([("a", 0, 8)])
    p.commit(a, 0, list(range(8)))
    p.k[a.blocks[1]] = 3.0
    assert p.lookup_prefix("b", [*range(6), 50, 51]) == 6  # block 0 shared, [4, 5] of block 1 copied
    (b,) = p.reserve([("b", 6, 2)])  # writes its own copy: a's block is untouched
    p.k[b.blocks[1]] = -1.0
    assert np.all(p.k[a.blocks[1]] == 3.0) and p.refs[a.blocks[1]] == 1
    p.commit(b, 6, [50, 51])
    p.reserve([("c", 0, 4)])  # the pool is full now
    assert p.free_blocks == 0
    assert p.lookup_prefix("x", [*range(6), 60]) == 4  # a whole block is shared; no block to copy into
    p.release(["a"])  # a's block 1 is cached and free: the copy may take another free block only
    assert p.lookup_prefix("y", [*range(6), 60]) == 4  # ... and there is none (the copy source is held)
    p.check()
    p.release(["b", "c", "x", "y"])
    p.reserve([("d", 0, 16)])  # takes every block: the cached ones are forgotten, keys too
    assert p.cached_blocks == 0 and not p.part
    p.check()


def test_a_shared_block_is_copied_before_a_replay_rewrites_it():
    p = pool()
    (a,) = p.reserve([("a", 0, 8)])
    p.commit(a, 0, list(range(8)))
    p.k[a.blocks[1]] = 7.0
    assert p.lookup_prefix("b", [*range(8), 50]) == 8
    (b,) = p.reserve([("b", 6, 3)])  # rewrite positions 6.. of block 1, which "a" shares
    assert b.blocks[1] != a.blocks[1] and b.blocks[0] == a.blocks[0]
    assert np.array_equal(p.k[b.blocks[1]], p.k[a.blocks[1]])  # copied, then b writes its own
    assert p.refs[a.blocks[1]] == 1
    p.check()


def test_eviction_reuses_the_least_recently_freed_and_forgets_its_hash():
    p = pool(blocks=4)
    for rid, base in (("a", 0), ("b", 100)):
        (s,) = p.reserve([(rid, 0, 8)])
        p.commit(s, 0, list(range(base, base + 8)))
        p.release([rid])
    assert p.cached_blocks == 4
    (c,) = p.reserve([("c", 0, 8)])  # takes a's two blocks (freed first)
    p.commit(c, 0, list(range(200, 208)))
    assert p.lookup_prefix("x", list(range(9))) == 0  # a's prefix is gone
    assert p.lookup_prefix("y", list(range(100, 109))) == 8  # b's is still cached
    p.check()


def test_new_blocks_come_from_blank_then_never_written_then_least_recently_used():
    p = pool(blocks=6)
    one_block = 2 * p.block_bytes  # k and v
    (a,) = p.reserve([("a", 0, 6)])  # a full block and a partly filled one
    p.commit(a, 0, list(range(6)))
    assert a.blocks == [0, 1] and p.resident_bytes == 2 * one_block
    p.release(["a"])  # both stay cached (LRU): block 0 by its hash, the tail by its two tokens
    assert p.cached_blocks == 2
    (b,) = p.reserve([("b", 0, 3)])
    assert b.blocks == [2]  # nothing blank: a block never written (memory grows)
    p.commit(b, 0, [7, 7, 7])
    (c,) = p.reserve([("c", 0, 16)])  # the last never-written ones, then the least recently used
    assert c.blocks == [3, 4, 5, 1] and p.cached_blocks == 1 and p.resident_bytes == 6 * one_block
    p.release(["c"])  # c committed nothing: its blocks hold nothing cached (blank)
    (d,) = p.reserve([("d", 0, 4)])
    assert d.blocks == [3]  # blank, the most recently freed
    (e,) = p.reserve([("e", 0, 16)])
    assert e.blocks == [4, 5, 1, 0] and p.cached_blocks == 0  # then a's cached block is forgotten
    assert p.lookup_prefix("x", list(range(5))) == 0
    p.check()


def test_a_released_tail_is_found_by_its_leading_tokens():
    p = pool()
    (a,) = p.reserve([("a", 0, 7)])
    p.commit(a, 0, [*range(6), 42])
    tail = a.blocks[1]
    p.v[tail] = 5.0
    p.release(["a"])
    assert p.lookup_prefix("b", [*range(6), 42, 43]) == 7  # the whole tail (3 tokens), copied
    assert p.lookup_prefix("c", [*range(6), 9, 9]) == 6  # its first 2 tokens
    for rid in ("b", "c"):
        blk = p.seqs[rid].blocks[1]
        assert blk != tail and np.all(p.v[blk] == 5.0)
    assert p.refs[tail] == 0 and p.lookup_prefix("d", [*range(4), 8]) == 4  # nothing of the tail
    p.check()


def test_cold_free_blocks_are_forgotten_and_their_pages_handed_back():
    # Blocks of 4 layers x 4 heads x 16 positions x 64 dims fp32 = 64 KiB: whole pages inside.
    p = KVCachePool(4, 4, 64, 4 * 16, 1000, block_size=16)
    (a,) = p.reserve([("a", 0, 32)])
    p.commit(a, 0, list(range(32)))
    held = list(a.blocks)
    p.k[held] = 1.5
    p.v[held] = -2.5
    p.release(["a"])
    assert p.forget_cold(3600.0) == 0  # freed just now: still warm, still cached
    assert p.cached_blocks == 2 and p.resident_bytes == 4 * p.block_bytes
    assert p.forget_cold(0.0) == 2
    assert p.cached_blocks == 0 and p.resident_bytes == 0 and p.free_blocks == 4
    assert p.lookup_prefix("b", list(range(33))) == 0
    # The pages were given back: they read as zeros now, except a partial page at a block's end.
    page_floats = 4096 // 4
    assert p.k[held[0]].flatten()[page_floats:-page_floats].size > 8 * page_floats
    inner_k = p.k[held[0]].flatten()[page_floats:-page_floats]
    inner_v = p.v[held[1]].flatten()[page_floats:-page_floats]
    assert np.abs(inner_k).max() == 0.0 and np.abs(inner_v).max() == 0.0
    (c,) = p.reserve([("c", 0, 16)])
    assert c.blocks == [0]  # the lowest block again, as in a fresh pool
    p.check()


# ----------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_stage(str(tiny_llama))


def test_tiny_blocks_equal_the_default_blocks(tiny):
    """Blocks of 3 positions: every prefill chunk and decode step crosses block boundaries."""
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 2, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6, 2, 3, 7]]
    want = generate([StageEngine(tiny)], prompts, 12)
    small = StageEngine(tiny, block_size=3)
    assert generate([small], prompts, 12) == want
    small.cache.check()


KV_DTYPES = ["f32", "f16", "bf16", "q8_0"]  # each exact within itself: a warm run equals a cold one


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """The tiny Llama with head_dim 32 (2 heads over 1 kv head), which q8_0's blocks of 32 need."""
    folder = make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("tiny-hd32"), num_attention_heads=2, num_key_value_heads=1
    )
    return load_stage(str(folder))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_a_lost_cache_replayed_from_its_tokens_continues_the_same(tiny32, kv_dtype):
    """Failover's replay within each KV type: a node that lost a sequence (a replica taking over, a
    preempted request) recomputes its cache from the prompt and the tokens generated so far in one
    chunk, and the continuation equals the uninterrupted run."""
    tiny = tiny32
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    whole = generate([StageEngine(tiny, block_size=4, kv_dtype=kv_dtype)], [prompt], 12)[0]
    fresh = StageEngine(tiny, block_size=4, kv_dtype=kv_dtype)
    tokens = prompt + whole[:6]
    out = run_stages([fresh], [SeqChunk("replay", 0, tokens, GREEDY)])
    for _ in range(6):
        tokens.append(int(out[0].argmax()))
        out = run_stages([fresh], [SeqChunk("replay", len(tokens) - 1, [tokens[-1]], GREEDY)])
    assert tokens[len(prompt) :] == whole
    fresh.cache.check()


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_prefix_cache_hit_gives_the_same_tokens(tiny32, kv_dtype):
    tiny = tiny32
    eng = StageEngine(tiny, block_size=4, kv_dtype=kv_dtype)
    prompt = list(range(5, 40))  # 35 tokens: 8 full blocks, then 3 in a block the answer filled
    cold = generate([eng], [prompt], 10)[0]
    eng.release(list(eng.cache.seqs))
    # 8 blocks shared, 2 tokens of the ninth copied: only the last token is computed
    assert eng.lookup_prefix("warm", prompt) == 34
    out = run_stages([eng], [SeqChunk("warm", 34, prompt[34:], GREEDY)])
    tokens = list(prompt)
    for _ in range(10):
        tokens.append(int(out[0].argmax()))
        out = run_stages([eng], [SeqChunk("warm", len(tokens) - 1, [tokens[-1]], GREEDY)])
    assert tokens[len(prompt) :] == cold
    eng.release(["warm"])
    assert eng.cache.used_blocks == 0 and all(r == 0 for r in eng.cache.refs)
    eng.cache.check()


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_eviction_under_pressure_keeps_results_right(tiny32, kv_dtype):
    """A pool of 12 blocks of 4 for 3 concurrent 20-token sequences: prefixes come and go."""
    tiny = tiny32
    eng = StageEngine(tiny, cache_budget_tokens=48, block_size=4, kv_dtype=kv_dtype)
    base = [list(range(s, s + 14)) for s in (3, 60, 120)]
    want = [generate([StageEngine(tiny, kv_dtype=kv_dtype)], [p], 6)[0] for p in base]
    for rnd in range(3):
        for i, p in enumerate(base):
            rid = f"r{rnd}-{i}"
            hit = eng.lookup_prefix(rid, p)
            out = run_stages([eng], [SeqChunk(rid, hit, p[hit:], GREEDY)])
            toks = list(p)
            for _ in range(6):
                toks.append(int(out[0].argmax()))
                out = run_stages([eng], [SeqChunk(rid, len(toks) - 1, [toks[-1]], GREEDY)])
            assert toks[len(p) :] == want[i]
            eng.release([rid])
        eng.cache.check()
    assert eng.cache.hit_tokens > 0


def test_smollm2_shared_system_prompt_hits_on_every_split(smol_full):
    """Two chat prompts with the same long system turn, through a 3-stage split of the real model:
    the second hits on every stage and its greedy text equals a cold run."""
    from pipeserve.tokenizer.core import TokenizerCore

    tok = TokenizerCore.from_model("smollm2-135m-instruct")
    system = "You are a careful assistant. " * 24  # ~150 tokens shared
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}]),
            add_special_tokens=False,
        )
        for q in ("What is the capital of France?", "Name a colour.")
    ]
    n = smol_full.cfg.n_layers
    src = smol_full.source
    stages = [StageEngine(load_stage(src, r)) for r in ((0, 10), (10, 20), (20, n))]
    cold = generate([StageEngine(smol_full)], [prompts[1]], 12)[0]
    generate(stages, [prompts[0]], 4, prefix="first")  # leaves its blocks cached, then releases
    hits = [e.lookup_prefix("second", prompts[1]) for e in stages]
    assert hits[0] >= 128 and len(set(hits)) == 1  # the shared system turn, on every stage
    toks = list(prompts[1])
    out = run_stages(stages, [SeqChunk("second", hits[0], toks[hits[0] :], GREEDY)])
    for _ in range(12):
        toks.append(int(out[0].argmax()))
        out = run_stages(stages, [SeqChunk("second", len(toks) - 1, [toks[-1]], GREEDY)])
    assert toks[len(prompts[1]) :] == cold
    for e in stages:
        e.release(["second"])
        assert e.cache.used_blocks == 0
        e.cache.check()
