"""How one request picks its next token: the parameters and their checks (torch-free, so the
coordinator and the API can use them without importing the engine; `modeling.sampling` applies them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeserve.common.errors import InvalidInputError

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per token (the OpenAI API's limit)."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0 (greedy): dividing by them would overflow float32."""

MAX_ABS_OPENAI_PENALTY = 2.0
"""presence_penalty and frequency_penalty lie in [-2, 2], as in the OpenAI API."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. Checked once at admission with `validate()`."""

    temperature: float = 1.0
    """Divides the logits; 0 (or anything below GREEDY_TEMPERATURE) means greedy argmax."""
    top_k: int = 0
    """Keep only the k largest logits (ties with the k-th are kept too); 0 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p (ties kept); 1 is off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; 0 is off."""
    repetition_penalty: float = 1.0
    """HF/CTRL style, over the whole history (prompt included): a seen token's positive logit is
    divided by it, a negative one multiplied. 1 is off."""
    presence_penalty: float = 0.0
    """OpenAI style, subtracted once from the logit of every token in the history. Unlike OpenAI
    we count the prompt too, so one history list drives all three penalties."""
    frequency_penalty: float = 0.0
    """OpenAI style, subtracted `count` times from a token seen `count` times in the history."""
    seed: int | None = None
    """Makes the draws reproducible: each step's noise depends only on (seed, position)."""
    logprobs: bool = False
    """Return the chosen token's logprob (see SampleResult.logprobs for which distribution)."""
    top_logprobs: int = 0
    """Also return this many most likely alternatives per token, 0..MAX_TOP_LOGPROBS."""

    def validate(self) -> None:
        """Raise InvalidInputError naming the first field outside its allowed range."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidInputError(
                f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)"
            )
        if self.top_k < 0:
            raise InvalidInputError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not (0 < self.top_p <= 1):
            raise InvalidInputError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not (0 <= self.min_p <= 1):
            raise InvalidInputError(f"min_p={self.min_p} must be in [0, 1] (0 = off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidInputError(
                f"repetition_penalty={self.repetition_penalty} must be a finite number > 0 (1 = off)"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-MAX_ABS_OPENAI_PENALTY <= value <= MAX_ABS_OPENAI_PENALTY):
                raise InvalidInputError(
                    f"{name}={value} must be in [{-MAX_ABS_OPENAI_PENALTY}, {MAX_ABS_OPENAI_PENALTY}] (0 = off)"
                )
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidInputError(f"top_logprobs={self.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        """top_logprobs > 0 implies the chosen token's logprob too."""
        return self.logprobs or self.top_logprobs > 0
