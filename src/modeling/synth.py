"""Synthetic models: GGUF files with the layout of a published Q4_K_M model and random weights.

A spec (SPECS) copies a published model's tensor names, shapes and types (llama.cpp's Q4_K_M mix),
its hyper-parameter metadata and a real tokenizer of its family; the weights are seeded random
normals quantized by our own quantizer (kernels.quantize). It is the scale benchmark's model and
how tests make a model too large for a memory budget without downloading one. `plan` lists the
tensors without writing anything; `write` streams them to a file. `pipeserve synth` calls `write`.

Determinism: tensor `name`'s values are drawn in row blocks of ~CHUNK values, block i from numpy's
PCG64 seeded with SeedSequence([seed, i, *name.encode()]) (standard normals in float32, times
the tensor's std, plus its mean), so one seed gives the same bytes whatever the thread count, and
a cut-down model (`n_layers`) holds exactly the full model's values for the tensors it has (their
types follow llama.cpp's rule for the layer count written, as quantizing a cut model would).

Tokenizers: the Qwen specs copy every `tokenizer.*` key of the Qwen2.5-Coder-1.5B-Instruct GGUF
(the named model `qwen2.5-coder-1.5b-instruct`: `make models`), padded with [PAD<id>] tokens to
the spec's vocabulary as llama.cpp's converter pads. No Llama 3 GGUF ships with pipeserve, so the
Llama specs build a Llama-3-like one: SmolLM2's byte-level BPE vocabulary and merges (the
embedded model's GGUF), [PAD<id>] placeholders up to id 128000, then Llama 3.1's 256 special
tokens (<|begin_of_text|> = 128000 ... <|eot_id|> = 128009, reserved ones after), Llama 3's
pre-tokenizer and chat template. It encodes text into different ids than Meta's tokenizer would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeserve.kernels.types import TYPE_IDS, TYPES


@dataclass(frozen=True)
class Spec:
    """A published model's shape: what the file copies. Every width is a multiple of 256 (Q4_K)."""

    name: str
    arch: Literal["llama", "qwen2"]
    published: str  # the model file whose layout this copies
    size_label: str
    n_layers: int
    hidden: int
    ffn: int  # MLP width
    n_heads: int
    n_kv_heads: int
    vocab: int  # token_embd / output rows = tokens in the tokenizer
    context_length: int
    rope_theta: float
    norm_eps: float
    llama3_rope: bool = False  # a rope_freqs tensor with Llama 3.1's scaling (factor 8, 1..4, 8192)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


_LLAMA31 = Spec(
    "llama-3.1-8b",
    "llama",
    published="Llama-3.1-8B-Instruct Q4_K_M (4,920,734,016 bytes)",
    size_label="8B",
    n_layers=32,
    hidden=4096,
    ffn=14336,
    n_heads=32,
    n_kv_heads=8,
    vocab=128256,
    context_length=131072,
    rope_theta=500000.0,
    norm_eps=1e-5,
    llama3_rope=True,
)
_QWEN25 = Spec(
    "qwen2.5-7b",
    "qwen2",
    published="Qwen2.5-7B-Instruct Q4_K_M",
    size_label="7.6B",
    n_layers=28,
    hidden=3584,
    ffn=18944,
    n_heads=28,
    n_kv_heads=4,
    vocab=152064,
    context_length=32768,
    rope_theta=1000000.0,
    norm_eps=1e-6,
)
SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        _LLAMA31,
        _QWEN25,
        # the named model's own layout: tests compare plan() with the real file's table
        dataclasses.replace(
            _QWEN25, name="qwen2.5-coder-1.5b", published="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
            size_label="1.5B", hidden=1536, ffn=8960, n_heads=12, n_kv_heads=2, vocab=151936,
        ),
        # small models with the same structure and tokenizers (~100 MB files, mostly embedding and head)
        dataclasses.replace(
            _LLAMA31, name="llama-test", published="Llama-3.1-8B-Instruct, 4 layers of width 512",
            size_label="143M", n_layers=4, hidden=512, ffn=1536, n_heads=8, n_kv_heads=2,
        ),
        dataclasses.replace(
            _QWEN25, name="qwen-test", published="Qwen2.5-7B-Instruct, 4 layers of width 512",
            size_label="168M", n_layers=4, hidden=512, ffn=1536, n_heads=8, n_kv_heads=2,
        ),
    )
}  # fmt: skip

CHUNK = 1 << 22  # values per random stream (a matrix is drawn in blocks of max(1, CHUNK // cols) rows)
_ALIGN = 32  # GGUF's default tensor data alignment
_FILE_TYPE_Q4_K_M = 15  # general.file_type: LLAMA_FTYPE_MOSTLY_Q4_K_M


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file. Values: mean + std * N(0, 1), except rope_freqs (computed)."""

    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols); GGUF lists the dimensions reversed
    type_name: str  # F32, Q4_K, Q6_K or Q8_0
    mean: float
    std: float

    @property
    def nbytes(self) -> int:
        _, elems, size = TYPES[TYPE_IDS[self.type_name]]
        return math.prod(self.shape) // elems * size


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: attn_v / ffn_down tensor number i of n is Q6_K in a Q4_K_M file. Current
    llama.cpp numbers them by layer; older versions numbered them in the input file's order,
    often the converter's (layers 0, 1, 10, 11, ...), and so picked other layers, as many."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _q4_k_m_type(name: str, shape: tuple[int, ...], layer: int, n_layers: int) -> str:
    """llama.cpp's type for a tensor of a Q4_K_M file (llama_tensor_get_type_impl, dense models):
    vectors stay F32; the untied output Q6_K (Q8_0 if a row is not whole 256-blocks); attn_v and
    ffn_down Q6_K on the use-more-bits layers; everything else Q4_K (its fallback for rows that
    are not whole blocks, Q5_0, is not a type we write)."""
    if len(shape) == 1:
        return "F32"
    cols = shape[1]
    if name == "output.weight":
        return "Q6_K" if cols % 256 == 0 else "Q8_0"
    more = name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, n_layers)
    qtype = "Q6_K" if more else "Q4_K"
    if cols % 256:
        if qtype == "Q4_K":
            raise ValueError(f"{name}: {cols} columns are not whole Q4_K blocks (llama.cpp would use Q5_0)")
        qtype = "Q8_0"
    return qtype


def _spec(spec: str) -> Spec:
    if spec not in SPECS:
        raise ValueError(f"unknown spec {spec!r} (have {', '.join(SPECS)})")
    return SPECS[spec]


def plan(spec: str, n_layers: int | None = None) -> list[TensorPlan]:
    """The file's tensors in write order, with their types and how they are drawn.

    Stds keep a unit-scale residual stream through the model: embeddings N(0, 1); projections into
    a layer 1/sqrt(fan_in); projections back into the residual (attn_output, ffn_down) also
    / sqrt(2 * the spec's layers), so the sum over layers stays ~1 (GPT-2's scheme); the head
    1/sqrt(hidden) (logits ~N(0, 1)); norms 1 + N(0, 0.1^2); biases N(0, 0.1^2).
    """
    s = _spec(spec)
    n = s.n_layers if n_layers is None else n_layers
    if n < 1:
        raise ValueError(f"a model needs at least one layer, got n_layers={n}")
    C, F, hd = s.hidden, s.ffn, s.head_dim
    q_rows, kv_rows = s.n_heads * hd, s.n_kv_heads * hd
    into, back = C**-0.5, (2 * s.n_layers) ** -0.5
    out: list[TensorPlan] = []

    def add(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0, layer: int = 0) -> None:
        out.append(TensorPlan(name, shape, _q4_k_m_type(name, shape, layer, n), mean, std))

    add("token_embd.weight", (s.vocab, C), 1.0)
    if s.llama3_rope:
        add("rope_freqs.weight", (hd // 2,), 0.0)
    for i in range(n):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (C,), 0.1, 1.0)
        for kind, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            add(p + f"attn_{kind}.weight", (rows, C), into, layer=i)
            if s.arch == "qwen2":
                add(p + f"attn_{kind}.bias", (rows,), 0.1)
        add(p + "attn_output.weight", (C, q_rows), q_rows**-0.5 * back, layer=i)
        add(p + "ffn_norm.weight", (C,), 0.1, 1.0)
        add(p + "ffn_gate.weight", (F, C), into, layer=i)
        add(p + "ffn_up.weight", (F, C), into, layer=i)
        add(p + "ffn_down.weight", (C, F), F**-0.5 * back, layer=i)
    add("output_norm.weight", (C,), 0.1, 1.0)
    add("output.weight", (s.vocab, C), into)
    return out


def llama3_rope_factors(s: Spec) -> np.ndarray:
    """Llama 3.1's rope_freqs (convert_hf_to_gguf's LlamaModel.generate_extra_tensors, in float32):
    per frequency, the divisor llama.cpp applies (1 for short wavelengths, 8 for long, a ramp)."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    d = s.head_dim
    freqs = np.float32(1.0) / (
        np.float32(s.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    )
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ------------------------------------------------------------------------------------- metadata

# GGUF value types (ggml's docs/gguf.md)
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9
_TOKEN_CONTROL, _TOKEN_UNUSED = 3, 5  # llama.cpp token types
# the tokenizer keys a Qwen GGUF may hold -> value type (element type for arrays), as gguf-py writes them
_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    "tokenizer.ggml.tokens": (_ARR, _STR),
    "tokenizer.ggml.token_type": (_ARR, _I32),
    "tokenizer.ggml.merges": (_ARR, _STR),
    "tokenizer.ggml.bos_token_id": _U32,
    "tokenizer.ggml.eos_token_id": _U32,
    "tokenizer.ggml.padding_token_id": _U32,
    "tokenizer.ggml.unknown_token_id": _U32,
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_eos_token": _BOOL,
    "tokenizer.chat_template": _STR,
}
Metadata = list[tuple[str, Any, Any]]  # (key, value type, value)

# Meta-Llama-3-8B-Instruct's chat template, verbatim
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]  # fmt: skip
_QWEN_SOURCE = "qwen2.5-coder-1.5b-instruct"


def _padded(tokens: list[str], types: list[int], vocab: int, origin: str) -> tuple[list[str], list[int]]:
    """The token list grown to `vocab` with [PAD<id>] (type unused), as convert_hf_to_gguf pads a
    vocabulary smaller than the embedding."""
    if len(tokens) > vocab:
        raise ValueError(f"{origin} has {len(tokens)} tokens, more than the spec's vocab {vocab}")
    extra = range(len(tokens), vocab)
    return tokens + [f"[PAD{i}]" for i in extra], types + [_TOKEN_UNUSED] * len(extra)


def _qwen_tokenizer(vocab: int) -> Metadata:
    from pipeserve.common.model_files import open_gguf, resolve_model

    path = resolve_model(_QWEN_SOURCE).path  # ModelNotFoundError says to run `make models`
    fields = open_gguf(path).fields
    out: Metadata = []
    for key, field in fields.items():
        if not key.startswith("tokenizer."):
            continue
        if key not in _TOKENIZER_KEYS:
            raise ValueError(f"{path}: tokenizer key {key} has no known value type")
        out.append((key, _TOKENIZER_KEYS[key], field.contents()))
    values = {k: v for k, _, v in out}
    tokens, types = _padded(
        values["tokenizer.ggml.tokens"], values["tokenizer.ggml.token_type"], vocab, path.name
    )
    replace = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    return [(k, t, replace.get(k, v)) for k, t, v in out]


def _llama3_tokenizer(vocab: int) -> Metadata:
    from pipeserve.common.model_files import embedded_gguf_path, open_gguf

    path = embedded_gguf_path()
    fields = open_gguf(path).fields
    tokens, types = _padded(
        list(fields["tokenizer.ggml.tokens"].contents()),
        list(fields["tokenizer.ggml.token_type"].contents()),
        vocab - len(_LLAMA3_SPECIAL),
        path.name,
    )
    tokens, types = tokens + _LLAMA3_SPECIAL, types + [_TOKEN_CONTROL] * len(_LLAMA3_SPECIAL)
    if len(tokens) != vocab:
        raise ValueError(f"a Llama 3 tokenizer has {len(tokens)} tokens, not the spec's {vocab}")
    bos = tokens.index("<|begin_of_text|>")
    return [
        ("tokenizer.ggml.model", _STR, "gpt2"),
        ("tokenizer.ggml.pre", _STR, "llama-bpe"),
        ("tokenizer.ggml.tokens", (_ARR, _STR), tokens),
        ("tokenizer.ggml.token_type", (_ARR, _I32), types),
        ("tokenizer.ggml.merges", (_ARR, _STR), list(fields["tokenizer.ggml.merges"].contents())),
        ("tokenizer.ggml.bos_token_id", _U32, bos),
        ("tokenizer.ggml.eos_token_id", _U32, tokens.index("<|eot_id|>")),
        ("tokenizer.ggml.add_bos_token", _BOOL, True),
        ("tokenizer.chat_template", _STR, LLAMA3_CHAT_TEMPLATE),
    ]


def metadata(
    spec: str, seed: int = 0, n_layers: int | None = None, tokenizer: bool | Literal["none"] = True
) -> Metadata:
    """The file's key-value metadata, in the order llama.cpp's converter writes them (without the
    tokenizer's keys when `tokenizer` is False; with `tokenizer="none"`, llama.cpp's placeholder
    vocabulary of the spec's size and no tokens, which needs no real GGUF to copy: for benchmarks
    on machines that have none)."""
    s = _spec(spec)
    n = s.n_layers if n_layers is None else n_layers
    a = s.arch + "."
    cut = "" if n == s.n_layers else f", cut to {n} layers"
    out: Metadata = [
        ("general.architecture", _STR, s.arch),
        ("general.type", _STR, "model"),
        ("general.name", _STR, f"synth-{s.name}-s{seed}"),
        (
            "general.description",
            _STR,
            f"pipeserve synth: random weights (seed {seed}) in the layout of {s.published}{cut}",
        ),
        ("general.size_label", _STR, s.size_label),
        (a + "block_count", _U32, n),
        (a + "context_length", _U32, s.context_length),
        (a + "embedding_length", _U32, s.hidden),
        (a + "feed_forward_length", _U32, s.ffn),
        (a + "attention.head_count", _U32, s.n_heads),
        (a + "attention.head_count_kv", _U32, s.n_kv_heads),
        (a + "rope.freq_base", _F32, s.rope_theta),
        (a + "attention.layer_norm_rms_epsilon", _F32, s.norm_eps),
        ("general.file_type", _U32, _FILE_TYPE_Q4_K_M),
    ]
    if s.arch == "llama":
        out += [(a + "vocab_size", _U32, s.vocab), (a + "rope.dimension_count", _U32, s.head_dim)]
    if tokenizer == "none":
        if s.arch != "llama":
            out.append((a + "vocab_size", _U32, s.vocab))
        out.append(("tokenizer.ggml.model", _STR, "none"))
    elif tokenizer:
        out += _llama3_tokenizer(s.vocab) if s.arch == "llama" else _qwen_tokenizer(s.vocab)
    out.append(("general.quantization_version", _U32, 2))
    return out


# ----------------------------------------------------------------------------------- the writer


def _gguf_str(v: str) -> bytes:
    b = v.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(vtype: Any, value: Any) -> bytes:
    if isinstance(vtype, tuple):  # (_ARR, element type)
        etype = vtype[1]
        head = struct.pack("<IQ", etype, len(value))
        if etype == _STR:
            return head + b"".join(_gguf_str(v) for v in value)
        return head + np.asarray(value, dtype={_I32: "<i4", _U32: "<u4", _F32: "<f4"}[etype]).tobytes()
    if vtype == _STR:
        return _gguf_str(value)
    return struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?"}[vtype], value)


def _header(meta: Metadata, tensors: list[TensorPlan]) -> bytes:
    """Magic, version 3, counts, metadata and the tensor table, padded to the data's alignment."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for key, vtype, value in meta:
        out += _gguf_str(key) + struct.pack("<I", vtype[0] if isinstance(vtype, tuple) else vtype)
        out += _gguf_value(vtype, value)
    offset = 0
    for t in tensors:
        dims = t.shape[::-1]  # ggml order: innermost first
        out += _gguf_str(t.name) + struct.pack(
            f"<I{len(dims)}QIQ", len(dims), *dims, TYPE_IDS[t.type_name], offset
        )
        offset += -(-t.nbytes // _ALIGN) * _ALIGN
    out += bytes(-len(out) % _ALIGN)
    return bytes(out)


def _chunk(t: TensorPlan, seed: int, index: int, rows: int, spec: Spec) -> np.ndarray:
    """The bytes of row block `index` of tensor t (`rows` rows, fewer at the end)."""
    if t.name == "rope_freqs.weight":
        return llama3_rope_factors(spec).view(np.uint8)
    from pipeserve.kernels import quantize

    n_rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
    k = min(rows, n_rows - index * rows)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, *t.name.encode()])))
    x = rng.standard_normal((k, cols), dtype=np.float32)
    x *= np.float32(t.std)
    if t.mean:
        x += np.float32(t.mean)
    return x.view(np.uint8) if t.type_name == "F32" else quantize(x, t.type_name)


def _data(spec: Spec, tensors: list[TensorPlan], seed: int, threads: int) -> Iterator[np.ndarray]:
    """Every tensor's bytes in order (with alignment padding), made `threads` chunks at a time."""
    jobs = []
    for t in tensors:
        n_rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
        rows = max(1, CHUNK // cols)
        jobs += [(t, i, rows) for i in range(-(-n_rows // rows))]
        jobs.append((t, -1, 0))  # the padding after t
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[np.ndarray] | np.ndarray] = deque()
        for t, i, rows in jobs:
            if i < 0:
                pending.append(np.zeros(-t.nbytes % _ALIGN, np.uint8))
            else:
                pending.append(pool.submit(_chunk, t, seed, i, rows, spec))
            while len(pending) > 2 * threads:  # bounded: a few chunks in memory, whatever the tensor
                item = pending.popleft()
                yield item if isinstance(item, np.ndarray) else item.result()
        while pending:
            item = pending.popleft()
            yield item if isinstance(item, np.ndarray) else item.result()


def write(
    spec: str,
    out: Path,
    seed: int = 0,
    n_layers: int | None = None,
    *,
    tokenizer: bool | Literal["none"] = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the spec's model (cut to `n_layers` layers if given) to `out`, streaming, atomically
    (a temporary name in the same folder, renamed when complete). tokenizer=False leaves out the
    tokenizer's metadata (the same tensors: for readers that parse every array, e.g. transformers);
    tokenizer="none" writes llama.cpp's placeholder vocabulary instead (metadata()).
    progress(bytes done, total) is called about once a second. Returns out."""
    s = _spec(spec)
    tensors = plan(spec, n_layers)
    header = _header(metadata(spec, seed, n_layers, tokenizer), tensors)
    total = len(header) + sum(-(-t.nbytes // _ALIGN) * _ALIGN for t in tensors)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            done, last = len(header), time.monotonic()
            for chunk in _data(s, tensors, seed, threads):
                f.write(chunk.data)
                done += chunk.nbytes
                if progress and time.monotonic() - last > 1.0:
                    progress(done, total)
                    last = time.monotonic()
        if tmp.stat().st_size != total:  # pragma: no cover - a bug in the offsets above
            raise RuntimeError(f"{tmp}: wrote {tmp.stat().st_size} bytes, planned {total}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        progress(total, total)
    return out
