"""Tokenizers that never touch the network.

``build_tokenizer(name)`` accepts ``"byte-level"`` (megatron-core's byte tokenizer: the UTF-8 bytes
of the text are the ids, vocabulary 512, end-of-document id 0, padding id 1) or the path of a local
HuggingFace tokenizer directory (it needs ``transformers``; nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

BYTE_LEVEL = "byte-level"


def tokenizer_label(name: str) -> str:
    """A short file-name-safe label for ``name`` (used to key cached corpora)."""
    return BYTE_LEVEL if name == BYTE_LEVEL else Path(name).resolve().name


def build_tokenizer(name: str = BYTE_LEVEL):
    """megatron-core tokenizer for ``name``: ``"byte-level"`` or a local HuggingFace directory."""
    from megatron.core.tokenizers import MegatronTokenizer

    if name == BYTE_LEVEL:
        return MegatronTokenizer.from_pretrained(metadata_path={"library": BYTE_LEVEL})
    directory = Path(name)
    if not directory.is_dir():
        raise ValueError(
            f"tokenizer must be {BYTE_LEVEL!r} or the path of a local HuggingFace tokenizer directory, "
            f"got {name!r} (no such directory; tokenizers are never downloaded)"
        )
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"tokenizer {name!r} is a HuggingFace tokenizer, which needs the 'transformers' package: "
            "pip install transformers"
        ) from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=str(directory), metadata_path={"library": "huggingface"}
    )
