"""Memory budgets of model nodes: how much a node may use, what its share of the model needs, and
the KV pool that `cache_budget_tokens: auto` gives it.

The node server calls `node_limit` at start, then `share_need` (through `plan_share`) before it maps
any weight: a share that does not fit under the limit is refused with the numbers (`check_share`).
node/capacity.py reports the same quantities for `layers: auto` (common/placement.py). Everything
but `cgroup_memory_limit` and `machine_available` (which read /proc and /sys) is arithmetic over
its arguments, so tests run it on fake cgroup trees and made-up models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeserve.common.errors import ConfigError
from pipeserve.common.shard import Shard

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A cgroup v1 "no limit" reads as LONG_MAX rounded down to a page (9223372036854771712); anything
# from 2^60 up is taken as no limit.
NO_LIMIT = 1 << 60

# The runtime allowance: what a node process holds beyond its weights and its KV pool, at its
# worst (`runtime_bytes`). Measured with scripts/runtime_memory.py (bench/runtime-memory-*.json):
# one node serving a whole model, 32 requests at once with ~450-token prompts (prefill chunks of
# max_batch_tokens = 256), sampled with top-k / top-p and 20 top logprobs; the peak of its anonymous
# memory outside the KV pool, less the weights' anonymous copies, plus its resident library pages:
#                                   idle (rope tables)  + scratch + libraries = runtime (allowance)
#   SmolLM2-135M                    40.2 (2 MiB)        + 9.5     + 39.5      = 89.1 MiB (117.9)
#   Qwen2.5-Coder-1.5B              55.5 (16 MiB)       + 35.4    + 39.7      = 130.7 MiB (184.3)
#   Llama-3.1-8B's shapes (synth)   104.5 (64 MiB)      + 61.1    + 39.7      = 205.3 MiB (257.3)
# Three parts: the interpreter with a node's imports and threads (~40 MiB) and the libraries'
# pages (~40 MiB), the same for every model: RUNTIME_BASE_BYTES; the RoPE tables (cos and sin,
# [max_position, head_dim / 2] fp32 per layer type), exact; one step's scratch, which grows with
# the shapes: the MLP's rows (MLP_ROWS = 256) x its width (gate, up, activation), the step's hidden
# states (rows x hidden: residual, norms, q/k/v, attention out, the wire in and out) and the
# logits of up to max_running sampled rows x the vocabulary (with the sampler's copy), counted
# SCRATCH_* times: about twice the measured scratch, 1.25-1.4x each measured runtime in all
# (tests/test_memory.py keeps every bench/runtime-memory-*.json figure a fifth under it).
RUNTIME_BASE_BYTES = 96 * MiB
SCRATCH_MLP, SCRATCH_HIDDEN, SCRATCH_LOGITS = 3, 6, 2


def runtime_bytes(
    hidden: int,
    ffn: int,
    vocab: int,
    rope_table_bytes: int,
    max_batch_tokens: int,
    max_running: int,
    mlp_rows: int = 256,
) -> int:
    """The runtime allowance of a node serving a model of these shapes (see RUNTIME_BASE_BYTES);
    `mlp_rows`: the rows of one MLP call (modeling/layers.py MLP_ROWS)."""
    rows = max_batch_tokens
    scratch = (
        SCRATCH_MLP * min(rows, mlp_rows) * ffn
        + SCRATCH_HIDDEN * rows * hidden
        + SCRATCH_LOGITS * min(max_running, rows) * vocab
    ) * 4
    return RUNTIME_BASE_BYTES + rope_table_bytes + scratch


# `cache_budget_tokens: auto`: the KV pool takes this share of what is left under the limit after
# the weights and the runtime allowance (the rest is headroom for what the allowance misses), at
# most KV_AUTO_MAX_TOKENS positions (the former fixed default: an unlimited machine does not get an
# absurd pool) and at least coordinator.max_batch_tokens (one step's prefill must fit).
KV_AUTO_SHARE = 0.9
KV_AUTO_MAX_TOKENS = 32768

MemorySetting = Literal["auto"] | int
LimitSource = Literal["config", "cgroup", "machine"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int) -> int:
    """Bytes from a whole number or a string with a unit: "6GiB", "512MiB", "6Gi" (powers of
    1024), "2GB", "2G" (powers of 1000, as Kubernetes writes them), "1.5GiB", "1048576"."""
    if isinstance(value, bool):
        raise ValueError(f"expected bytes, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"must be at least 1 byte, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"{value!r} is not a size: give bytes or a number with a unit (KiB, MiB, GiB, TiB or "
            "Ki/Mi/Gi/Ti for powers of 1024; kB, MB, GB, TB for powers of 1000), e.g. '6GiB'"
        )
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"{value!r} is less than 1 byte")
    return n


def format_bytes(n: float, up: bool = False) -> str:
    """'2.41 GiB', '512.0 MiB', '3.0 KiB', '12 B' (negative numbers keep their sign); `up` rounds
    up at the shown precision (a limit to set must not read below what is needed)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size, digits in (("GiB", GiB, 2), ("MiB", MiB, 1), ("KiB", KiB, 1)):
        if n >= size:
            v = n / size
            if up:
                v = math.ceil(v * 10**digits - 1e-9) / 10**digits
            return f"{sign}{v:.{digits}f} {unit}"
    return f"{sign}{math.ceil(n) if up else int(n)} B"


# ---- the limit a node runs under ---------------------------------------------------------------
@dataclass(frozen=True)
class MemoryLimit:
    """The bytes a node's process may use, and where the number comes from."""

    bytes: int
    source: LimitSource
    reason: str  # e.g. "cgroup v2 memory.max of /kubepods/pod1: 2.00 GiB"


def node_limit(
    setting: MemorySetting,
    sharing: int = 1,
    root: Path = CGROUP_ROOT,
    proc_cgroup: str | None = None,
    available: int | None = None,
) -> MemoryLimit:
    """A node's memory limit: an explicit `memory_limit` as given; `auto`, the memory cgroup's
    limit when one applies to this process (v2 memory.max, v1 memory.limit_in_bytes, the smallest
    over its cgroup and ancestors), capped by the machine's available memory; with no cgroup limit,
    the machine's available memory divided among the `sharing` nodes the config puts on this host
    (they all hold their memory at once). A cgroup is taken as this node's own (a container or pod
    per node); nodes that share one cgroup should each be given an explicit limit."""
    if setting != "auto":
        return MemoryLimit(int(setting), "config", f"memory_limit {format_bytes(int(setting))} in the config")
    avail = machine_available() if available is None else available
    cg = cgroup_memory_limit(root, proc_cgroup)
    if cg is not None and cg[0] <= avail:
        return MemoryLimit(cg[0], "cgroup", f"auto: {cg[1]}: {format_bytes(cg[0])}")
    sharing = max(1, sharing)
    why = f"auto: the machine's available memory {format_bytes(avail)}"
    if cg is not None:
        why += f" (below {cg[1]}, {format_bytes(cg[0])})"
    if sharing > 1:
        why += f" / {sharing} nodes on this host"
    return MemoryLimit(avail // sharing, "machine", why)


def machine_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> tuple[int, str] | None:
    """The smallest memory limit over this process's cgroup and its ancestors, with the file it
    came from; None when none is set. v2: `memory.max` ("max" = none) in the unified hierarchy
    (mounted at `root`, or at `root/unified` beside v1 controllers); v1: `memory.limit_in_bytes`
    under `root/memory`. Inside a container the cgroup namespace makes its own cgroup the root of
    the mount, which is read too. memory.high (v2 throttling, not an OOM kill) is not a limit here."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    best: tuple[int, str] | None = None
    for top, rel, version in _memory_dirs(root, proc_cgroup):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        limit = _read_limit(top / rel / name)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, f"cgroup v{version} {name} of /{'' if rel == Path('.') else rel.as_posix()}")
    return best


def _memory_dirs(root: Path, proc_cgroup: str) -> list[tuple[Path, Path, int]]:
    """(hierarchy mount, cgroup path under it, cgroup version) of every cgroup that may hold this
    process's memory limit: for each line of /proc/self/cgroup naming the v2 hierarchy or the v1
    memory controller, its cgroup and every ancestor; the mounts' roots always."""
    tops: dict[int, list[Path]] = {2: [root, root / "unified"], 1: [root / "memory"]}
    dirs: list[tuple[Path, Path, int]] = [(t, Path("."), v) for v, ts in tops.items() for t in ts]
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else 0
        if not version:
            continue
        rel = Path(path.lstrip("/"))
        for top in tops[version]:
            for sub in [rel, *rel.parents]:
                if str(sub) not in ("", "."):
                    dirs.append((top, sub, version))
    return list(dict.fromkeys(dirs))


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < NO_LIMIT else None


# ---- what a share needs ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelWeights:
    """Where a model's weight bytes are, as its stages hold them (modeling/loader.py's
    `model_weights` reads them from the file's header): each layer's, and what a first or last
    stage holds beyond its layers."""

    layers: tuple[int, ...]  # bytes of each layer, in order
    first: int  # a first stage's extra: the token (and position) embedding
    last: int  # a last stage's extra: the final norm and the head (the embedding when tied)
    shared: int = 0  # counted in both first and last (a tied embedding): once when one stage is both

    def extra(self, is_first: bool, is_last: bool) -> int:
        return self.first * is_first + self.last * is_last - self.shared * (is_first and is_last)

    def stage(self, start: int, end: int) -> int:
        """Weight bytes of the stage of layers [start, end)."""
        return sum(self.layers[start:end]) + self.extra(start == 0, end == len(self.layers))


@dataclass(frozen=True)
class ShareNeed:
    """What a node holding layers [start, end) needs: its weights (from the file's header: the
    tensors as it holds them), its KV pool (allocated whole at start; pages are touched as requests
    use them, so a full pool must fit), and the runtime allowance."""

    weights: int
    kv: int
    kv_tokens: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.runtime

    def describe(self) -> str:
        return (
            f"weights {format_bytes(self.weights)} + KV {format_bytes(self.kv)} ({self.kv_tokens} tokens) "
            f"+ runtime {format_bytes(self.runtime)}"
        )


def kv_pool_bytes(tokens: int, n_local: int, kv_token_layer_bytes: int, block_size: int) -> int:
    """Bytes of a KV pool of `tokens` positions (rounded up to whole blocks) over `n_local` layers,
    k and v together (`kv_token_layer_bytes`: both, for one position of one layer)."""
    blocks = max(1, -(-tokens // block_size))
    return blocks * block_size * n_local * kv_token_layer_bytes


def auto_kv_tokens(
    limit: int,
    weights: int,
    runtime: int,
    n_local: int,
    kv_token_layer_bytes: int,
    block_size: int,
    minimum: int,
    maximum: int = KV_AUTO_MAX_TOKENS,
) -> int:
    """`cache_budget_tokens: auto`: KV_AUTO_SHARE of what is left under `limit` after the weights
    and the runtime, in whole blocks, at most `maximum` positions. Returns `minimum` (rounded up
    to a block) when less is left: the need then exceeds the limit and `check_share` refuses."""
    per_block = block_size * max(1, n_local) * kv_token_layer_bytes
    left = (limit - weights - runtime) * KV_AUTO_SHARE
    blocks = int(left // per_block) if left > 0 else 0
    floor = -(-minimum // block_size)
    return max(floor, min(blocks, maximum // block_size)) * block_size


def share_need(
    weights: int,
    n_local: int,
    kv_token_layer_bytes: int,
    block_size: int,
    cache_tokens: int | Literal["auto"],
    limit: int,
    min_tokens: int,
    runtime: int,
) -> ShareNeed:
    """The need of a share with `weights` bytes and `n_local` layers; `cache_tokens` is the
    config's `cache_budget_tokens` (a number, or `auto`: sized by `auto_kv_tokens` under `limit`)."""
    if cache_tokens == "auto":
        tokens = auto_kv_tokens(
            limit, weights, runtime, n_local, kv_token_layer_bytes, block_size, min_tokens
        )
    else:
        tokens = -(-int(cache_tokens) // block_size) * block_size
    return ShareNeed(
        weights, kv_pool_bytes(tokens, n_local, kv_token_layer_bytes, block_size), tokens, runtime
    )


def check_share(
    node_id: str, part: int, layers: Shard, need: ShareNeed, limit: MemoryLimit, auto_kv: bool
) -> None:
    """Refuse, before anything is mapped, a share whose need exceeds the node's limit: the error
    names the node, the part, the layers, the need against the limit and its breakdown."""
    if need.total <= limit.bytes:
        return
    to = format_bytes(need.total, up=True)
    if auto_kv:
        hint = (
            f"the KV pool is already at its minimum of {need.kv_tokens} tokens (coordinator.max_batch_tokens): "
            f"give the node fewer layers (more parts, or layers: auto) or raise its memory_limit to {to}"
        )
    else:
        hint = (
            "lower cache_budget_tokens (auto sizes the pool to what is left), give the node fewer layers, "
            f"or raise its memory_limit to {to}"
        )
    raise ConfigError(
        f"node {node_id}: part {part}, layers {layers} needs {format_bytes(need.total, up=True)}, "
        f"limit {format_bytes(limit.bytes)} ({limit.reason}): {need.describe()}; {hint}",
        node=node_id,
        part=part,
    )
