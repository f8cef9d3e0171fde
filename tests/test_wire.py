"""Hidden states on the wire: the coordinator moves them as bytes (no torch), in the cluster's
`wire_dtype`. fp32 is exact; fp16/bf16 halve the bytes of every hop."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from pipeserve.common import wire
from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.node import codec
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import start_cluster

EMBEDDED = "smollm2-135m-instruct"


WIRE = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16}


@pytest.mark.parametrize("dtype", list(WIRE))
def test_split_and_join_rows_are_byte_exact(dtype: int) -> None:
    x = torch.randn(9, 5)
    t = x.to(WIRE[dtype]).float()  # what the wire dtype keeps, rounded as torch rounds it
    parts = wire.split_rows(codec.encode_tensor(x.numpy(), dtype), [2, 0, 4, 3])
    assert [list(p.shape) for p in parts] == [[2, 5], [0, 5], [4, 5], [3, 5]]
    assert torch.equal(torch.from_numpy(np.array(codec.decode_tensor(parts[2]))), t[2:6])
    back = wire.join_rows([parts[3], parts[0]])
    assert torch.equal(torch.from_numpy(np.array(codec.decode_tensor(back))), torch.cat([t[6:9], t[0:2]]))


def test_float32_hidden_states_are_read_in_place_from_the_message() -> None:
    """A later stage reads float32 rows from the message's bytes without a copy (the model copies
    them once, into its residual stream); the view is read-only, so nothing can write into it."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    msg = codec.encode_tensor(x)
    got = codec.decode_tensor(msg)
    assert np.array_equal(got, x) and not got.flags.writeable and not got.flags.owndata
    wide = codec.decode_tensor(codec.encode_tensor(x, pb.DTYPE_FLOAT16))
    assert np.array_equal(wide, x) and wide.dtype == np.float32


def test_bfloat16_rounds_to_nearest_even_as_torch_does() -> None:
    """Every rounding case of float32 -> bfloat16: ties (to even), just above/below, subnormals,
    infinities, the largest finite values (which round to inf), NaN."""
    bits = np.array(
        [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x00000001, 0x007FFFFF, 0x7F7FFFFF,
         0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0x7FC00000, 0x7F800001],
        dtype=np.uint32,
    )  # fmt: skip
    x = np.concatenate(
        [bits.view(np.float32), np.random.default_rng(0).standard_normal(1000, np.float32) * 1e3]
    )
    got = torch.from_numpy(codec.decode_tensor(codec.encode_tensor(x, pb.DTYPE_BFLOAT16)))
    want = torch.from_numpy(x).to(torch.bfloat16).float()
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok])


def test_bad_row_messages_are_refused_by_name() -> None:
    t = codec.encode_tensor(np.zeros((4, 3), np.float32))
    with pytest.raises(InvalidInputError, match="returned 4 rows for a batch of 5 tokens"):
        wire.split_rows(t, [2, 3])
    short = pb.Tensor(data=t.data[:-4], shape=[4, 3], dtype=pb.DTYPE_FLOAT32)
    with pytest.raises(InvalidInputError, match=r"needs 48 bytes, got 44"):
        wire.split_rows(short, [4])
    half = codec.encode_tensor(np.zeros((1, 3), np.float32), pb.DTYPE_FLOAT16)
    with pytest.raises(InvalidInputError, match="differ in dtype"):
        wire.join_rows([t, half])
    with pytest.raises(InvalidInputError, match=r"must be \[tokens, hidden\]"):
        wire.row_bytes(pb.Tensor(data=b"", shape=[3], dtype=pb.DTYPE_FLOAT32))


def _greedy(ids: list[int], n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=ids, max_tokens=n, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
    )


def _run(address: str, ids: list[int], n: int) -> tuple[list[int], dict[int, int]]:
    with grpc.insecure_channel(address) as ch:
        msgs = list(pb_grpc.CoordinatorStub(ch).Generate(_greedy(ids, n), timeout=120))
    final = msgs[-1]
    return [t for m in msgs for t in m.token_ids], {s.part: s.bytes_sent for s in final.stage_timings}


def test_half_precision_wire_halves_the_hidden_bytes_and_still_generates(smol_full) -> None:
    """fp32 (the default) equals the reference; fp16 and bf16 send half the hidden-state bytes to
    every stage after the first (the figure of greedy agreement is `make bench-wire`'s)."""
    prompt = [1, 2364, 314, 253, 6134, 288, 2]
    out: dict[str, tuple[list[int], dict[int, int]]] = {}
    for dtype in ("fp32", "fp16", "bf16"):
        c = start_cluster(EMBEDDED, 3, wire_dtype=dtype)
        try:
            out[dtype] = _run(c.cfg.coordinator.address, prompt, 12)
        finally:
            c.stop()
    ref = generate([StageEngine(smol_full)], [prompt], 12)[0]
    assert out["fp32"][0] == ref
    hidden_fp32 = {p: b for p, b in out["fp32"][1].items() if p > 0}
    for dtype in ("fp16", "bf16"):
        toks, sent = out[dtype]
        assert len(toks) == 12
        for part, b in hidden_fp32.items():
            # the same requests' chunks: token ids + headers are equal, the hidden payload halves
            hidden_bytes = 4 * 576 * (len(prompt) + 11)
            assert b - sent[part] == pytest.approx(hidden_bytes / 2, rel=0.02), (dtype, part, b, sent[part])
