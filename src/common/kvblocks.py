"""KV block size and the chained block hash, shared by the nodes' caches and the coordinator's
router (no torch here: the coordinator must not need it).

A full block of `BLOCK_SIZE` token positions is identified by the hash of its tokens chained with
the previous block's hash (vLLM's scheme), so equal hashes mean equal whole prefixes.
"""

from __future__ import annotations

import hashlib

BLOCK_SIZE = 16  # token positions per KV block (vLLM's default): bounds the slack per sequence


def block_hash(prev: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: its tokens chained with the previous block's hash (128-bit)."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


def partial_hashes(prev: bytes, tokens: list[int]) -> list[bytes]:
    """The keys of a block's leading 1..len(tokens) tokens after `prev`: entry c-1 equals
    block_hash(prev, tokens[:c]) (one running hash, copied at each length)."""
    h = hashlib.blake2b(prev, digest_size=16)
    out = []
    for t in tokens:
        h.update(t.to_bytes(4, "little", signed=True))
        out.append(h.copy().digest())
    return out


def prefix_hashes(tokens: list[int], bs: int = BLOCK_SIZE) -> list[bytes]:
    """The chained hashes of the full blocks a prefill of `tokens` may take from a cache (the
    last token is always computed, so a block ending at it is not counted)."""
    out: list[bytes] = []
    for j in range((len(tokens) - 1) // bs):
        out.append(block_hash(out[-1] if out else b"", tokens[j * bs : (j + 1) * bs]))
    return out
