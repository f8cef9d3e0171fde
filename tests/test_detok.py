"""Streaming detokenization from the tokenizer's piece table (common/detok.py) against the
tokenizer's own (TokenizerCore.decode_incremental), on the real vocabularies and tiny ones: every
step of a stream must give the same text and offsets. Then the client over real gRPC: after
info() the coordinator's client decodes in-process, with the service's answers.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pipeserve.common.detok import PieceTable, decode_steps
from pipeserve.common.errors import ConfigError, InvalidInputError
from pipeserve.common.model_files import EMBEDDED_MODEL
from pipeserve.common.tokenizer_client import DecodeItem, TokenizerClient
from pipeserve.tokenizer.core import TokenizerCore
from pipeserve.tokenizer.tokenizer_server import TokenizerServer
from tests.harness import cluster_config
from tests.test_tokenizer_core import gpt2_folder
from tests.test_tokenizer_gguf import write_spm_gguf

TEXTS = [
    "def quicksort(arr):\n    return sorted(arr)  # naïve",
    "héllo wörld 日本語 🎉🎉 ok\t\n  spaces",
    "Привет, мир! ¿Qué tal? 👩‍👩‍👧",
]


def _sequences(core: TokenizerCore, rng: random.Random, n: int) -> list[list[int]]:
    """Real text (split characters across tokens included), special tokens among it, and random ids."""
    special = sorted(core.special_tokens.values())
    out = []
    for i in range(n):
        ids = core.encode(TEXTS[i % len(TEXTS)], add_special_tokens=False)
        if special:
            for _ in range(3):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        if i % 2:  # random ids: bytes of cut characters, byte tokens, anything
            ids = [rng.randrange(core.vocab_size) for _ in range(rng.randrange(1, 40))]
        out.append(ids)
    return out


def _check_streams(core: TokenizerCore, table: PieceTable, seqs: list[list[int]], rng: random.Random) -> None:
    for ids in seqs:
        for skip in (True, False):
            assert table.decode(ids, skip) == core.decode(ids, skip)
            # one token at a time, then a step of several tokens; the same offsets go to both
            p = r = 0
            n = 0
            while n < len(ids):
                n = min(len(ids), n + rng.choice([1, 1, 1, 2, 3]))
                final = n == len(ids) and rng.random() < 0.7
                want = core.decode_incremental(ids[:n], p, r, skip, final=final)
                got = table.decode_incremental(ids[:n], p, r, skip, final=final)
                assert got == want, (ids[:n], p, r, skip, final)
                _, p, r = want
            # any offsets, not only those a stream from (0, 0) reaches: the prompt-context start
            # the core's docstring gives, prefix == read > 0, a read offset inside a character
            for _ in range(8):
                n = rng.randrange(len(ids) + 1)
                r = rng.randrange(n + 1)
                p = rng.choice([r, max(r - 5, 0), rng.randrange(r + 1)])
                for final in (False, True):
                    want = core.decode_incremental(ids[:n], p, r, skip, final=final)
                    assert table.decode_incremental(ids[:n], p, r, skip, final=final) == want, (ids[:n], p, r)
            # a step of several new tokens after a stream of one at a time (offsets are always
            # what an earlier call returned)
            m = rng.randrange(len(ids))
            p = r = 0
            for n in range(1, m + 1):
                _, p, r = core.decode_incremental(ids[:n], p, r, skip)
            final = rng.random() < 0.5
            got = decode_steps(table.decode_incremental, ids[p:], p, r, len(ids) - m, skip, final)
            assert got == decode_steps(core.decode_incremental, ids[p:], p, r, len(ids) - m, skip, final)


@pytest.mark.parametrize("model", [EMBEDDED_MODEL, "qwen2.5-coder-1.5b-instruct", "gemma3-270m"])
def test_piece_table_streams_like_the_tokenizer(model: str) -> None:
    core = TokenizerCore.from_model(model)
    table = core.piece_table
    assert table is not None and len(table.pieces) == core.vocab_size and table.checksum == core.checksum
    assert table.special == {i for i in core.special_tokens.values() if i in table.special}
    rng = random.Random(model)
    _check_streams(core, table, _sequences(core, rng, 60), rng)


@pytest.mark.parametrize("flags", [{}, {"add_space_prefix": False}], ids=["space-prefix", "no-space-prefix"])
def test_piece_table_sentencepiece(tmp_path: Path, flags: dict) -> None:
    """A SentencePiece vocabulary that drops the leading space of a decode (add_space_prefix, the
    default): the first text of a stream loses it, later texts keep theirs."""
    tiny = write_spm_gguf(tmp_path / "spm.gguf", **flags)
    core = TokenizerCore.from_model(str(tiny.path))
    table = core.piece_table
    assert table is not None and table.strip_space == ("add_space_prefix" not in flags)
    rng = random.Random(7)
    seqs = [core.encode(t, add_special_tokens=False) for t in ["hello world", " the fox", "héllo 日本 🎉"]]
    seqs += [[rng.randrange(core.vocab_size) for _ in range(20)] for _ in range(40)]
    _check_streams(core, table, seqs, rng)
    ids = core.encode("hello world", add_special_tokens=False)
    texts, p, r = [], 0, 0
    for n in range(1, len(ids) + 1):
        text, p, r = table.decode_incremental(ids[:n], p, r)
        texts.append(text)
    # the space the prefix put before "hello" is in its token's bytes, not in the text
    assert table.pieces[ids[0]].startswith(b" ") == table.strip_space
    assert texts[0].startswith("h") and "".join(texts) == "hello world" == core.decode(ids)


def test_piece_table_of_checkpoint_folders(tmp_path: Path) -> None:
    """A tokenizer.json with GPT-2's ByteLevel decoder has a table; another decoder chain has none
    (its callers decode through the service)."""
    from tokenizers import Tokenizer, decoders

    folder = gpt2_folder(tmp_path / "gpt2-tiny", with_tokenizer_json=True)
    core = TokenizerCore.from_model(str(folder))
    assert core.piece_table is not None
    rng = random.Random(3)
    _check_streams(core, core.piece_table, _sequences(core, rng, 20), rng)

    other = gpt2_folder(tmp_path / "gpt2-strip", with_tokenizer_json=True)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    tok.save(str(other / "tokenizer.json"))
    assert TokenizerCore.from_model(str(other)).piece_table is None


def test_piece_table_refuses_ids_outside_the_vocabulary() -> None:
    table = TokenizerCore.from_model(EMBEDDED_MODEL).piece_table
    assert table is not None
    for ids in ([5, 49152], [-1]):
        with pytest.raises(InvalidInputError, match=f"token id {ids[-1]} is outside the vocabulary"):
            table.decode_incremental(ids, 0, 0)
    with pytest.raises(InvalidInputError, match="prefix_offset"):
        table.decode_incremental([1, 2], 2, 1)


def test_client_decodes_in_process_with_the_services_answers() -> None:
    """The coordinator's client over real gRPC: info() fetches the table (Pieces); in-process
    results equal the service's for streams, several-token steps and logprob texts."""
    cfg = cluster_config(EMBEDDED_MODEL, 1)
    addr = cfg.tokenizer.address
    srv = TokenizerServer(cfg).start(background_load=False)
    core = srv.servicer.core

    async def run() -> None:
        client = TokenizerClient(addr, 10.0, None, "coordinator")
        try:
            assert client.pieces is None
            info = await client.info()
            assert client.pieces is not None and client.pieces.checksum == info.checksum == core.checksum
            rng = random.Random(11)
            for ids in _sequences(core, rng, 30):
                cuts = [rng.choice([1, 2, 4]) for _ in ids]  # tokens per step, the same in both modes
                local, remote = [], []
                for mode, out in ((True, local), (False, remote)):
                    client.local_decode = mode
                    p = r = n = 0
                    for c in cuts:
                        steps = min(c, len(ids) - n)
                        if steps == 0:
                            break
                        n += steps
                        item = DecodeItem("r", ids[p:n], p, r, True, n == len(ids), steps)
                        (res,) = await client.decode_stream([item])
                        out.append(res)
                        p, r = res.prefix_offset, res.read_offset
                assert local == remote, ids
            client.local_decode = True
            texts = await client.token_texts(list(range(0, 49152, 97)) + sorted(core.special_tokens.values()))
            client.local_decode, client._texts = False, {}
            assert texts == await client.token_texts(list(texts))
            # an id outside the vocabulary: in-process, that item alone gets the error; the
            # service fails the whole call
            client.local_decode = True
            good, bad = await client.decode_stream(
                [DecodeItem("a", [300, 301]), DecodeItem("b", [300, 49152])]
            )
            assert good.error is None and good.text and bad.text == "" and bad.error is not None
            assert (
                isinstance(bad.error, InvalidInputError) and "token id 49152 is outside" in bad.error.message
            )
            with pytest.raises(InvalidInputError, match="token id 49152 is outside"):
                await client.token_texts([5, 49152])
            client.local_decode = False
            with pytest.raises(InvalidInputError, match="token id 49152 is outside"):
                await client.decode_stream([DecodeItem("a", [300, 301]), DecodeItem("b", [300, 49152])])
            client.local_decode = True
            assert (await client.info()).checksum == info.checksum and client.pieces is not None
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        srv.stop(0)


def test_detokenize_switch_sends_decodes_to_the_service(monkeypatch) -> None:
    """PIPESERVE_DETOKENIZE=service: the client decodes through the service even with a table."""

    async def local_decode() -> bool:
        client = TokenizerClient("127.0.0.1:1", 1.0, None, "coordinator")
        await client.close()
        return client.local_decode

    monkeypatch.setenv("PIPESERVE_DETOKENIZE", "service")
    assert not asyncio.run(local_decode())
    monkeypatch.delenv("PIPESERVE_DETOKENIZE")
    assert asyncio.run(local_decode())
    monkeypatch.setenv("PIPESERVE_DETOKENIZE", "Service")
    with pytest.raises(
        ConfigError, match="PIPESERVE_DETOKENIZE must be one of coordinator, service, got 'Service'"
    ):
        asyncio.run(local_decode())
