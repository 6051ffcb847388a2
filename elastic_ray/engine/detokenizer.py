"""A running sequence's text, decoded one token at a time."""

from tokenizers.decoders import DecodeStream


class IncrementalText:
    """The text of a sequence's tokens so far, at a per-token cost independent of its length.

    It uses the tokenizer's streaming decoder (held-back bytes of an unfinished character come
    with a later token). A tokenizer without one, or one that cleans up spaces after decoding (so
    that a prefix's text need not be a prefix of the whole text), is decoded in full every token.
    The final text is always the full decode (`outputs.finish`); this one serves streaming and
    finding stop strings.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "_tokenizer", None)
        streams = self.backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.stream = DecodeStream(skip_special_tokens=True) if streams else None
        self.tokens: list[int] = []
        self.text = ""
        self.new = 0  # characters the last token added

    def add(self, token: int) -> str:
        """Append a token; returns the text so far."""
        self.tokens.append(token)
        if self.stream is not None:
            chunk = self.stream.step(self.backend, token) or ""
            self.text, self.new = self.text + chunk, len(chunk)
        else:  # a full decode may change earlier text: look at all of it
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self.new = len(self.text)
        return self.text

    def completed(self, stop: tuple[str, ...]) -> bool:
        """Whether the last token completed one of the stop strings (looks at the new text only)."""
        if not stop:
            return False
        tail = self.text[max(0, len(self.text) - self.new - max(map(len, stop)) + 1):]
        return any(s in tail for s in stop)
