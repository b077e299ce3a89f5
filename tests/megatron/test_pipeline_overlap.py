"""Every pipeline schedule we ship or enable, under NCCL's ordering of the exchange, against the
blocking one.

Each case trains the same initial weights for 2 Adam steps with the blocking schedule (megatron's
1F1B or interleaved), the same with batched exchanges (``batch_p2p_comm``, the default on GPUs) and
the overlapped one (1F1B: ``schedules.forward_backward_pipelining_overlapped``, also with 2 extra
warm-up forwards; interleaved: megatron's own ``overlap_p2p_comm``; the exchange posted by the
communication thread, and at 1F1B PP = 2 also by the schedule's thread), for mHC (n = 4) and the
residual model, and requires on every rank bitwise equal losses, gradient norms, forward-only losses
and parameters after the steps. Every exchange follows NCCL's ordering (``pipeline/nccl_ordering.py``:
one queue per pair of ranks, a receive holding it until its data arrives, a send until its receive
has started), so an order that deadlocks on GPUs fails here, naming the ranks and operations.
"""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import run_workers

from mhc_megatron.megatron import MhcTransformerConfig
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer, _TimedRequest
from mhc_megatron.megatron.pipeline.schedules import check_overlapped_schedule_supported

NCCL_ORDERING = ["--nccl-ordering", "30"]  # seconds a wait may last before it counts as a deadlock
VARIANTS = ["--variants", "blocking", "blocking-batched", "overlapped"]
AHEAD = [*VARIANTS, "overlapped+ahead"]  # 1F1B: also 2 forwards ahead
LAYOUTS = {  # (processes, arguments of overlap_worker.py, micro-batches per step, the overlapped schedule)
    "1F1B PP=2": (2, ["--pp", "2", *AHEAD, "overlapped-unthreaded"], 4, "forward_backward_pipelining_overlapped"),
    "1F1B PP=4": (4, ["--pp", "4", *AHEAD], 8, "forward_backward_pipelining_overlapped"),
    "1F1B PP=4, fewer micro-batches than warm-up forwards": (
        4, ["--pp", "4", *AHEAD, "--micro-batches", "3", "--hc-modes", "mhc"], 3,
        "forward_backward_pipelining_overlapped"),
    "interleaved PP=2 x VPP=2": (2, ["--pp", "2", "--vpp", "2", "--variants", "blocking", "overlapped"], 4,
                                 "forward_backward_pipelining_with_interleaving"),  # batching swaps directions here
    "interleaved PP=4 x VPP=2": (4, ["--pp", "4", "--vpp", "2", *VARIANTS], 8,
                                 "forward_backward_pipelining_with_interleaving"),
}


SEQ, MICRO_BATCH, HIDDEN, STREAMS = 8, 2, 16, 4  # as in overlap_worker.py


def stream_state(dtype: str, streams: int) -> list:
    """The one kind of tensor a pipeline exchange may carry: the stream state [s, b*n, C] in ``dtype``."""
    return [[dtype, [SEQ, MICRO_BATCH * streams, HIDDEN]]]


def check_runs(tmp_path, nproc: int, micro_batches: int, schedule: str, dtype: str) -> None:
    """Every variant == blocking on every rank, bitwise; the exchange carries [s, b*n, C] in ``dtype``,
    in evaluation and in a training pass both ways (the stream state forward, its gradient backward)."""
    for rank in range(nproc):
        record = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        for hc_mode, streams in (("mhc", STREAMS), ("residual", 1)):
            if hc_mode not in record:
                continue
            variants = record[hc_mode]
            blocking = variants.pop("blocking")
            blocking.pop("schedule")
            for name, variant in variants.items():
                expected = schedule if name.startswith("overlapped") else blocking_schedule(schedule)
                assert variant.pop("schedule") == expected, f"rank {rank}, {hc_mode}, {name}"
                assert variant == blocking, f"rank {rank}, {hc_mode}, {name}"
            assert blocking["exchanged"] == stream_state(dtype, streams), f"rank {rank}, {hc_mode}"
            assert blocking["exchanged_in_training"] == {
                "forward": stream_state(dtype, streams), "backward": stream_state(dtype, streams)
            }, f"rank {rank}, {hc_mode}"
            if blocking["last_stage"]:
                assert len(blocking["losses"]) == 2 and all(loss > 0 for loss in blocking["losses"])
                assert len(blocking["eval_losses"]) == micro_batches


def blocking_schedule(overlapped: str) -> str:
    return ("forward_backward_pipelining_without_interleaving" if overlapped == "forward_backward_pipelining_overlapped"
            else overlapped)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_schedules_match_blocking_bitwise_under_nccl_ordering(layout, tmp_path):
    nproc, args, micro_batches, schedule = LAYOUTS[layout]
    run_workers("overlap_worker.py", nproc, *args, *NCCL_ORDERING, "--out", str(tmp_path / "run"))
    check_runs(tmp_path, nproc, micro_batches, schedule, "torch.float32")


def test_bf16_training_exchanges_bf16_streams(tmp_path):
    """The stream state crosses stages in the training dtype: half the bytes of float32."""
    nproc, args, micro_batches, schedule = LAYOUTS["1F1B PP=2"]
    run_workers("overlap_worker.py", nproc, *args, "--bf16", *NCCL_ORDERING, "--out", str(tmp_path / "run"))
    check_runs(tmp_path, nproc, micro_batches, schedule, "torch.bfloat16")


def test_bf16_transfer_of_a_float32_run(tmp_path):
    """``pipeline_bf16_transfer``: in a training pass the stream state crosses stages in bf16 and so
    does its gradient on the way back (blocking and overlapped alike, bitwise equal), and the float32
    run's losses move by the rounding only (close to the float32 transfer, not equal)."""
    run_workers("overlap_worker.py", 2, "--pp", "2", "--variants", "blocking", "bf16-transfer",
                "bf16-transfer+overlapped", *NCCL_ORDERING, "--out", str(tmp_path / "run"))
    for rank in range(2):
        record = json.loads((tmp_path / f"run.rank{rank}.json").read_text())
        for hc_mode, streams in (("mhc", STREAMS), ("residual", 1)):
            exact, rounded = record[hc_mode]["blocking"], record[hc_mode]["bf16-transfer"]
            overlapped = record[hc_mode]["bf16-transfer+overlapped"]
            for kind, dtype in ((exact, "torch.float32"), (rounded, "torch.bfloat16"), (overlapped, "torch.bfloat16")):
                assert kind["exchanged_in_training"] == {
                    "forward": stream_state(dtype, streams), "backward": stream_state(dtype, streams)
                }, f"rank {rank}, {hc_mode}"
                assert kind["exchanged"] == stream_state(dtype, streams)
            assert overlapped.pop("schedule") == "forward_backward_pipelining_overlapped"
            assert rounded.pop("schedule") == "forward_backward_pipelining_without_interleaving"
            assert overlapped == rounded, f"rank {rank}, {hc_mode}"
            assert rounded["parameters"] != exact["parameters"], f"rank {rank}, {hc_mode}: nothing was rounded"
            assert rounded["grad_norms"] == pytest.approx(exact["grad_norms"], rel=2e-2)
            if exact["last_stage"]:
                assert rounded["losses"] == pytest.approx(exact["losses"], rel=2e-3)
                assert rounded["eval_losses"] == pytest.approx(exact["eval_losses"], rel=2e-3)


@pytest.mark.parametrize("fields, words", [
    (dict(bf16=True, pipeline_dtype=torch.bfloat16), "this run trains in bf16"),
    (dict(pipeline_dtype=torch.float32), "pipeline_dtype must be torch.bfloat16, got torch.float32"),
])
def test_bf16_transfer_needs_a_float32_run_and_bf16_buffers(fields, words):
    with pytest.raises(ValueError, match=words):
        MhcTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, pipeline_model_parallel_size=2,
                             pipeline_bf16_transfer=True, **fields)


def test_bf16_needs_a_bf16_pipeline_dtype():
    with pytest.raises(ValueError, match="pipeline_dtype must be torch.bfloat16"):
        MhcTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, bf16=True,
                             pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)


@pytest.mark.parametrize("fields", [dict(), dict(overlap_p2p_comm=True, virtual_pipeline_model_parallel_size=2)])
def test_extra_warmup_needs_the_overlapped_1f1b(fields):
    with pytest.raises(ValueError, match="pipeline_extra_warmup=1 applies to the overlapped 1F1B schedule only"):
        MhcTransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, pipeline_model_parallel_size=2,
                             pipeline_dtype=torch.float32, pipeline_extra_warmup=1, **fields)


def test_warmup_flush_overlap_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="overlap_p2p_comm_warmup_flush=True is not supported"):
        MhcTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, overlap_p2p_comm=True,
                             overlap_p2p_comm_warmup_flush=True)


def test_overlap_needs_unbatched_exchange(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the check runs before anything touches CUDA
    with pytest.raises(ValueError, match="overlap_p2p_comm=True needs batch_p2p_comm=False"):
        MhcTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, overlap_p2p_comm=True)


def test_high_priority_stream_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="mhc_post_res_high_priority_stream=True needs CUDA"):
        MhcTransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                             mhc_post_res_high_priority_stream=True)


@pytest.mark.parametrize("field", ["batch_p2p_comm", "variable_seq_lengths", "use_ring_exchange_p2p"])
def test_overlapped_1f1b_refuses_what_it_cannot_overlap(field):
    config = SimpleNamespace(**{field: True})
    with pytest.raises(ValueError, match=f"does not support {field}=True"):
        check_overlapped_schedule_supported(config)


def test_timer_adds_calls_and_waits():
    class Request:
        def wait(self):
            time.sleep(0.01)
            return True

        def is_completed(self):
            return True

    timer = P2PTimer()
    request = _TimedRequest(Request(), timer, ())
    assert request.wait() and request.is_completed()
    timer.add(0.5, wait=False)
    assert timer.waits == 1 and timer.calls == 1 and 0.51 <= timer.seconds < 0.6
    timer.reset()
    assert (timer.seconds, timer.calls, timer.waits) == (0.0, 0, 0)
