"""Tokenizers: one interface over SentencePiece (Llama 1/2, tinyllamas) and tiktoken (Llama 3)."""

from llamakit.tokenizer.base import Tokenizer, check_vocab
from llamakit.tokenizer.load import TOKENIZER_FILES, load_tokenizer
from llamakit.tokenizer.spm import SentencePieceTokenizer
from llamakit.tokenizer.stream import StreamDecoder
from llamakit.tokenizer.tiktoken_bpe import TiktokenTokenizer

__all__ = ["TOKENIZER_FILES", "SentencePieceTokenizer", "StreamDecoder", "TiktokenTokenizer", "Tokenizer", "check_vocab",
           "load_tokenizer"]
