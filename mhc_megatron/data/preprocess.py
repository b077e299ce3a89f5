"""Text and JSONL files -> megatron-core's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

A ``.jsonl`` file holds one document per line, its text under ``json_key``; any other file is one
document of UTF-8 text. Every document ends with the tokenizer's end-of-document id. The pair is
written under temporary names and renamed at the end, so an interrupted run leaves no half-written
dataset behind. Command line: ``mhc-preprocess --input FILE... --output-prefix PREFIX``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from mhc_megatron.data.tokenizers import BYTE_LEVEL, build_tokenizer
from mhc_megatron.jsonl import read_jsonl


def _documents(path: Path, json_key: str) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise ValueError(f"{path}:{number} has no string field {json_key!r}")
        yield record[json_key]


def preprocess_files(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer=None,
    json_key: str = "text",
    show_progress: bool = True,
) -> Path:
    """Tokenize ``inputs`` (in the given order) into ``output_prefix.bin/.idx``; returns the prefix.

    ``tokenizer`` is a megatron-core tokenizer (default: byte-level). Raises ``ValueError`` for a
    missing input, an unreadable JSONL line, or inputs without any token.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("preprocess_files needs at least one input file, got none")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input file {str(path)!r} does not exist")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(BYTE_LEVEL)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    partial = prefix.with_name(prefix.name + f".partial-{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{partial}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    tokens_written = 0
    total_bytes = sum(path.stat().st_size for path in paths)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress) as bar:
        for path in paths:
            for text in _documents(path, json_key):
                ids = tokenizer.tokenize(text) + [tokenizer.eod]
                builder.add_document(numpy.asarray(ids), [len(ids)])
                tokens_written += len(ids)
            bar.update(path.stat().st_size)
    builder.finalize(f"{partial}.idx")
    if tokens_written == 0:
        raise ValueError(f"the inputs {[str(p) for p in paths]} hold no documents")
    for suffix in (".bin", ".idx"):
        os.replace(f"{partial}{suffix}", f"{prefix}{suffix}")
    return prefix


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mhc-preprocess", description="Tokenize text or JSONL files into a megatron indexed dataset."
    )
    parser.add_argument("--input", nargs="+", required=True, help="text files (one document each) or .jsonl files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default=BYTE_LEVEL, help="'byte-level' or a local HuggingFace tokenizer dir")
    parser.add_argument("--json-key", default="text", help="field of each JSONL record holding the text")
    args = parser.parse_args(argv)
    try:
        prefix = preprocess_files(args.input, args.output_prefix, build_tokenizer(args.tokenizer), args.json_key)
    except ValueError as error:
        parser.exit(2, f"mhc-preprocess: error: {error}\n")
    print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
