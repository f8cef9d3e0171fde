"""A fast GGUF header reader: metadata and the tensor table in well under a second.

`gguf.GGUFReader` builds a numpy view per array element: for a 262k-token vocabulary (Gemma 3)
that is ~40 s of start-up on every node and on the tokenizer. This reads the same header with
`struct` over a memory map (one pass, strings decoded once) and exposes the part of GGUFReader's
interface that pipeserve uses: `fields[key].contents()`, `tensors` (name, tensor_type, shape in
ggml order, n_bytes, data as uint8 rows), `data_offset`. The format: ggml's docs/gguf.md, version 2-3.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
# value type id -> struct format of one scalar (8: string, 9: array are handled apart)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


# Arrays at least this long (a tokenizer's vocabulary, merges, token types) stay in the map until
# asked for: Qwen2.5's 152k tokens and 151k merges are ~25 MiB as Python objects, which a process
# that only loads weights (a node, the engine benchmark) would otherwise hold.
_LAZY_MIN = 1024


@dataclass(frozen=True)
class _Deferred:
    """A long array of numbers or strings, read from the map by each `Field.contents()` call."""

    buf: mmap.mmap
    etype: int  # the element's value type
    count: int
    offset: int  # of its first element, in the file

    def read(self) -> list[Any]:
        return _array(self.buf, self.offset, self.etype, self.count)[0]


@dataclass(frozen=True)
class Field:
    """One metadata value: scalars, str and short lists decoded; long arrays on demand."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value.read() if isinstance(self.value, _Deferred) else self.value


def _array(buf: Any, off: int, etype: int, count: int, decode: bool = True) -> tuple[list[Any], int]:
    """An array of numbers or strings at `off` -> (its list, the offset past it); with decode=False
    only the offset (the list is empty)."""
    if etype in _NUMPY:  # numbers: one frombuffer, then a list as gguf-py gives
        dt = np.dtype(_NUMPY[etype])
        end = off + count * dt.itemsize
        if not decode:
            return [], end
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=off)
        return (arr.astype(bool).tolist() if etype == 7 else arr.tolist()), end
    out: list[Any] = []
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        (n,) = unpack(buf, off)
        if decode:
            out.append(str(buf[off + 8 : off + 8 + n], "utf-8"))
        off += 8 + n
    return out, off


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    n_bytes: int
    offset: int  # absolute, in the file
    _map: np.ndarray  # the whole file, uint8

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (a view of the memory map)."""
        rows = self.n_elements // self.shape[0]
        return self._map[self.offset : self.offset + self.n_bytes].reshape(rows, -1)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != _MAGIC:
            raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        self._buf, self._off = buf, 24
        self.fields: dict[str, Field] = {  # as gguf-py lists them
            "GGUF.version": Field("GGUF.version", version),
            "GGUF.tensor_count": Field("GGUF.tensor_count", n_tensors),
            "GGUF.kv_count": Field("GGUF.kv_count", n_kv),
        }
        for _ in range(n_kv):
            key = self._str()
            (vtype,) = self._unpack("<I")
            self.fields[key] = Field(key, self._value(vtype))
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ttype, offset = self._unpack("<IQ")
            infos.append((name, dims, ttype, offset))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        self.data_offset = (self._off + align - 1) // align * align
        whole = np.frombuffer(self._mm, dtype=np.uint8)
        self.tensors: list[Tensor] = []
        for name, dims, ttype, offset in infos:
            qtype = GGMLQuantizationType(ttype)
            elems, nbytes = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) // elems * nbytes
            start = self.data_offset + offset
            if start + n > len(whole):
                raise ValueError(f"tensor {name} ends at byte {start + n}, past the file's {len(whole)}")
            self.tensors.append(Tensor(name, qtype, tuple(int(d) for d in dims), n, start, whole))
        del self._buf  # the memory map stays open for the tensors' views

    def advise(self, t: Tensor, advice: int) -> None:
        """madvise the pages of the map that hold tensor t: MADV_WILLNEED reads them ahead (into
        the page cache, not into this process); MADV_DONTNEED takes them out of this process's
        resident set (the map is read-only and file-backed: a later read maps them again)."""
        page = mmap.PAGESIZE
        lo = t.offset // page * page
        hi = min(-(-(t.offset + t.n_bytes) // page) * page, len(self._mm))
        if hi > lo and hasattr(self._mm, "madvise"):  # not on every OS: then it is only slower
            self._mm.madvise(advice, lo, hi - lo)

    def mapped_rows(self, t: Tensor) -> np.ndarray:
        """A tensor's bytes as writable uint8 [rows, row_bytes] over a private map of the file.

        For a matrix that is only looked up by row (a first stage's token embedding): its pages
        are read from the file when a row is first used and count in the process's memory only
        then. The map is copy-on-write (nothing writes it) and read at random, without readahead.
        """
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        mm.madvise(mmap.MADV_RANDOM)
        rows = t.n_elements // t.shape[0]
        return np.frombuffer(mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset).reshape(rows, -1)

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return out

    def _str(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._off)
        s = bytes(self._buf[self._off + 8 : self._off + 8 + n]).decode("utf-8")
        self._off += 8 + n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == 8:
            return self._str()
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _NUMPY or etype == 8:
            start, lazy = self._off, count >= _LAZY_MIN
            out, self._off = _array(self._buf, start, etype, count, decode=not lazy)
            return _Deferred(self._mm, etype, count, start) if lazy else out
        return [self._value(etype) for _ in range(count)]
