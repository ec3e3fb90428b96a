"""Incremental detokenization: text for each new id, adding up exactly to the full decode.

Decoding ids one at a time and concatenating is wrong in two ways. A character may span several
byte tokens (SentencePiece byte fallback, tiktoken byte-level BPE), so one id alone decodes to
U+FFFD. And SentencePiece drops the leading space of the first piece only, so a piece decoded
alone loses a space it has mid-text. `StreamDecoder` uses nothing but `tokenizer.decode`:

- until some non-whitespace text is out, it decodes everything from the start (few ids);
- after that it decodes only the ids since the last clean point (the anchor), behind a sentinel
  id that decodes to a visible character, so the window's first piece is never "first";
- text ending in U+FFFD is held back (an incomplete character may finish with the next id)
  and the anchor stays put; `flush()` gives up waiting and emits it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamakit.tokenizer.base import Tokenizer

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turns token ids into text one id at a time; the pieces join to `tokenizer.decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, follows_text: bool = False):
        """follows_text: the ids continue earlier text (a prompt), so a leading space is kept, not dropped."""
        self.tokenizer = tokenizer
        self.follows_text = follows_text
        self._sentinel = tokenizer.encode("a")[-1]
        self._sentinel_text = tokenizer.decode([self._sentinel])
        if not self._sentinel_text or self._sentinel_text.isspace():
            raise ValueError(f"{tokenizer!r}: encode('a') ends in an id that decodes to "
                             f"{self._sentinel_text!r}, which cannot serve as a stream sentinel")
        self._reset()

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", e.g. half a character)."""
        self._pending.append(int(token_id))
        text = self._decode_pending()
        if text.endswith(REPLACEMENT):
            return ""  # maybe a character whose remaining bytes are still to come
        new = text[len(self._emitted):]
        if self._windowed:
            self._pending.clear()
        elif text and not text.isspace():
            # The first piece is behind us, so from now on a window decode is exact.
            self._windowed = True
            self._pending.clear()
            self._emitted = ""
        else:
            self._emitted = text
        return new

    def flush(self) -> str:
        """Return whatever is held back and start over, ready for a new sequence."""
        text = self._decode_pending() if self._pending else ""
        new = text[len(self._emitted):]
        self._reset()
        return new

    def _reset(self) -> None:
        self._pending: list[int] = []  # ids since the anchor (all ids until the first word)
        self._emitted = ""  # text already given out for _pending (only before the first word)
        self._windowed = self.follows_text

    def _decode_pending(self) -> str:
        """The text of the ids since the anchor, as it reads inside the whole sequence."""
        if not self._windowed:
            return self.tokenizer.decode(self._pending)
        text = self.tokenizer.decode([self._sentinel, *self._pending])
        if not text.startswith(self._sentinel_text):
            raise RuntimeError(f"{self.tokenizer!r}: decode([sentinel, ...]) = {text!r} does not start "
                               f"with the sentinel's own text {self._sentinel_text!r}")
        return text[len(self._sentinel_text):]
