"""Which pipeline communicator a schedule gets (``exchange_thread.pipeline_communicator``), and what the
threaded one refuses. That its exchanges give bitwise the results of the blocking schedule is
tested in ``test_pipeline_overlap.py``."""

import pytest
import torch

from mhc_megatron.megatron import MhcTransformerConfig
from mhc_megatron.megatron.pipeline.exchange_thread import (
    ThreadedP2PCommunicator,
    TimedThreadedP2PCommunicator,
    pipeline_communicator,
)
from mhc_megatron.megatron.pipeline.exchange_timing import P2PTimer, TimedP2PCommunicator


@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group (the communicator reads its ranks and backend)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield torch.distributed.group.WORLD
    torch.distributed.destroy_process_group()


BASE = dict(num_layers=2, hidden_size=16, num_attention_heads=2, pipeline_dtype=torch.float32)


@pytest.mark.parametrize("overlap, thread, timed, expected", [
    (False, True, False, type(None)),
    (True, True, False, ThreadedP2PCommunicator),
    (True, False, False, type(None)),
    (False, True, True, TimedP2PCommunicator),
    (True, True, True, TimedThreadedP2PCommunicator),
    (True, False, True, TimedP2PCommunicator),
])
def test_the_overlapped_gloo_exchange_is_posted_by_the_thread(gloo_group, overlap, thread, timed, expected):
    config = MhcTransformerConfig(**BASE, overlap_p2p_comm=overlap, pipeline_exchange_thread=thread)
    communicator = pipeline_communicator(gloo_group, config, P2PTimer() if timed else None)
    assert type(communicator) is expected


@pytest.mark.parametrize("field", ["batch_p2p_comm", "variable_seq_lengths", "use_ring_exchange_p2p"])
def test_threaded_exchange_refuses_what_it_does_not_post(gloo_group, field):
    config = MhcTransformerConfig(**BASE)
    setattr(config, field, True)  # set after validation: megatron's own checks refuse some on CPU
    with pytest.raises(ValueError, match=f"does not support {field}=True"):
        ThreadedP2PCommunicator(gloo_group, config)
