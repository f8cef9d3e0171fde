"""Wire forms shared by the coordinator and the nodes, without numpy or torch: sampling
parameters, the hidden-state dtypes (`ITEMSIZE`, the one table of their sizes; `WIRE_DTYPES` by
config name) and hidden states as rows of bytes, which a node cuts per next node and joins when a
step fans out to replicas, byte for byte in whatever dtype it sends. Tensor <-> array conversion
is node/codec.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeserve.common.errors import InvalidInputError
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.proto import model_service_pb2 as pb

ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
WIRE_DTYPES = {"fp32": pb.DTYPE_FLOAT32, "fp16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16}


def row_bytes(t: pb.Tensor) -> int:
    """Bytes of one row of a [tokens, hidden] tensor, after checking the message's size."""
    if t.dtype not in ITEMSIZE:
        raise InvalidInputError(f"tensor dtype {pb.DType.Name(t.dtype)} is not supported")
    if len(t.shape) != 2 or min(t.shape) < 0:
        raise InvalidInputError(f"hidden states must be [tokens, hidden], got shape {list(t.shape)}")
    width = t.shape[1] * ITEMSIZE[t.dtype]
    if len(t.data) != t.shape[0] * width:
        raise InvalidInputError(
            f"tensor of shape {list(t.shape)} and dtype {pb.DType.Name(t.dtype)} needs "
            f"{t.shape[0] * width} bytes, got {len(t.data)}"
        )
    return width


def split_rows(t: pb.Tensor, counts: Sequence[int]) -> list[pb.Tensor]:
    """Cut a [sum(counts), hidden] tensor into consecutive [count, hidden] tensors (no copy of
    the numbers' meaning: bytes only)."""
    width = row_bytes(t)
    if sum(counts) != t.shape[0]:
        raise InvalidInputError(f"a stage returned {t.shape[0]} rows for a batch of {sum(counts)} tokens")
    out, off = [], 0
    data = memoryview(t.data)
    for n in counts:
        out.append(
            pb.Tensor(data=bytes(data[off * width : (off + n) * width]), shape=[n, t.shape[1]], dtype=t.dtype)
        )
        off += n
    return out


def join_rows(parts: Sequence[pb.Tensor]) -> pb.Tensor:
    """Stack [n_i, hidden] tensors of one dtype into one [sum n_i, hidden] tensor."""
    if not parts:
        raise InvalidInputError("no hidden states to join")
    first = parts[0]
    for p in parts:
        row_bytes(p)
        if p.dtype != first.dtype or p.shape[1] != first.shape[1]:
            raise InvalidInputError("hidden states of one batch differ in dtype or width")
    return pb.Tensor(
        data=b"".join(p.data for p in parts),
        shape=[sum(p.shape[0] for p in parts), first.shape[1]],
        dtype=first.dtype,
    )


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Wire sampling parameters -> domain; proto3 zero defaults mean "off" where 0 is invalid."""
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p or 1.0,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty or 1.0,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


def sampling_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )
