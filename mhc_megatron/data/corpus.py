"""The default corpus: the Python standard library's own source files, present on every machine.

Built once per tokenizer under ``data_dir`` (``data_dir/python-stdlib-<tokenizer>.bin/.idx``, about
13 MB of code, one document per file, files in sorted order, test suites left out) and reused after.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from mhc_megatron.data.preprocess import preprocess_files
from mhc_megatron.data.tokenizers import BYTE_LEVEL, build_tokenizer, tokenizer_label

_SKIPPED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def standard_library_sources() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library, without test suites, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_DIRECTORIES.intersection(path.relative_to(root).parts[:-1])
    )


def default_corpus_prefix(data_dir: str | Path, tokenizer_name: str = BYTE_LEVEL) -> Path:
    return Path(data_dir) / f"python-stdlib-{tokenizer_label(tokenizer_name)}"


def ensure_default_corpus(data_dir: str | Path, tokenizer_name: str = BYTE_LEVEL, show_progress: bool = True) -> Path:
    """The default corpus's prefix under ``data_dir``, built first if it is not there yet.

    Call it on one process (the others wait): building is not safe to run twice at once.
    """
    prefix = default_corpus_prefix(data_dir, tokenizer_name)
    if Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():
        return prefix
    sources = standard_library_sources()
    print(f"data: building the default corpus from {len(sources)} standard-library files into {prefix}.bin/.idx")
    return preprocess_files(sources, prefix, build_tokenizer(tokenizer_name), show_progress=show_progress)
