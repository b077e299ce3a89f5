"""Training data: tokenizers that work offline, the indexed-dataset writer, the default corpus and
megatron-core's ``GPTDataset`` cut into the micro-batches of each training step.

- ``tokenizers``: ``build_tokenizer("byte-level")`` or a local HuggingFace tokenizer directory.
- ``preprocess``: text / JSONL files -> megatron's ``.bin``/``.idx`` pair (``mhc-preprocess``).
- ``corpus``: the default corpus, built once from the Python standard library's source files.
- ``datasets``: checks of an indexed dataset and the train / validation ``GPTDataset`` split.
- ``batches``: the deterministic sample order that makes a resumed run see the same batches.
"""

from mhc_megatron.data.batches import StepBatches
from mhc_megatron.data.corpus import ensure_default_corpus
from mhc_megatron.data.datasets import build_gpt_datasets, check_indexed_dataset
from mhc_megatron.data.preprocess import preprocess_files
from mhc_megatron.data.tokenizers import build_tokenizer

__all__ = [
    "StepBatches",
    "build_gpt_datasets",
    "build_tokenizer",
    "check_indexed_dataset",
    "ensure_default_corpus",
    "preprocess_files",
]
