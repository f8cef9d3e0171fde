"""The only place that converts between the wire `Tensor` message and torch tensors (on nodes;
the coordinator moves tensors as bytes with `wire`).

Tensors travel as raw little-endian bytes (a `repeated float` field costs ~10x more to encode).
Decoding validates size against shape and dtype, so a malformed tensor is INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from pipeserve.common.errors import InvalidInputError
from pipeserve.common.wire import sampling_from_pb, sampling_to_pb  # noqa: F401 (nodes use them from here)
from pipeserve.modeling.engine import SampledToken, SeqChunk
from pipeserve.proto import model_service_pb2 as pb

_TO_WIRE = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
# the dtype a stage is asked to send its hidden states in (DTYPE_UNSPECIFIED: float32)
WIRE_TORCH = {**_FROM_WIRE, pb.DTYPE_UNSPECIFIED: torch.float32}


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    if t.dtype not in _TO_WIRE:
        raise InvalidInputError(f"cannot send a {t.dtype} tensor (supported: float32, float16, bfloat16)")
    t = t.detach().contiguous()
    data = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
    return pb.Tensor(data=data, shape=list(t.shape), dtype=_TO_WIRE[t.dtype])


def decode_tensor(msg: pb.Tensor) -> torch.Tensor:
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise InvalidInputError(f"tensor dtype {pb.DType.Name(msg.dtype)} is not supported")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(
            f"tensor of shape {list(shape)} and dtype {pb.DType.Name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    np_dtype = (
        np.int16 if dtype == torch.bfloat16 else {torch.float32: np.float32, torch.float16: np.float16}[dtype]
    )
    arr = np.frombuffer(msg.data, dtype=np_dtype).reshape(shape)
    t = torch.from_numpy(arr.copy())  # own the memory: the message buffer is read-only
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def chunks_from_pb(chunks: Iterable[pb.SequenceChunk]) -> list[SeqChunk]:
    """A Forward's or a ChainStep's chunks as the engine takes them."""
    return [
        SeqChunk(
            c.request_id, c.start_pos, list(c.token_ids), sampling_from_pb(c.sampling) if c.sample else None
        )
        for c in chunks
    ]


def samples_to_pb(samples: Iterable[SampledToken]) -> list[pb.SampledToken]:
    return [
        pb.SampledToken(
            request_id=s.request_id,
            token_id=s.token_id,
            logprob=s.logprob,
            top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs],
        )
        for s in samples
    ]
