"""The only place that converts between the wire `Tensor` message and torch tensors.

Tensors travel as raw little-endian bytes (a `repeated float` field costs ~10x more to encode).
Decoding validates size against shape and dtype, so a malformed tensor is INVALID_ARGUMENT.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeserve.common.errors import InvalidInputError
from pipeserve.modeling.sampling import SamplingParams
from pipeserve.proto import model_service_pb2 as pb

_TO_WIRE = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


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
