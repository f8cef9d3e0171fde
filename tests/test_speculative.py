"""Speculative decoding through real clusters and the real engine (issue 26).

With drafts (the default: n-gram prompt lookup) greedy output equals the output without, token
for token and message for message, on SmolLM2 and a tiny random model: prompts whose answer
repeats the prompt (many drafts accepted) and prompts that accept none, stop strings, max_tokens
landing inside a pass, a stop id inside accepted drafts, logprobs, a chunked prompt, seeded
sampling. At the engine: the acceptance rule keeps the target's distribution (unseeded draws on a
tiny vocabulary), and after rejections every stage's cache equals one built without drafts.
SIGKILL of a node with a replica in the middle of speculative steps: identical output.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from pipeserve import kernels
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.loader import load_stage
from pipeserve.modeling.sampling import SamplingParams
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb
from tests.harness import InProcessCluster, pin_step_cost, start_cluster

EMBEDDED = "smollm2-135m-instruct"

CODE = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n\n\n# The same three functions, with type hints:\n"
)
OPEN = "Write a short poem about the sea at night."


def generate(c: InProcessCluster, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
        return list(pb_grpc.CoordinatorStub(ch).Generate(req, timeout=300))


def request(prompt: str | list[int], n: int, spec: bool | None, **kw) -> pb.GenerateRequest:  # type: ignore[no-untyped-def]
    r = pb.GenerateRequest(max_tokens=n, sampling=kw.pop("sampling", pb.SamplingParams(temperature=0)), **kw)
    if isinstance(prompt, str):
        r.prompt = prompt
    else:
        r.prompt_token_ids.extend(prompt)
    if spec is not None:
        r.speculative = spec
    return r


def stream_of(msgs: list[pb.GenerateResponse]) -> list[tuple]:
    """What a client sees, message by message (the final one's summary aside)."""
    return [
        (
            tuple(m.token_ids),
            m.text,
            tuple((x.token_id, x.logprob) for x in m.logprobs),
            tuple(tuple((a.token_id, a.logprob) for a in t.alternatives) for t in m.top_logprobs),
            m.finish_reason,
        )
        for m in msgs
    ]


def both(c: InProcessCluster, prompt, n: int, **kw) -> tuple[list, list, pb.SpeculativeStats]:  # type: ignore[no-untyped-def]
    plain = generate(c, request(prompt, n, False, **kw))
    spec = generate(c, request(prompt, n, None, **kw))
    assert plain[-1].speculative.drafted == 0
    return stream_of(plain), stream_of(spec), spec[-1].speculative


@pytest.fixture(scope="module")
def smol3():
    c = pin_step_cost(start_cluster(EMBEDDED, parts=3))
    yield c
    c.stop()


def test_smollm2_greedy_identical_and_fewer_passes_on_code(smol3):
    plain, spec, st = both(smol3, CODE, 64, ignore_eos=True)
    assert spec == plain
    assert st.accepted >= 10 and st.tokens == 64
    assert st.tokens / st.passes >= 1.3, f"{st.tokens} tokens in {st.passes} passes"
    plain, spec, st = both(smol3, OPEN, 48, ignore_eos=True)
    assert spec == plain and st.tokens == 48


def test_smollm2_stops_lengths_eos_and_logprobs_inside_drafts(smol3):
    base = generate(smol3, request(CODE, 64, False, ignore_eos=True))
    toks = [t for m in base for t in m.token_ids]
    text = "".join(m.text for m in base)
    for n in (3, 7, 21, 33):  # max_tokens inside a pass
        plain, spec, _ = both(smol3, CODE, n, ignore_eos=True)
        assert spec == plain and sum(len(m[0]) for m in spec) == n
    # a stop id that comes well into the copied span (inside accepted drafts)
    stop_id = toks[30]
    plain, spec, st = both(smol3, CODE, 64, stop_token_ids=[stop_id])
    assert spec == plain and spec[-1][4] == pb.FINISH_REASON_STOP
    # a stop string inside the copied span: the same text, cut at the same token
    stop = text[60:66]
    plain, spec, _ = both(smol3, CODE, 64, stop=[stop], ignore_eos=True)
    assert spec == plain and spec[-1][4] == pb.FINISH_REASON_STOP
    # logprobs and alternatives: the same numbers, token by token
    lp = pb.SamplingParams(temperature=0, logprobs=True, top_logprobs=3)
    plain, spec, st = both(smol3, CODE, 40, sampling=lp, ignore_eos=True)
    assert spec == plain and st.accepted > 0
    assert all(len(m[2]) == len(m[0]) for m in spec)


def test_smollm2_seeded_sampling_identical(smol3):
    for seed in (1, 7):
        s = pb.SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
        plain, spec, st = both(smol3, CODE, 48, sampling=s, ignore_eos=True)
        assert spec == plain
    assert st.drafted > 0
    # penalties read each draft row's own history
    s = pb.SamplingParams(temperature=0, repetition_penalty=1.05, frequency_penalty=0.1)
    plain, spec, st = both(smol3, CODE, 48, sampling=s, ignore_eos=True)
    assert spec == plain and st.drafted > 0


def test_smollm2_chat_prompt_identical(smol3):
    for q in ("Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.", OPEN):
        msgs = [tpb.ChatMessage(role="user", content=q)]
        plain = stream_of(generate(smol3, request([], 40, False, messages=msgs)))
        spec = stream_of(generate(smol3, request([], 40, None, messages=msgs)))
        assert spec == plain


def test_tiny_model_chunked_prompt_identical(tiny_llama):
    """A random model's greedy output loops, so n-grams match; the prompt is longer than a step
    (prefilled in chunks beside a running decode)."""
    c = pin_step_cost(
        start_cluster(
            str(tiny_llama), parts=3, coordinator={"max_batch_tokens": 24, "prefill_chunk_tokens": 8}
        )
    )
    try:
        rng = np.random.default_rng(5)
        prompts = [rng.integers(3, 300, 70).tolist() for _ in range(3)]
        for p in prompts:
            plain, spec, st = both(c, p, 60, ignore_eos=True)
            assert spec == plain
        assert st.drafted > 0
        # long prompts arriving while others decode: chunked beside drafting steps
        outs = asyncio.run(_concurrent(c, [request(p, 60, None, ignore_eos=True) for p in prompts]))
        for p, got in zip(prompts, outs, strict=True):
            assert got == stream_of(generate(c, request(p, 60, False, ignore_eos=True)))
    finally:
        c.stop()


async def _concurrent(c: InProcessCluster, reqs: list[pb.GenerateRequest]) -> list[list[tuple]]:
    async with grpc.aio.insecure_channel(c.cfg.coordinator.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        async def one(r: pb.GenerateRequest, delay: float) -> list[tuple]:
            await asyncio.sleep(delay)
            return stream_of([m async for m in stub.Generate(r, timeout=300)])

        return list(await asyncio.gather(*(one(r, 0.05 * i) for i, r in enumerate(reqs))))


# ---- the engine: acceptance rule and KV rollback -------------------------------------------------
def test_acceptance_rule_keeps_the_target_distribution(tiny_llama):
    """Unseeded sampling at temperature 0.3 on the tiny model (320 tokens): a verify step with one
    draft emits its first token with the target's probabilities, the draft is accepted exactly
    when that token equals it, and the token after an accepted draft follows the target's next
    distribution."""
    eng = StageEngine(load_stage(str(tiny_llama)), 4096)
    prompt = [5, 77, 190, 33, 12]
    probe = eng.forward([SeqChunk("p", 0, prompt, GREEDY)])
    t0 = probe.samples[0].token_id
    d = eng.forward([SeqChunk("p", len(prompt), [t0], GREEDY)]).samples[0].token_id  # the likeliest next
    eng.forward([SeqChunk("q", 0, prompt, GREEDY)])
    out = eng.forward([SeqChunk("q", len(prompt), [t0, d], GREEDY, n_draft=1)])
    temp = 0.3
    z = out.logits.astype(np.float64) / temp
    p0, p1 = (np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in z)
    warm = SamplingParams(temperature=temp)
    N = 3000
    first = np.zeros(len(p0))
    second = np.zeros(len(p1))
    for _ in range(N):
        res = eng.forward([SeqChunk("q", len(prompt), [t0, d], warm, n_draft=1)])
        toks = [s.token_id for s in res.samples]
        first[toks[0]] += 1
        assert (len(toks) == 2) == (toks[0] == d)
        if len(toks) == 2:
            second[toks[1]] += 1
    n_acc = second.sum()
    assert n_acc > 200, "the draft was accepted too rarely for the test to say anything"
    for freq, p, n in ((first / N, p0, N), (second / n_acc, p1, n_acc)):
        # each token expected 5+ times within 5 sigma (the normal approximation holds there; a token
        # of p ~ 1e-4 seen 3 times in 542 draws is a Poisson tail, not an error: CI once saw one)
        big = p * n >= 5
        sigma = np.sqrt(p * (1 - p) / n)
        dev = np.abs(freq - p)[big]
        assert np.all(dev <= 5 * sigma[big] + 2e-3), np.max(dev / sigma[big])
        # chi-square over the tokens expected 5+ times (the rest pooled): far in the tail if wrong
        obs = np.append(freq[big] * n, freq[~big].sum() * n)
        exp = np.append(p[big] * n, p[~big].sum() * n)
        df = len(obs) - 1
        assert np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-9)) <= df + 5 * np.sqrt(2 * df)


def test_kv_after_rejections_equals_a_cache_built_without_drafts(tiny_llama):
    """Two stages; one request decodes with drafts that are right, partly right and wrong, the
    other without. After each step that follows (the first stage truncates there), both stages
    hold the same positions, tokens, block hashes and k/v bits as the plain run; and a third
    request looking the prompt's prefix up shares the same blocks."""
    loaded = [load_stage(str(tiny_llama), (0, 3)), load_stage(str(tiny_llama), (3, 6))]
    spec, plain = [StageEngine(x, 4096) for x in loaded], [StageEngine(x, 4096) for x in loaded]

    def step(engines: list[StageEngine], chunk: SeqChunk) -> list[int]:
        h = engines[0].forward([chunk]).hidden
        return [s.token_id for s in engines[1].forward([chunk], h).samples]

    prompt = list(range(40, 77))  # 37 tokens: the decode crosses block boundaries
    ref = [step(plain, SeqChunk("r", 0, prompt, GREEDY))[0]]
    for i in range(60):
        ref += step(plain, SeqChunk("r", len(prompt) + i, [ref[-1]], GREEDY))
    got = [step(spec, SeqChunk("r", 0, prompt, GREEDY))[0]]
    rng = np.random.default_rng(2)
    while len(got) < 40:
        pos = len(prompt) + len(got) - 1
        k = int(rng.integers(1, 8))
        drafts = ref[len(got) : len(got) + k]
        if rng.random() < 0.6 and drafts:  # a wrong guess somewhere
            j = int(rng.integers(0, len(drafts)))
            drafts[j] = (drafts[j] + 1) % 320
        new = step(spec, SeqChunk("r", pos, [got[-1], *drafts], GREEDY, n_draft=len(drafts)))
        assert new == ref[len(got) : len(got) + len(new)]
        got += new
        # the next step (one token, no drafts) starts where the accepted tokens end
        pos = len(prompt) + len(got) - 1
        got += step(spec, SeqChunk("r", pos, [got[-1]], GREEDY))
        for a, b in zip(spec, plain, strict=True):
            sa, sb = a.cache.seqs["r"], b.cache.seqs["r"]
            n = sa.length
            assert sa.tokens == sb.tokens[:n] and sa.hashes == sb.hashes[: len(sa.hashes)]
            assert len(sa.hashes) == n // 16
            for p in range(n):
                ba, bb = sa.blocks[p // 16], sb.blocks[p // 16]
                ka, kb = (kernels.kv_unpack_k(e.cache.k[blk], "f32") for e, blk in ((a, ba), (b, bb)))
                assert np.array_equal(ka[:, :, p % 16], kb[:, :, p % 16])  # K rows (stored transposed)
                assert np.array_equal(a.cache.v[ba][:, :, p % 16], b.cache.v[bb][:, :, p % 16])
            a.cache.check()
    assert got[:40] == ref[:40]
    for a in spec:  # prefix reuse: the full blocks are found by hash, the rest by a block's leading tokens
        assert a.cache.lookup_prefix("x", prompt + got[:20]) == len(prompt) + 19
        a.cache.check()


# ---- failover -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_with_replica_during_speculative_steps(tmp_path):
    from pipeserve.launcher.procs import ProcessCluster
    from tests.harness import cluster_config
    from tests.paced_node import PACED_NODE

    cfg = cluster_config(EMBEDDED, 3, replicas={1: 2})
    pc = ProcessCluster(cfg, tmp_path, node_module=PACED_NODE).start()
    try:

        async def run(spec: bool, kill: bool) -> list[tuple[list, pb.GenerateResponse]]:
            killed: list[str] = []
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)

                async def one(prompt: str) -> tuple[list, pb.GenerateResponse]:
                    msgs = []
                    async for m in stub.Generate(request(prompt, 60, spec, ignore_eos=True), timeout=300):
                        msgs.append(m)
                        if kill and not killed and sum(len(x.token_ids) for x in msgs) >= 12:
                            st = pb_grpc.CoordinatorStub(grpc.insecure_channel(cfg.coordinator.address))
                            nodes = st.ClusterStatus(pb.ClusterStatusRequest(), timeout=5).nodes
                            victim = "node2" if nodes[1].info.active_requests else "node2b"
                            killed.append(victim)
                            pc.kill(victim)
                    return stream_of(msgs)[:-1], msgs[-1]

                return list(await asyncio.gather(one(CODE), one(CODE.replace("add", "plus"))))

        baseline = asyncio.run(run(spec=False, kill=False))
        t0 = time.monotonic()
        got = asyncio.run(run(spec=True, kill=True))
        assert time.monotonic() - t0 < 120
        assert [g[0] for g in got] == [b[0] for b in baseline]
        assert sum(g[1].failovers for g in got) >= 1
        assert all(g[1].speculative.accepted > 0 for g in got), [str(g[1].speculative) for g in got]
    finally:
        pc.stop()
