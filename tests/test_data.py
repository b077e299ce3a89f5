"""The data pipeline: preprocessing, dataset checks, the default corpus's sources, step batches."""

import json

import numpy
import pytest

from mhc_megatron.data import StepBatches, build_tokenizer, check_indexed_dataset, preprocess_files
from mhc_megatron.data.corpus import standard_library_sources
from megatron.core.datasets.indexed_dataset import IndexedDataset


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("byte-level")


def test_text_and_jsonl_become_one_document_each(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    prefix = preprocess_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", tokenizer,
                              show_progress=False)
    check_indexed_dataset(prefix, tokenizer.vocab_size)
    dataset = IndexedDataset(str(prefix))
    documents = [dataset[i].tolist() for i in range(len(dataset))]
    eod = tokenizer.eod
    assert documents == [[*"héllo".encode(), eod], [*b"ab", eod], [*b"c", eod]]
    assert not list(tmp_path.glob("*.partial-*")), "temporary files must be renamed or removed"


@pytest.mark.parametrize(
    "line, message", [("{not json", "b.jsonl:1 is not valid JSON"), ('{"body": "x"}', "b.jsonl:1 has no string field 'text'")]
)
def test_bad_jsonl_names_file_and_line(tokenizer, tmp_path, line, message):
    (tmp_path / "b.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        preprocess_files([tmp_path / "b.jsonl"], tmp_path / "out", tokenizer, show_progress=False)
    assert not (tmp_path / "out.bin").exists()


def test_missing_input_and_missing_dataset(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="input file .*absent.txt' does not exist"):
        preprocess_files([tmp_path / "absent.txt"], tmp_path / "out", tokenizer)
    with pytest.raises(ValueError, match=r"out.idx does not exist \(make one with mhc-preprocess"):
        check_indexed_dataset(tmp_path / "out")


# megatron's IndexedDataset.__del__ fails on the half-built object; the error we raise is the point.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_foreign_index_is_reported(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"not an index")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="x.idx is not a readable megatron index"):
        check_indexed_dataset(tmp_path / "x")


def test_the_default_corpus_is_the_standard_library_without_tests():
    sources = standard_library_sources()
    names = {path.name for path in sources}
    assert {"os.py", "argparse.py", "decoder.py"} <= names  # decoder.py: a package module (json)
    assert not any("test" in path.parts[:-1] or "site-packages" in path.parts for path in sources)
    assert sources == sorted(sources)


class _Numbers:
    """A map-style dataset whose sample ``i`` holds ``i`` in every position."""

    def __len__(self):
        return 100

    def __getitem__(self, index):
        row = numpy.full(4, index)
        return {"tokens": row, "labels": row + 1, "loss_mask": numpy.ones(4)}


def test_step_batches_split_the_global_batch_by_data_parallel_rank():
    ranks = [StepBatches(_Numbers(), global_batch_size=8, micro_batch_size=2, data_parallel_rank=r,
                         data_parallel_size=2) for r in range(2)]
    batches = [rank.global_batch(consumed_samples=16) for rank in ranks]
    samples = [[mb.tokens[:, 0].tolist() for mb in rank] for rank in batches]
    assert samples == [[[16, 17], [18, 19]], [[20, 21], [22, 23]]]
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple of micro_batch_size 2"):
        StepBatches(_Numbers(), global_batch_size=6, micro_batch_size=2, data_parallel_size=2)
