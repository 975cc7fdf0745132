"""Cost arithmetic in integer micro-units, shared by quota (holds, charges) and relays (lease
admissions, the cost a usage event carries), so both sides compute a request's cost with one function.

Prices are per million tokens of each kind (input, cached input, cache write, output, reasoning)
plus flat per-request and per-image amounts. A cost is computed exactly once, with integer
arithmetic, and rounded *up* to the next micro-unit: a fraction of a micro-unit is never given away,
and no float ever touches money::

    cost = ceil(((prompt - cached) * input + cached * cached_input + cache_write * cache_write_rate
                 + (completion - reasoning) * output + reasoning * reasoning_rate) / 1_000_000)
           + per_request + images * per_image

A kind without a price of its own (0) is billed at its parent's rate: cached input and cache writes at
the input price, reasoning at the output price. Cache writes are prompt tokens *outside*
``prompt_tokens`` (Anthropic reports them apart); reasoning tokens are *inside* ``completion_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidRequest

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MAX_CHOICES",
    "MAX_IMAGES",
    "MAX_PRICE_MICROS",
    "MAX_TOKENS",
    "MICROS_PER_MTOK",
    "Price",
    "Usage",
    "cost",
    "worst_case",
]

MICROS_PER_MTOK = 1_000_000
# Output tokens reserved when a price row gives no cap of its own.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
# Bounds that keep every cost far below 2**63 micro-units (the column type), so no input can overflow.
MAX_TOKENS = 10_000_000_000
MAX_IMAGES = 1_000_000
# Completions per request (OpenAI allows n up to 128; best_of up to 20).
MAX_CHOICES = 128
MAX_PRICE_MICROS = 1_000_000_000_000


# The fields of a price that are amounts of money (micro-units), every one bounded by MAX_PRICE_MICROS.
RATE_FIELDS: tuple[str, ...] = (
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "reasoning_per_mtok",
    "per_request",
    "per_image",
)


@dataclass(frozen=True, slots=True)
class Price:
    """One immutable version of a model's price; ``price_id`` is 0 until stored."""

    model: str
    input_per_mtok: int = 0
    output_per_mtok: int = 0
    # 0 means "no separate cached price": cached prompt tokens are billed at the input price.
    cached_input_per_mtok: int = 0
    per_request: int = 0
    per_image: int = 0
    default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    price_id: int = 0
    created_at: int = 0
    # 0 means "the input price" (cache writes) and "the output price" (reasoning tokens).
    cache_write_per_mtok: int = 0
    reasoning_per_mtok: int = 0

    @property
    def prompt_rate_ceiling(self) -> int:
        """The dearest rate any prompt token can be billed at (what a hold must assume)."""
        return max(self.input_per_mtok, self.cached_input_per_mtok, self.cache_write_per_mtok)

    @property
    def output_rate_ceiling(self) -> int:
        """The dearest rate any output token can be billed at."""
        return max(self.output_per_mtok, self.reasoning_per_mtok)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request. All zero is a valid usage (the request is billed ``per_request``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The part of ``prompt_tokens`` served from the provider's prompt cache.
    cached_prompt_tokens: int = 0
    images: int = 0
    # The provider reported nothing; the gateway billed its own estimate (never above the hold).
    estimated: bool = False
    # Prompt tokens written to the provider's cache, outside ``prompt_tokens``.
    cache_write_tokens: int = 0
    # The part of ``completion_tokens`` spent reasoning.
    reasoning_tokens: int = 0

    @classmethod
    def reported(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
        images: int,
        estimated: bool,
        *,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> Usage:
        """A provider's report with each count within the bounds :meth:`validate` accepts: an absurd
        report is capped at the admitted worst case anyway, and must not make the request unbillable."""
        prompt = min(max(prompt_tokens, 0), MAX_TOKENS)
        completion = min(max(completion_tokens, 0), MAX_TOKENS)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_prompt_tokens=min(max(cached_prompt_tokens, 0), prompt),
            images=min(max(images, 0), MAX_IMAGES),
            estimated=estimated,
            cache_write_tokens=min(max(cache_write_tokens, 0), MAX_TOKENS),
            reasoning_tokens=min(max(reasoning_tokens, 0), completion),
        )

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` for counts no provider can report."""
        _check_count("prompt_tokens", self.prompt_tokens, MAX_TOKENS)
        _check_count("completion_tokens", self.completion_tokens, MAX_TOKENS)
        _check_count("cached_prompt_tokens", self.cached_prompt_tokens, MAX_TOKENS)
        _check_count("images", self.images, MAX_IMAGES)
        _check_count("cache_write_tokens", self.cache_write_tokens, MAX_TOKENS)
        _check_count("reasoning_tokens", self.reasoning_tokens, MAX_TOKENS)
        if self.cached_prompt_tokens > self.prompt_tokens:
            raise InvalidRequest(
                f"cached_prompt_tokens ({self.cached_prompt_tokens}) cannot exceed "
                f"prompt_tokens ({self.prompt_tokens})",
                param="usage.cached_prompt_tokens",
            )
        if self.reasoning_tokens > self.completion_tokens:
            raise InvalidRequest(
                f"reasoning_tokens ({self.reasoning_tokens}) cannot exceed "
                f"completion_tokens ({self.completion_tokens})",
                param="usage.reasoning_tokens",
            )

    def as_json(self) -> dict[str, int | bool]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "images": self.images,
            "estimated": self.estimated,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


def _check_count(name: str, value: int, limit: int) -> None:
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative (got {value})", param=name)
    if value > limit:
        raise InvalidRequest(f"{name} must be at most {limit} (got {value})", param=name)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def cost(price: Price, usage: Usage) -> int:
    """What ``usage`` costs at ``price``, in micro-units, rounded up. Call ``usage.validate()`` first."""
    cached = usage.cached_prompt_tokens
    reasoning = usage.reasoning_tokens
    tokens = (
        (usage.prompt_tokens - cached) * price.input_per_mtok
        + cached * (price.cached_input_per_mtok or price.input_per_mtok)
        + usage.cache_write_tokens * (price.cache_write_per_mtok or price.input_per_mtok)
        + (usage.completion_tokens - reasoning) * price.output_per_mtok
        + reasoning * (price.reasoning_per_mtok or price.output_per_mtok)
    )
    return _ceil_div(tokens, MICROS_PER_MTOK) + price.per_request + usage.images * price.per_image


def worst_case(
    price: Price, *, prompt_tokens: int, max_output_tokens: int, images: int, choices: int = 1
) -> int:
    """The hold for a request: its prompt estimate plus its output cap (the model's default cap when
    0) for each of its ``choices`` (a provider bills every completion it generates, the prompt once).

    How the prompt splits into uncached, cached and cache-written tokens, and how much of the output
    is reasoning, is unknown before the call: each is priced at the dearest rate of its kind, so a
    cache write or a reasoning token priced above the plain rate never exceeds the hold.
    """
    output = (max_output_tokens or price.default_max_output_tokens) * max(1, choices)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=output, images=images)
    usage.validate()
    ceiling = Price(
        model=price.model,
        input_per_mtok=price.prompt_rate_ceiling,
        output_per_mtok=price.output_rate_ceiling,
        per_request=price.per_request,
        per_image=price.per_image,
    )
    return cost(ceiling, usage)
