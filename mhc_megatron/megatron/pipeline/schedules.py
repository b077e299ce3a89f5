"""1F1B pipeline schedule with the stage-to-stage exchange overlapped with computation.

megatron-core 0.19 overlaps its pipeline exchange only in the interleaved schedule
(``overlap_p2p_comm``); its non-interleaved 1F1B refuses the option. With n residual streams every
exchange carries n times the bytes of a residual model (mHC paper, section 4.3), so the 1F1B
schedule needs it too. ``forward_backward_pipelining_overlapped`` is that schedule, built from
megatron's own pieces (``forward_step``, ``backward_step``, ``P2PCommunicator`` with its
non-blocking calls) and called like ``forward_backward_pipelining_without_interleaving``.

The order of computation is that of megatron's 1F1B (warm-up forwards, one forward and one backward
per micro-batch in the steady phase, cool-down backwards), so losses and gradients are bitwise the
same. The communication moves:

* the receive of the next micro-batch's input is posted as soon as the current one has arrived, so
  it travels while this stage computes; each receive is waited for right before its data is used;
* the receive of a gradient is posted where the next stage's order puts its send: that stage posts
  its input receives early and sends gradient k after its backward k, so between its receives of
  activations ``w + k + 1`` and ``w + k + 2`` (``w``: its warm-up forwards), and this stage posts
  the receive of gradient k right after sending activation ``w + k + 1`` (all that remain after the
  last send). Under NCCL all operations between two ranks run in issue order on one stream, a
  receive holding it until its data arrives, so the two ranks must issue the same interleaving of
  activations and gradients on their link; posting a gradient receive earlier (before the warm-up
  sends, as this schedule once did) deadlocks on the first step. ``nccl_ordering.py`` emulates that
  ordering on gloo, and the tests run every schedule through it;
* sends return at once; a send is waited for before the next send in the same direction (at most
  one in flight each way, which also bounds the buffers held), before its output is deallocated
  (``deallocate_pipeline_outputs``) and, for all of them, before the gradients are finalised.

In 1F1B a stage has nothing else to compute while the gradient it needs next is on its way, so that
transfer stays exposed. ``pipeline_extra_warmup = k`` (``MhcTransformerConfig``) gives it work: every
stage but the last runs k more warm-up forwards, so each gradient arrives while the stage computes a
forward that plain 1F1B would run later, at the cost of k more micro-batches of activations held.
The forwards keep their order and so do the backwards (each micro-batch's arithmetic is unchanged,
and the gradients accumulate in the same order), so the results stay bitwise the same.

Each direction between two stages carries one kind of message (activations forward, gradients
backward), posted and matched in micro-batch order.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import (
    backward_step,
    check_first_val_step,
    clear_embedding_activation_buffer,
    deallocate_output_tensor,
    finish_embedding_wgrad_compute,
    forward_step,
    get_tensor_shapes,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config

from mhc_megatron.megatron.parallel import local_device



def default_pg_collection() -> ProcessGroupCollection:
    """The process groups of ``parallel_state`` that megatron's schedules use when given none."""
    return ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "cp", "embd", "pos_embd", "pp", "dp_cp", "tp_dp_cp", "dp"]
    )


def _wait(handles: dict) -> None:
    for handle in handles.values():
        handle.wait()


class _Exchange:
    """One stage's non-blocking exchange: at most one input receive and one send in flight per
    direction; gradient receives as many as the schedule posts ahead."""

    def __init__(self, communicator: P2PCommunicator, shape, deallocate_outputs: bool) -> None:
        self.communicator, self.shape, self.deallocate_outputs = communicator, shape, deallocate_outputs
        self.first, self.last = communicator.is_pp_first_stage, communicator.is_pp_last_stage
        self._input = None  # (buffer, handles) of the posted input receive
        self._grads = collections.deque()  # (buffer, handles) of the posted gradient receives, oldest first
        self._output_send = self._grad_send = None  # (handles, tensor) of the sends in flight

    def post_input_receive(self) -> None:
        if not self.first:
            self._input = self.communicator.send_forward_recv_forward(
                None, recv_prev=True, tensor_shape=self.shape, overlap_p2p_comm=True
            )

    def post_grad_receive(self) -> None:
        if not self.last:
            self._grads.append(self.communicator.send_backward_recv_backward(
                None, recv_next=True, tensor_shape=self.shape, overlap_p2p_comm=True
            ))

    def input(self) -> torch.Tensor | None:
        """The input posted last, once it has arrived (``None`` on the first stage)."""
        if self.first:
            return None
        (buffer, handles), self._input = self._input, None
        _wait(handles)
        return buffer

    def grad(self) -> torch.Tensor | None:
        """The oldest posted output gradient, once it has arrived (``None`` on the last stage)."""
        if self.last:
            return None
        buffer, handles = self._grads.popleft()
        _wait(handles)
        return buffer

    def send_output(self, output: torch.Tensor) -> None:
        if self.last:
            return
        self.finish_output_send()
        _, handles = self.communicator.send_forward_recv_forward(
            output, recv_prev=False, tensor_shape=None, overlap_p2p_comm=True
        )
        self._output_send = (handles, output)

    def send_grad(self, grad: torch.Tensor) -> None:
        if self.first:
            return
        self.finish_grad_send()
        _, handles = self.communicator.send_backward_recv_backward(
            grad, recv_next=False, tensor_shape=None, overlap_p2p_comm=True
        )
        self._grad_send = (handles, grad)

    def finish_output_send(self, output: torch.Tensor | None = None) -> None:
        """Wait for the output send in flight (only if it sends ``output``, when given), then
        deallocate that output as megatron's schedule does after a send."""
        if self._output_send is None or (output is not None and self._output_send[1] is not output):
            return
        (handles, sent), self._output_send = self._output_send, None
        _wait(handles)
        deallocate_output_tensor(sent, self.deallocate_outputs)

    def finish_grad_send(self) -> None:
        if self._grad_send is not None:
            (handles, _), self._grad_send = self._grad_send, None
            _wait(handles)

    def finish(self) -> None:
        self.finish_output_send()
        self.finish_grad_send()
        assert self._input is None and not self._grads, "a posted receive was never waited for"


def check_overlapped_schedule_supported(config) -> None:
    """Raise for the options of megatron's 1F1B that the overlapped schedule does not carry."""
    unsupported = {
        "batch_p2p_comm": "batched exchanges are waited for inside the call; set batch_p2p_comm=False",
        "variable_seq_lengths": "the shape exchange before every receive would block",
        "mtp_standalone": "the shape exchange before every receive would block",
        "use_ring_exchange_p2p": "ring exchange returns no handles to wait on later",
        "moe_paged_stash": "not carried by this schedule",
        "fine_grained_activation_offloading": "not carried by this schedule",
    }
    for field, why in unsupported.items():
        if getattr(config, field, False):
            raise ValueError(
                f"the overlapped 1F1B schedule (overlap_p2p_comm=True) does not support {field}=True: {why}"
            )
    if getattr(config, "cuda_graph_impl", None) == "local":
        raise ValueError("the overlapped 1F1B schedule does not support cuda_graph_impl='local'")


def forward_backward_pipelining_overlapped(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    adjust_tensor_shapes_fn=None,
    p2p_communicator: P2PCommunicator | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    force_all_reduce: bool | None = False,
):
    """megatron's non-interleaved 1F1B with the exchange overlapped (see the module docstring).
    Same arguments and result as ``forward_backward_pipelining_without_interleaving``."""
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError("the non-interleaved schedule runs one model chunk; use the interleaved one for more")
        model = model[0]
    if isinstance(data_iterator, list):
        if len(data_iterator) != 1:
            raise ValueError("the non-interleaved schedule takes one data iterator")
        data_iterator = data_iterator[0]
    config = get_model_config(model)
    check_overlapped_schedule_supported(config)
    if (p2p_communicator is None) != (pg_collection is None):
        raise ValueError("give both p2p_communicator and pg_collection, or neither")
    if p2p_communicator is None:
        p2p_communicator = P2PCommunicator(pp_group=parallel_state.get_pipeline_model_parallel_group(), config=config)
        pg_collection = default_pg_collection()
    multimodule = type(p2p_communicator).__name__.startswith("MultiModule")
    if multimodule or not isinstance(pg_collection, ProcessGroupCollection):
        raise ValueError("the overlapped 1F1B schedule supports single-module pipelines only")
    tp_group, cp_group = pg_collection.tp, pg_collection.cp

    shapes = dict(seq_length=seq_length, micro_batch_size=micro_batch_size, decoder_seq_length=decoder_seq_length,
                  config=config, tp_group=tp_group, cp_group=cp_group)
    recv_shapes, send_shapes = get_tensor_shapes(**shapes), get_tensor_shapes(**shapes)
    if adjust_tensor_shapes_fn is not None:
        recv_shapes, send_shapes = adjust_tensor_shapes_fn(recv_shapes, send_shapes)
    if len(recv_shapes) != 1 or list(recv_shapes) != list(send_shapes):
        raise ValueError(f"the overlapped 1F1B schedule exchanges one tensor shape, got {recv_shapes} / {send_shapes}")
    exchange = _Exchange(p2p_communicator, recv_shapes[0], config.deallocate_pipeline_outputs)
    first, last = p2p_communicator.is_pp_first_stage, p2p_communicator.is_pp_last_stage

    if config.finalize_model_grads_func is not None and not forward_only:
        embedding_module = clear_embedding_activation_buffer(config, model, last)
    if config.timers is not None:
        config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)

    no_sync_func = config.no_sync_func or contextlib.nullcontext
    no_sync_context = no_sync_func()
    no_sync_context.__enter__()

    def enable_grad_sync() -> None:
        nonlocal no_sync_context
        if no_sync_context is not None:
            no_sync_context.__exit__(None, None, None)
            no_sync_context = None

    def warmup_forwards(stage: int) -> int:
        """1F1B's warm-up forwards of ``stage``, with the extra ones of every stage but the last."""
        ahead = 0 if stage == p2p_communicator.total_stages - 1 else getattr(config, "pipeline_extra_warmup", 0)
        return min(p2p_communicator.total_stages - stage - 1 + ahead, num_microbatches)

    stage = p2p_communicator.current_stage
    warmup = warmup_forwards(stage)
    next_warmup = None if last else warmup_forwards(stage + 1)
    steady = num_microbatches - warmup
    outstanding = None
    if config.num_microbatches_with_partial_activation_checkpoints is not None:
        outstanding = min(p2p_communicator.total_stages - stage - 1, num_microbatches) + 1
    total_num_tokens = torch.zeros([], dtype=torch.int, device=local_device())
    forward_data_store, input_tensors, output_tensors = [], [], []
    posted = {"input": 0, "grad": 0}

    def post_next_input() -> None:
        """Post the receive of the next input, if one is still to come."""
        if posted["input"] < num_microbatches:
            exchange.post_input_receive()
            posted["input"] += 1

    def post_due_grads(sent: int) -> None:
        """With activations 0 .. sent - 1 sent, post the gradient receives the next stage orders
        before activation ``sent`` (module docstring): gradient k once ``next_warmup + k + 1`` is."""
        due = num_microbatches if sent == num_microbatches else sent - next_warmup - 1
        while posted["grad"] < due:
            exchange.post_grad_receive()
            posted["grad"] += 1

    def forward(index: int):
        nonlocal total_num_tokens
        input_tensor = exchange.input()
        post_next_input()
        checkpoint = None
        if outstanding is not None:
            checkpoint = index % outstanding >= config.num_microbatches_with_partial_activation_checkpoints
        output_tensor, num_tokens = forward_step(
            forward_step_func, data_iterator, model, num_microbatches, input_tensor, forward_data_store, config,
            cp_group_size=cp_group.size(), collect_non_loss_data=collect_non_loss_data,
            checkpoint_activations_microbatch=checkpoint,
            is_first_microbatch=check_first_val_step(first_val_step, forward_only, index == 0),
            current_microbatch=index, is_last_stage=last,
        )
        total_num_tokens += num_tokens
        if not last:
            exchange.send_output(output_tensor)  # activation `index`
            if not forward_only:
                post_due_grads(sent=index + 1)
        if not forward_only:
            input_tensors.append(input_tensor)
            output_tensors.append(output_tensor)

    def backward(enable_sync: bool) -> None:
        if enable_sync and (config.grad_sync_func is None or first):
            enable_grad_sync()
        input_tensor, output_tensor = input_tensors.pop(0), output_tensors.pop(0)
        exchange.finish_output_send(output_tensor)  # its data may be deallocated before backward
        output_tensor_grad = exchange.grad()
        exchange.send_grad(backward_step(input_tensor, output_tensor, output_tensor_grad, config))

    post_next_input()
    for index in range(warmup):
        forward(index)
    for step in range(steady):
        forward(warmup + step)
        if not forward_only:
            backward(enable_sync=warmup == 0 and step == steady - 1)
    if not forward_only:
        for step in range(warmup):
            backward(enable_sync=step == warmup - 1)
        if no_sync_context is not None:
            enable_grad_sync()
            if config.grad_sync_func is not None:
                config.grad_sync_func(model.parameters())
    exchange.finish()

    if config.finalize_model_grads_func is not None and not forward_only:
        finish_embedding_wgrad_compute(config, embedding_module, last, tp_group)
        config.finalize_model_grads_func(
            [model], total_num_tokens if config.calculate_per_token_loss else None,
            pg_collection=pg_collection, force_all_reduce=force_all_reduce,
        )
    if config.timers is not None:
        config.timers("forward-backward").stop()
    return forward_data_store
