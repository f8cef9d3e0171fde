"""The only place that converts between the wire messages and a node's numpy arrays and engine
types (the coordinator never decodes activations: it sends token ids and reads sampled tokens).

Tensors travel as raw little-endian bytes (a `repeated float` field costs ~10x more to encode), in
float32, float16 or bfloat16 (the stage computes in float32: `encode_tensor` rounds to the wire
dtype, `decode_tensor` widens back). Decoding validates size against shape and dtype, so a
malformed tensor is INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeserve.common.errors import InvalidInputError
from pipeserve.common.wire import ITEMSIZE, sampling_from_pb
from pipeserve.modeling.engine import SampledToken, SeqChunk
from pipeserve.proto import model_service_pb2 as pb


def wire_dtype(requested: int) -> int:
    """The dtype a stage is asked to send its hidden states in (DTYPE_UNSPECIFIED: float32)."""
    if requested == pb.DTYPE_UNSPECIFIED:
        return pb.DTYPE_FLOAT32
    if requested not in ITEMSIZE:
        raise InvalidInputError(f"output dtype {requested} is not supported (float32, float16, bfloat16)")
    return requested


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of bfloat16, rounded to nearest even (as torch's .to(bfloat16));
    NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def encode_tensor(x: np.ndarray, dtype: int = pb.DTYPE_FLOAT32) -> pb.Tensor:
    """A float array on the wire in `dtype` (pb.DTYPE_*)."""
    dtype = wire_dtype(dtype)
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise InvalidInputError(f"cannot send a {got} tensor (a float array is needed)")
    if dtype == pb.DTYPE_FLOAT32:
        data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    elif dtype == pb.DTYPE_FLOAT16:
        data = np.ascontiguousarray(x, dtype="<f2").tobytes()
    else:
        data = to_bfloat16_bits(x).astype("<u2").tobytes()
    return pb.Tensor(data=data, shape=list(x.shape), dtype=dtype)


def decode_tensor(msg: pb.Tensor) -> np.ndarray:
    """A wire tensor as a float32 array: float32 as a read-only view of the message's bytes (no
    copy), float16 / bfloat16 widened exactly into an array of its own."""
    itemsize = ITEMSIZE.get(msg.dtype)
    if itemsize is None:
        raise InvalidInputError(f"tensor dtype {pb.DType.Name(msg.dtype)} is not supported")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"tensor shape {list(shape)} has a negative dimension")
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    if len(msg.data) != expected:
        raise InvalidInputError(
            f"tensor of shape {list(shape)} and dtype {pb.DType.Name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    if msg.dtype == pb.DTYPE_FLOAT32:  # a read-only view of the message's bytes: the model copies it
        return np.frombuffer(msg.data, dtype="<f4").reshape(shape)  # once, into its residual stream
    if msg.dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(msg.data, dtype="<f2").astype(np.float32).reshape(shape)
    bits = np.frombuffer(msg.data, dtype="<u2").astype(np.uint32) << np.uint32(16)
    return bits.view(np.float32).reshape(shape)


def chunks_from_pb(chunks: Iterable[pb.SequenceChunk], last: bool = True) -> list[SeqChunk]:
    """A Forward's or a ChainStep's chunks as the engine takes them. Only the last stage samples,
    so only there are the sampling parameters read (the others pass the message on as it is)."""
    return [
        SeqChunk(
            c.request_id,
            c.start_pos,
            list(c.token_ids),
            sampling_from_pb(c.sampling) if c.sample and last else None,
            c.n_draft if c.sample else 0,
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
