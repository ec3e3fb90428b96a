"""Pretraining data: read, clean, deduplicate, tokenise and pack text into token shards."""

from llamakit.data.clean import FilterConfig, LanguageFilter, normalize_text, quality_issue, remove_boilerplate
from llamakit.data.dedup import DedupConfig, remove_exact_duplicates, remove_near_duplicates, shingles
from llamakit.data.prepare import PrepareConfig, prepare
from llamakit.data.shards import ShardWriter, TokenShards, read_meta
from llamakit.data.sources import read_documents, resolve_inputs

__all__ = ["DedupConfig", "FilterConfig", "LanguageFilter", "PrepareConfig", "ShardWriter", "TokenShards",
           "normalize_text", "prepare", "quality_issue", "read_documents", "read_meta", "remove_boilerplate",
           "remove_exact_duplicates", "remove_near_duplicates", "resolve_inputs", "shingles"]
