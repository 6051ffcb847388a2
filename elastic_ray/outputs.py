"""What a finished (or streaming) request returns, and where its text ends."""

from dataclasses import dataclass, field

from elastic_ray.config import SamplingParams


@dataclass
class RequestOutput:
    """One request's result. `token_ids` are the generated ids (EOS included when it ended the text)."""

    request_id: int | str
    text: str | None
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or a stop string), "length", "error"; None while running
    stats: dict = field(default_factory=dict)
    error: str | None = None  # why the request could not run (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a text: the generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def finish(tokenizer, generated: list[int], sampling: SamplingParams, eos: set[int]) -> tuple[list[int], str, str | None]:
    """(token_ids, text, finish_reason) for tokens generated so far; reason None means not finished.

    Tokens end after the first EOS; with a stop string they end at the token that completed it,
    and the text ends just before the stop string. Text is stripped, so a running request's text
    is always a prefix of its final text (what streaming relies on).
    """
    end = next((i + 1 for i, t in enumerate(generated) if t in eos), None)
    token_ids = generated[:end] if end is not None else list(generated)
    reason = "stop" if end is not None else ("length" if len(generated) >= sampling.max_tokens else None)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if sampling.stop and any(s in text for s in sampling.stop):
        end = next(k for k in range(1, len(token_ids) + 1) if _has_stop(tokenizer, token_ids[:k], sampling.stop))
        token_ids, reason = token_ids[:end], "stop"
        text = text[: min(text.index(s) for s in sampling.stop if s in text)]
    return token_ids, text.strip(), reason


def _has_stop(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> bool:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return any(s in text for s in stop)
