"""Tokenizers: one interface over SentencePiece (Llama 1/2, tinyllamas) and tiktoken (Llama 3)."""

from llamakit.tokenizer.base import Tokenizer, check_vocab
from llamakit.tokenizer.chat import ChatFormatError, encode_dialog, stop_ids_for
from llamakit.tokenizer.load import TOKENIZER_FILES, load_tokenizer
from llamakit.tokenizer.spm import SentencePieceTokenizer
from llamakit.tokenizer.stream import StreamDecoder
from llamakit.tokenizer.tiktoken_bpe import TiktokenTokenizer
from llamakit.tokenizer.train import train_tokenizer

__all__ = ["TOKENIZER_FILES", "ChatFormatError", "SentencePieceTokenizer", "StreamDecoder", "TiktokenTokenizer",
           "Tokenizer", "check_vocab", "encode_dialog", "load_tokenizer", "stop_ids_for", "train_tokenizer"]
