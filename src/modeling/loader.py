"""Builds one pipeline stage and fills it with the weights that stage owns, nothing more.

Reads GGUF files (tensors by name, matrices kept in their block form as `QTensor`s; the few types
without a native kernel are dequantized to fp32 here, with a log line) and Hugging Face checkpoint
folders (config.json + *.safetensors, sharded index supported; keys by prefix; matrices keep their
stored fp32/fp16/bf16 dtype). Vectors (norms, biases) become fp32 numpy arrays. No torch: the
safetensors files are read by `_safetensors_tensors` (their format is a JSON header and raw bytes).
Called by the node's StageRunner and by tests; the architecture files never touch files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve.common.errors import ModelFormatError
from pipeserve.common.memory import ModelWeights
from pipeserve.common.model_files import ModelSource, model_fingerprint, open_gguf, resolve_model
from pipeserve.kernels import KERNEL_TYPES, QTensor
from pipeserve.kernels.types import TYPE_IDS
from pipeserve.modeling import gemma3, gpt2, llama, phi3
from pipeserve.modeling.config import ModelConfig, Shard
from pipeserve.modeling.layers import weight_bytes

log = logging.getLogger(__name__)

# arch -> (stage class, expected checkpoint tensors, weight import)
ARCHS: dict[str, tuple[type, Callable[..., dict[str, tuple[int, ...]]], Callable[..., None]]] = {
    "llama": (llama.LlamaStage, llama.hf_weight_shapes, llama.load_hf_weights),
    "phi3": (phi3.Phi3Stage, phi3.hf_weight_shapes, phi3.load_hf_weights),
    "gemma3": (gemma3.Gemma3Stage, gemma3.hf_weight_shapes, gemma3.load_hf_weights),
    "gpt2": (gpt2.GPT2Stage, gpt2.hf_weight_shapes, gpt2.load_hf_weights),
}

# GGUF tensor types we accept: those in kernels.KERNEL_TYPES stay in block form; the rest (Q2_K,
# Q3_K) are dequantized to fp32 at load.
GGUF_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


@dataclass
class LoadedStage:
    cfg: ModelConfig
    shard: Shard
    model: Any  # the architecture's stage object (llama.LlamaStage, ...)
    source: ModelSource
    checksum: str  # identifies the weights: every stage of one model reports the same value
    load_seconds: float
    param_bytes: int  # resident weight bytes of this stage (blocks as stored, tied head counted once)
    tensor_types: dict[str, int] = dataclasses.field(default_factory=dict)  # type name -> matrices


def read_config(source: ModelSource) -> ModelConfig:
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        names = {t.name: t for t in reader.tensors}
        try:
            cfg = ModelConfig.from_gguf(_gguf_metadata(reader), set(names))
        except (ModelFormatError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{source.path}: {exc}") from exc
        if "token_embd.weight" not in names:
            raise ModelFormatError(f"{source.path}: GGUF has no token_embd.weight tensor")
        vocab = int(names["token_embd.weight"].shape[1])  # ggml shape is [C, V]
        return dataclasses.replace(cfg, vocab_size=vocab)
    try:
        return ModelConfig.from_hf(json.loads((source.path / "config.json").read_text()))
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{source.path / 'config.json'} is not valid JSON: {exc}") from exc


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    """The header's key -> value, without the tokenizer's big arrays (the model needs none of them)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and key not in (
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ):
            continue
        out[key] = field.contents()
    return out


def load_stage(model: str | ModelSource, layers: Shard | tuple[int, int] | None = None) -> LoadedStage:
    """Load layers [start, end) (a Shard, or the range; the whole model when None) of `model`."""
    t0 = time.perf_counter()
    source = resolve_model(model) if isinstance(model, str) else model
    cfg = read_config(source)
    start, end = layers.range if isinstance(layers, Shard) else (layers or (0, cfg.n_layers))
    shard = Shard(start, end, cfg.n_layers)
    stage_cls, shapes_fn, import_fn = ARCHS[cfg.arch]
    expected = shapes_fn(cfg, shard)
    if source.kind == "gguf":
        weights = _read_gguf(source.path, cfg, shard, expected)
    else:
        weights = _read_safetensors(source.path, cfg, shard, expected)
    stage = stage_cls(cfg, shard)
    import_fn(stage, weights)
    nbytes, types = weight_bytes(stage)
    dt = time.perf_counter() - t0
    log.info(
        "loaded %s layers [%d, %d) of %d: %d tensors (%s), %.1f MiB in %.2f s",
        source.name,
        shard.start_layer,
        shard.end_layer,
        cfg.n_layers,
        len(expected),
        ", ".join(f"{n} {t}" for t, n in sorted(types.items())),
        nbytes / 2**20,
        dt,
    )
    return LoadedStage(cfg, shard, stage, source, model_fingerprint(source.path), dt, nbytes, types)


def model_weights(source: ModelSource, cfg: ModelConfig | None = None) -> ModelWeights:
    """The bytes each layer's weights and the two ends (embedding; final norm and head) take once
    loaded, from the files' headers alone (no tensor data is read): `.stage(start, end)` equals
    `load_stage(source, (start, end)).param_bytes`. GGUF matrices of a type with a kernel stay as
    stored (read in place from the map), other matrices and every vector become fp32; checkpoint
    matrices keep F32 / F16 / BF16 (other dtypes become fp32), vectors become fp32. Node servers
    call it before mapping anything, to check their share against their memory limit."""
    cfg = cfg or read_config(source)
    n = cfg.n_layers
    shapes_fn = ARCHS[cfg.arch][1]
    names = shapes_fn(cfg, Shard(0, n, n)) | shapes_fn(cfg, Shard(n - 1, n, n))  # + a tied head
    sizes = (
        _gguf_sizes(source.path, cfg, names) if source.kind == "gguf" else _st_sizes(source.path, cfg, names)
    )
    prefix = "h." if cfg.arch == "gpt2" else "model.layers."
    layers = [0] * n
    for name, size in sizes.items():
        if name.startswith(prefix):
            layers[int(name[len(prefix) :].split(".", 1)[0])] += size

    def ends(start: int, end: int) -> int:
        return sum(sizes[k] for k in shapes_fn(cfg, Shard(start, end, n)) if not k.startswith(prefix))

    both = ends(0, n)
    if n == 1:
        return ModelWeights(tuple(layers), both, both, both)
    first, last = ends(0, 1), ends(n - 1, n)
    return ModelWeights(tuple(layers), first, last, first + last - both)


def _gguf_sizes(path: Path, cfg: ModelConfig, names: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """HF name -> bytes as `_read_gguf` holds the tensor, from the GGUF's tensor table."""
    tensors = {t.name: t for t in open_gguf(path).tensors}
    out = {}
    for hf in names:
        name, _ = _gguf_name(hf, cfg)
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: GGUF lacks tensor {name} (needed for {hf})")
        kept = len(t.shape) > 1 and t.tensor_type.name in KERNEL_TYPES
        out[hf] = t.n_bytes if kept else t.n_elements * 4
    return out


def _st_sizes(folder: Path, cfg: ModelConfig, names: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """HF name -> bytes as `_read_safetensors` holds the tensor, from the files' JSON headers."""
    prefixes = ("transformer.",) if cfg.arch == "gpt2" else ()
    kept = {"F32": 4, "F16": 2, "BF16": 2}
    out: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, info in header.items():
            name = next((key[len(p) :] for p in prefixes if key.startswith(p)), key)
            if name in names and name not in out:
                count = int(np.prod(info["shape"], dtype=np.int64))
                out[name] = count * (kept.get(info["dtype"], 4) if len(info["shape"]) == 2 else 4)
    missing = sorted(set(names) - set(out))
    if missing:
        raise ModelFormatError(f"{folder}: the checkpoint lacks tensor {missing[0]}")
    return out


_MISSING = object()


def _gguf_field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ModelFormatError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


# Hugging Face name (after `model.layers.N.`) -> GGUF name (after `blk.N.`), as llama.cpp writes them.
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # Phi-3
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # Phi-3: gate | up, 2I rows
    **{f"self_attn.{n}_proj.{w}": f"attn_{n}.{w}" for n in "qkv" for w in ("weight", "bias")},
    **{f"self_attn.o_proj.{w}": f"attn_output.{w}" for w in ("weight", "bias")},
    **{f"mlp.{n}_proj.{w}": f"ffn_{n}.{w}" for n in ("gate", "up", "down") for w in ("weight", "bias")},
}
_GGUF_GEMMA3_NAMES = {  # Gemma 3's four norms per layer
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}


_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_GGUF_GPT2_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_GGUF_GPT2_LAYER_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _gguf_name(hf: str, cfg: ModelConfig) -> tuple[str, str | None]:
    """HF tensor name -> (GGUF name, which rotary un-permute to apply: 'q', 'k' or None)."""
    if cfg.arch == "gpt2":
        if hf in _GGUF_GPT2_NAMES:
            return _GGUF_GPT2_NAMES[hf], None
        _, n, sub_kind = hf.split(".", 2)  # h.N.attn.c_attn.weight
        sub, kind = sub_kind.rsplit(".", 1)
        return f"blk.{n}.{_GGUF_GPT2_LAYER_NAMES[sub]}.{kind}", None
    if hf in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf], None
    _, _, i, *rest = hf.split(".")
    sub = ".".join(rest)
    name = (_GGUF_GEMMA3_NAMES.get(sub) if cfg.arch == "gemma3" else None) or _GGUF_LAYER_NAMES[sub]
    # llama.cpp's converter interleaves the rotary halves of q and k (weights and biases) for the
    # llama architecture only; the others (qwen2, qwen3, gemma3, phi3) keep Hugging Face's order
    permute = None
    if cfg.model_type == "llama" and sub.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
        permute = sub[10]
    return f"blk.{i}.{name}", permute


def _check_no_extra(
    path: Path, present: set[str], wanted: set[str], cfg: ModelConfig, shard: Shard, layer_prefix: str
) -> None:
    """A tensor in the stage's layer range that the architecture has no use for is an error: the
    file's author meant it to change the math (a bias, a norm), and ignoring it would be wrong."""
    for name in sorted(present - wanted):
        if not name.startswith(layer_prefix):
            continue
        i = name[len(layer_prefix) :].split(".", 1)[0]
        # rotary_emb.inv_freq / attn.bias / attn.masked_bias: buffers old checkpoints saved, derived from config
        if name.endswith(("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")):
            continue
        if i.isdigit() and shard.start_layer <= int(i) < shard.end_layer:
            raise ModelFormatError(
                f"{path}: tensor {name} is not part of a {cfg.model_type} layer as we compute it (refusing "
                "to ignore it)"
            )


def _read_gguf(
    path: Path, cfg: ModelConfig, shard: Shard, expected: dict[str, tuple[int, ...]]
) -> llama.Weights:
    """Read the stage's tensors: matrices keep their blocks, read in place from the file's
    read-only memory map (no copy: the stage's weights cost the file's pages, once, and processes
    on one host share them); vectors become fp32. Only llama's q and k rows are copied, to undo
    the converter's rotary interleave; the pages of the originals then leave the process."""
    from gguf.quants import dequantize

    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        if cfg.arch != "llama":
            raise ModelFormatError(f"{path}: tensor rope_freqs.weight is not supported for {cfg.model_type}")
        expected = expected | {"rope_freqs.weight": (cfg.head_dim // 2,)}
    names = {hf: _gguf_name(hf, cfg) for hf in expected}
    globals_ = _GGUF_GPT2_NAMES if cfg.arch == "gpt2" else _GGUF_GLOBAL_NAMES
    stray = sorted(n for n in tensors if not n.startswith("blk.") and n not in globals_.values())
    if stray:
        raise ModelFormatError(f"{path}: tensor {stray[0]} is not part of a {cfg.model_type} model")
    _check_no_extra(path, set(tensors), {g for g, _ in names.values()}, cfg, shard, "blk.")
    out: llama.Weights = {}
    # A first stage that is not also the tied head only looks its embedding up by row.
    lookup_only = shard.is_first and not (shard.is_last and cfg.tie_word_embeddings)
    for hf_name, shape in expected.items():
        name, permute = names[hf_name]
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: GGUF lacks tensor {name} (needed for {hf_name})")
        tname = t.tensor_type.name
        if tname not in GGUF_TYPES:
            raise ModelFormatError(f"{path}: tensor {name} has unsupported type {tname}")
        got = tuple(int(d) for d in reversed(t.shape))  # ggml lists dimensions innermost first
        if got != shape:
            raise ModelFormatError(f"{path}: tensor {name} has shape {got}, expected {shape}")
        heads = cfg.n_heads if permute == "q" else cfg.n_kv_heads
        # llama.cpp interleaves rotary halves in q and k; this order undoes it for rotate-half rope
        perm = np.arange(shape[0]).reshape(heads, shape[0] // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
        try:
            if len(shape) == 1 or tname not in KERNEL_TYPES:
                arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
                reader.advise(t, mmap.MADV_DONTNEED)  # copied out: the mapped pages can go
                if len(shape) == 1:
                    v = arr
                    if cfg.arch == "gemma3" and name.endswith("norm.weight"):
                        v = v - 1.0  # llama.cpp stores Gemma's (1 + w); the model adds the 1
                    out[hf_name] = v[perm] if permute else v
                    continue
                log.warning(
                    "%s: tensor %s is %s, which has no kernel: dequantized to F32", path.name, name, tname
                )
                q = QTensor.from_dense(arr)
            elif name == "token_embd.weight" and lookup_only:  # resident only as rows are used
                q = QTensor(reader.mapped_rows(t), TYPE_IDS[tname], (shape[0], shape[1]))
            else:
                # a read-only view of the map: its pages become resident as the kernels read them
                q = QTensor(t.data, TYPE_IDS[tname], (shape[0], shape[1]))
                if not permute:
                    reader.advise(t, mmap.MADV_WILLNEED)  # read ahead now, not in the first request
        except (ValueError, TypeError) as exc:  # truncated data or an unknown block layout
            raise ModelFormatError(f"{path}: cannot read {name} ({type(exc).__name__}: {exc})") from exc
        if permute:
            q = q.permute_rows(perm)  # a copy in the rotate-half order
            reader.advise(t, mmap.MADV_DONTNEED)
        out[hf_name] = q
    return out


def _read_safetensors(
    folder: Path, cfg: ModelConfig, shard: Shard, expected: dict[str, tuple[int, ...]]
) -> llama.Weights:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors files")
    prefixes = ("transformer.",) if cfg.arch == "gpt2" else ()
    layer_prefix = "h." if cfg.arch == "gpt2" else "model.layers."
    out: llama.Weights = {}
    for fname in files:
        path = folder / fname
        try:
            tensors = _safetensors_tensors(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(
                f"{path}: unreadable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
        keys = {next((k[len(p) :] for p in prefixes if k.startswith(p)), k): k for k in tensors}
        _check_no_extra(path, set(keys), set(expected), cfg, shard, layer_prefix)
        for name, key in keys.items():
            if name in expected and name not in out:
                dtype, arr = tensors[key]
                t = _as_weight(path, key, dtype, arr)
                if cfg.arch == "gpt2" and name.endswith(_CONV1D) and isinstance(t, QTensor):
                    t = t.transposed()  # Conv1D stores [in, out]; the model takes [out, in]
                out[name] = t
    return out


# safetensors dtype -> the numpy dtype its bytes are read as (BF16 as its raw uint16 bits)
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _safetensors_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, array viewing the file's memory map) for every tensor of a safetensors file:
    8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian data."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.size < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = int(data[:8].view("<u8")[0])
    if n > data.size - 8:
        raise ValueError(f"header length {n} is past the end of the file")
    header = json.loads(bytes(data[8 : 8 + n]))
    base = 8 + n
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (lo, hi) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        np_dtype = _ST_DTYPES.get(dtype)
        if np_dtype is None:
            raise ValueError(f"tensor {name} has dtype {dtype}, which is not supported")
        count = int(np.prod(shape, dtype=np.int64))
        if hi - lo != count * np.dtype(np_dtype).itemsize or base + hi > data.size:
            raise ValueError(f"tensor {name}: {hi - lo} bytes at [{lo}, {hi}) do not hold {dtype} {shape}")
        out[name] = (dtype, data[base + lo : base + hi].view(np_dtype).reshape(shape))
    return out


def _as_weight(path: Path, name: str, dtype: str, arr: np.ndarray) -> QTensor | np.ndarray:
    """A checkpoint tensor as the model holds it (copied out of the file's map): matrices keep
    fp32/fp16/bf16 (other dtypes become fp32); vectors become fp32."""
    if dtype == "BF16":  # the bits of a bfloat16 are the high half of a float32's
        if arr.ndim == 2:
            return QTensor.from_dense(np.array(arr), "BF16")
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if arr.ndim == 2:
        return QTensor.from_dense(np.array(arr) if dtype in ("F32", "F16") else arr.astype(np.float32))
    if arr.ndim > 2:
        raise ModelFormatError(
            f"{path}: tensor {name} has {arr.ndim} dimensions; only vectors and matrices are used"
        )
    return arr.astype(np.float32)
