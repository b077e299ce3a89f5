"""megatron-core ``GPTDataset`` splits over an indexed dataset, after checking the dataset is whole.

``check_indexed_dataset`` turns a missing, truncated or unreadable ``.bin``/``.idx`` pair into a
``ValueError`` that names the file and what to do, before megatron's builder would fail deep inside.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

_HOW_TO_MAKE_ONE = "make one with mhc-preprocess, or leave data_path unset to train on the default corpus"


def check_indexed_dataset(prefix: str | Path, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` unless ``prefix.bin``/``prefix.idx`` form a whole, readable dataset.

    With ``vocab_size``, also check the stored token type can hold ids of that vocabulary.
    """
    prefix = str(prefix)
    for suffix in (".idx", ".bin"):
        if not os.path.isfile(prefix + suffix):
            raise ValueError(f"dataset {prefix!r}: {prefix + suffix} does not exist ({_HOW_TO_MAKE_ONE})")
    try:
        dataset = IndexedDataset(prefix, mmap=False)
    except Exception as error:  # a truncated or foreign index fails in many ways
        raise ValueError(f"dataset {prefix!r}: {prefix}.idx is not a readable megatron index ({error})") from error
    index = dataset.index
    if len(index) == 0:
        raise ValueError(f"dataset {prefix!r} holds no sequences")
    itemsize = index.dtype().itemsize
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ValueError(
            f"dataset {prefix!r}: {prefix}.bin has {actual} bytes, its index describes {expected} "
            "(the file is truncated or belongs to another index)"
        )
    if vocab_size is not None and vocab_size - 1 > _largest_id(index.dtype):
        raise ValueError(
            f"dataset {prefix!r} stores tokens as {index.dtype.__name__}, too small for vocab_size {vocab_size}"
        )


def _largest_id(dtype) -> int:
    import numpy

    return int(numpy.iinfo(dtype).max)


def build_gpt_datasets(
    prefix: str | Path,
    tokenizer,
    seq_length: int,
    seed: int,
    split: str,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
) -> tuple[GPTDataset, GPTDataset | None]:
    """Train and validation ``GPTDataset`` of ``train_samples`` / ``valid_samples`` sequences.

    ``split`` is megatron's ``"train,valid,test"`` weights over documents (e.g. ``"98,2,0"``).
    Sample order is fixed by ``seed``. Every rank of the job must call it (rank 0 builds the index
    caches in ``cache_dir`` first, the others then read them).
    """
    check_indexed_dataset(prefix, tokenizer.vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(prefix)], None),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    if train is None:
        raise ValueError(f"split {split!r} leaves no training documents in dataset {str(prefix)!r}")
    if valid_samples > 0 and valid is None:
        raise ValueError(
            f"split {split!r} leaves no validation documents in dataset {str(prefix)!r}, "
            "but evaluation is on (eval_interval > 0): give the validation split a weight"
        )
    return train, valid
