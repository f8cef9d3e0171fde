"""Turning a request's decoded text into what its stream gets: when it ends (stop id, length,
stop string) and how much text may go out now (the tail that could still become a stop string is
held back until it cannot). Pure functions over a Request's fields; no I/O."""

from __future__ import annotations

from pipeserve.coordinator.requests import Request


def stop_reason(req: Request, upto: int) -> str | None:
    """Why the request ends with its token at upto-1 (EOS/stop id or length), if it does."""
    n_gen = upto - len(req.prompt_ids)
    if n_gen > 0 and req.tokens[upto - 1] in req.stop_ids:
        return "stop"
    if n_gen >= req.max_tokens:
        return "length"
    return None


def find_stop(req: Request) -> int | None:
    """Offset in req.text of the earliest stop string, looking only where a new one can start."""
    if not req.stop:
        return None
    longest = max(map(len, req.stop))
    window_start = max(0, req.emitted - longest)
    hits = [i for s in req.stop if (i := req.text.find(s, window_start)) >= 0]
    return min(hits) if hits else None


def holdback(req: Request) -> int:
    """Length of the text's tail that could still become a stop string."""
    best = 0
    for s in req.stop:
        for k in range(min(len(s) - 1, len(req.text)), best, -1):
            if req.text.endswith(s[:k]):
                best = k
                break
    return best


def take_text(req: Request, new_text: str, upto: int) -> tuple[str, str | None]:
    """Append the text decoded for the tokens up to `upto`; return the piece to stream now and the
    finish reason if the request ends here ("stop" for a stop string wins over length)."""
    req.text += new_text
    reason = stop_reason(req, upto)
    cut = find_stop(req)
    if cut is not None:
        reason, end = "stop", cut
    elif reason is not None:
        end = len(req.text)
    else:
        end = len(req.text) - holdback(req)
    piece = req.text[req.emitted : max(req.emitted, end)]
    req.emitted = max(req.emitted, end)
    return piece, reason


def final_tail(req: Request, reason: str) -> str:
    """Held-back text that goes out with the final event (none after a cancel; never past a stop)."""
    if reason == "cancelled" or req.emitted >= len(req.text):
        return ""
    cut = find_stop(req)
    return req.text[req.emitted : cut if cut is not None else len(req.text)]
