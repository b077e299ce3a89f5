"""Time and memory of one pipeline stage's work on a GPU cluster, from the model's shape.

Per layer and micro-batch (``T = s b`` tokens, ``e`` bytes per element, ``C`` hidden, ``n`` streams):

- **Matrix products** at ``cluster.gemm_flops``: forward FLOPs per token are QKV and output
  projections ``2 C (C + 2 C_kv) + 2 C^2``, causal attention ``2 s C`` (flash attention skips the
  masked half), the MLP ``2 k C F`` (``k`` = 3 with SwiGLU, else 2) or, for MoE, the router ``2 C E``
  plus ``topk`` experts and the shared one; backward is twice the forward. Split over ``tp``.
- **The connection** (memory-bound, at ``cluster.memory_bandwidth``): the bytes one sub-layer's
  connection moves per token in forward and in backward (``method.connection_bytes_moved``):
  residual, the add and autograd's sum of two gradients; mHC, the byte account of its fused
  kernels (``method.fused_op_bytes`` of ``mappings_pre`` and ``post_res``, the stream gradient
  handed from one to the other); HC, eager PyTorch on a GPU (method doc, section 4.3), backward twice its forward. Plus
  the ``phi`` projection (``2 n C (n^2 + 2n)`` FLOPs per token, twice in backward) as a matrix
  product. Sinkhorn's iterations on n x n per token are left out (a few hundred FLOPs, on chip).
- **Recompute**: ``block`` rebuilds the freed states in backward (docs/memory.md) by replaying
  post_res from the block start, each ``(2n+1) C`` elements: ``k (k-1) / 2`` per block of ``k``
  rebuilt one sub-layer at a time (``layout.rebuild = "sublayer"``, one rebuilt state held),
  ``k - 1`` rebuilt a block at once (``"block"``, the paper's; up to ``k - 1`` held, counted in the
  stage's memory); each layer input by ``pre`` (``(n+1) C``); the rebuilt tensors take the
  replay's memory, no copy. ``full`` replays the whole layer's forward in backward.
- **Tensor parallel** (sequence parallel): 2 all-gathers + 2 reduce-scatters of ``T C e`` per layer
  and pass, each moving ``(tp-1)/tp`` of it per GPU over NVLink. **Expert parallel**: dispatch and
  combine all-to-alls of ``T topk C e (ep-1)/ep`` per GPU and pass, over NVLink while ``tp ep`` fits
  in a node, else InfiniBand. With ``layout.overlap`` a layer takes ``max(compute, communication)``
  (another micro-batch's compute hides it, as DualPipe does), else their sum.
- **Pipeline transfers**: ``T C e n / tp`` bytes per hop (n streams), latency + bytes / link
  bandwidth; the link is NVLink when both stages sit in one node (megatron's rank order puts
  pipeline outermost, so a stage spans ``world / pp`` consecutive GPUs).
- The last stage adds the output layer (``2 C V`` FLOPs per token, twice in backward).
- **Step tail**: the optimizer (Adam, memory-bound: ~32 bytes moved per parameter held) and,
  without overlap, the data-parallel gradient reduce-scatter + parameter all-gather.

Memory per GPU of a stage (bytes): parameters and gradients (``e`` + 4 per parameter, fp32 main
grads when e = 2) plus the optimizer (fp32 master copy when e = 2, Adam moments: 12 or 8 bytes,
divided over data-parallel ranks with the distributed optimizer), plus activations per token and
layer (docs/memory.md's model with flash attention, no h s scores, from ``mhc_megatron.method``)
times the micro-batches a stage holds at its peak: 1F1B ``min(m, pp - r)``, interleaved
``(pp - r - 1) 2 + (vpp - 1) pp + 1`` chunk passes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mhc_megatron.method import (
    FLOAT32_BYTES,
    connection_bytes_moved,
    connection_kept_bytes,
    default_block_size,
    kept_state_fraction,
    mlp_kept_bytes,
    norm_and_attention_kept_bytes,
    num_mapping_columns,
    stream_state_bytes,
)
from mhc_megatron.plan.hardware import ClusterSpec
from mhc_megatron.plan.model import Layout, ModelSpec
from mhc_megatron.plan.schedule import Schedule, Task
from mhc_megatron.plan.simulator import Costs


def check_layout(model: ModelSpec, layout: Layout, cluster: ClusterSpec) -> int:
    """Validate ``layout`` for ``model`` on ``cluster``; return the micro-batches per step."""
    if model.num_layers % (layout.pp * layout.vpp):
        raise ValueError(
            f"num_layers {model.num_layers} is not divisible by pp x vpp = {layout.pp} x {layout.vpp}: "
            "every model chunk needs the same number of layers"
        )
    world = cluster.world_size
    if world % (layout.tp * layout.pp):
        raise ValueError(f"{world} GPUs are not divisible by tp x pp = {layout.tp} x {layout.pp}")
    dp = world // (layout.tp * layout.pp)
    if layout.ep > 1 and (not model.moe or dp % layout.ep or model.num_moe_experts % layout.ep):
        raise ValueError(f"ep {layout.ep} needs an MoE model whose experts and data-parallel size ({dp}) it divides")
    if model.global_batch_size % (model.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size {model.global_batch_size} is not divisible by micro_batch_size x data-parallel "
            f"size = {model.micro_batch_size} x {dp}"
        )
    micro_batches = model.global_batch_size // (model.micro_batch_size * dp)
    if layout.vpp > 1 and micro_batches % layout.pp:
        raise ValueError(f"interleaving needs micro-batches per step ({micro_batches}) to be a multiple of pp {layout.pp}")
    return micro_batches


def data_parallel(layout: Layout, cluster: ClusterSpec) -> int:
    return cluster.world_size // (layout.tp * layout.pp)


def block_size(model: ModelSpec, layers: int) -> int:
    """The paper's ``L_r*`` over a chunk's ``2 layers`` sub-layers (``method.default_block_size``)."""
    return default_block_size(model.num_streams, 2 * layers)


def block_replay_elements_per_layer(model: ModelSpec, layers: int, rebuild: str = "sublayer") -> float:
    """Elements block recompute moves per token in backward, averaged over a chunk's ``layers``,
    its states rebuilt as ``rebuild`` says (``Layout.rebuild``)."""
    n, c = model.num_streams, model.hidden_size
    sublayers, size = 2 * layers, block_size(model, layers)
    blocks = [min(size, sublayers - start) for start in range(0, sublayers, size)]
    replays = sum(k - 1 if rebuild == "block" else k * (k - 1) // 2 for k in blocks)
    elements = replays * (2 * n + 1) * c + sublayers * (n + 1) * c
    return elements / layers


def gemm_flops_per_token(model: ModelSpec) -> float:
    """Forward FLOPs per token of one layer's matrix products (no connection)."""
    c, s = model.hidden_size, model.seq_length
    kv = c * (model.num_query_groups or model.num_attention_heads) // model.num_attention_heads
    attention = 2 * c * (c + 2 * kv) + 2 * c * c + 2 * s * c
    k = 3 if model.swiglu else 2
    if model.moe:
        mlp = 2 * c * model.num_moe_experts + model.moe_router_topk * 2 * k * c * (model.moe_ffn_hidden_size or model.ffn)
        mlp += 2 * k * c * (model.moe_shared_expert_intermediate_size or 0)
    else:
        mlp = 2 * k * c * model.ffn
    return attention + mlp


@dataclass(frozen=True)
class LayerTime:
    """Seconds of one layer for one micro-batch on one GPU, split by cause."""

    gemm_forward: float
    connection_forward: float
    connection_backward: float
    recompute: float  # added to backward
    comm: float  # TP + EP communication per pass
    overlap: bool

    def _pass(self, compute: float) -> float:
        return max(compute, self.comm) if self.overlap else compute + self.comm

    @property
    def forward(self) -> float:
        return self._pass(self.gemm_forward + self.connection_forward)

    @property
    def backward(self) -> float:
        return self._pass(2 * self.gemm_forward + self.connection_backward + self.recompute)


def layer_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec, layers_per_chunk: int) -> LayerTime:
    """One layer's time per micro-batch (see the module docstring for the model)."""
    tokens = model.seq_length * model.micro_batch_size
    e, n, c = model.element_bytes, model.num_streams, model.hidden_size
    gemm = tokens * gemm_flops_per_token(model) / layout.tp / cluster.gemm_flops
    sharded = tokens / layout.tp  # sequence parallel: the connection works on its share of tokens
    forward_bytes, backward_bytes = connection_bytes_moved(model.hc_mode, n, c, e)
    connection_forward = 2 * sharded * forward_bytes / cluster.memory_bandwidth
    connection_backward = 2 * sharded * backward_bytes / cluster.memory_bandwidth
    if model.hc_mode != "residual":
        projection = 2 * sharded * 2 * n * c * num_mapping_columns(n) / cluster.gemm_flops
        connection_forward += projection
        connection_backward += 2 * projection
    recompute = 0.0
    if layout.recompute == "full":
        recompute = gemm + connection_forward
    elif model.hc_mode == "mhc" and layout.recompute == "block":
        elements = block_replay_elements_per_layer(model, layers_per_chunk, layout.rebuild)
        recompute = sharded * elements * e / cluster.memory_bandwidth
    comm = 0.0
    if layout.tp > 1:
        comm += 4 * (layout.tp - 1) / layout.tp * tokens * c * e / cluster.device.intra_node_bandwidth
    if model.moe and layout.ep > 1:
        in_node = layout.tp * layout.ep <= cluster.gpus_per_node
        bandwidth = cluster.device.intra_node_bandwidth if in_node else cluster.device.inter_node_bandwidth
        comm += 2 * (layout.ep - 1) / layout.ep * sharded * model.moe_router_topk * c * e / bandwidth
    return LayerTime(gemm, connection_forward, connection_backward, recompute, comm, layout.overlap)


def head_time(model: ModelSpec, layout: Layout, cluster: ClusterSpec) -> float:
    """Forward seconds of the output layer per micro-batch (backward: twice)."""
    tokens = model.seq_length * model.micro_batch_size
    return tokens * 2 * model.hidden_size * model.vocab_size / layout.tp / cluster.gemm_flops


def transfer_bytes(model: ModelSpec, layout: Layout) -> float:
    """Bytes of one stage-to-stage hop per micro-batch: the n streams of every token."""
    tokens = model.seq_length * model.micro_batch_size
    return tokens * stream_state_bytes(model.streams, model.hidden_size, model.element_bytes) / layout.tp


def link_bandwidth(layout: Layout, cluster: ClusterSpec, src: int, dst: int) -> float:
    """NVLink when stages ``src`` and ``dst`` share a node, else InfiniBand (bytes/s)."""
    per_stage = cluster.world_size // layout.pp
    same_node = src * per_stage // cluster.gpus_per_node == dst * per_stage // cluster.gpus_per_node
    return cluster.device.intra_node_bandwidth if same_node else cluster.device.inter_node_bandwidth


def layer_parameters(model: ModelSpec, layout: Layout) -> float:
    """Parameters of one layer held by one GPU (dense parts over tp, experts over ep x tp)."""
    c = model.hidden_size
    kv = c * (model.num_query_groups or model.num_attention_heads) // model.num_attention_heads
    k = 3 if model.swiglu else 2
    dense = c * (c + 2 * kv) + c * c + 2 * c
    experts = 0.0
    if model.moe:
        dense += c * model.num_moe_experts + k * c * (model.moe_shared_expert_intermediate_size or 0)
        experts = model.num_moe_experts * k * c * (model.moe_ffn_hidden_size or model.ffn) / layout.ep
    else:
        dense += k * c * model.ffn
    if model.hc_mode != "residual":
        n = model.num_streams
        dense += 2 * (n * c * num_mapping_columns(n) + num_mapping_columns(n) + 3)
    return (dense + experts) / layout.tp


def stage_parameters(model: ModelSpec, layout: Layout, stage: int) -> float:
    """Parameters one GPU of ``stage`` holds: its layers, plus the embedding on the first stage and
    the output layer on the last (untied)."""
    layers = model.num_layers // layout.pp
    total = layers * layer_parameters(model, layout)
    if stage == 0:
        total += model.vocab_size * model.hidden_size / layout.tp
    if stage == layout.pp - 1:
        total += model.vocab_size * model.hidden_size / layout.tp
    return total


def step_tail(model: ModelSpec, layout: Layout, cluster: ClusterSpec) -> float:
    """Seconds after the last backward: Adam over the largest stage's parameters (32 bytes moved per
    parameter, over data-parallel ranks with the distributed optimizer), plus the blocking
    data-parallel reduce-scatter of the gradients and all-gather of the parameters without overlap."""
    dp = data_parallel(layout, cluster)
    params = max(stage_parameters(model, layout, stage) for stage in range(layout.pp))
    shard = dp if layout.distributed_optimizer else 1
    tail = params / shard * 32 / cluster.memory_bandwidth
    if dp > 1 and not layout.overlap:
        bandwidth = cluster.device.inter_node_bandwidth if cluster.nodes > 1 else cluster.device.intra_node_bandwidth
        tail += 2 * (dp - 1) / dp * params * model.element_bytes / bandwidth
    return tail


def simulator_costs(model: ModelSpec, layout: Layout, cluster: ClusterSpec, schedule: Schedule) -> Costs:
    """The simulator's durations for ``model`` laid out as ``layout`` on ``cluster``."""
    layers = model.num_layers // (layout.pp * layout.vpp)
    layer = layer_time(model, layout, cluster, layers)
    head = head_time(model, layout, cluster)
    last = schedule.total_chunks - 1
    hop = transfer_bytes(model, layout)

    def compute(task: Task, stage: int) -> float:
        forward = layers * layer.forward + (head if task.chunk == last else 0.0)
        return forward if task.kind == "F" else layers * layer.backward + (2 * head if task.chunk == last else 0.0)

    def transfer(task: Task, src: int, dst: int) -> float:
        return cluster.link_latency + hop / link_bandwidth(layout, cluster, src, dst)

    return Costs(compute, transfer, step_tail(model, layout, cluster))


def activation_bytes_per_token_layer(model: ModelSpec, layout: Layout, layers_per_chunk: int) -> float:
    """Bytes one layer keeps per token for backward (docs/memory.md, flash attention, MoE's MLP as
    ``topk`` experts plus the shared one), per GPU (sequence parallel: over tp)."""
    e, c, n = model.element_bytes, model.hidden_size, model.num_streams
    if layout.recompute == "full":
        return stream_state_bytes(model.streams, c, e) / layout.tp
    if model.moe:
        expert = mlp_kept_bytes(model.moe_ffn_hidden_size or model.ffn, e, model.swiglu)
        mlp = model.moe_router_topk * (c * e + expert)
        mlp += mlp_kept_bytes(model.moe_shared_expert_intermediate_size or 0, e, model.swiglu)
        mlp += model.num_moe_experts * FLOAT32_BYTES
    else:
        mlp = mlp_kept_bytes(model.ffn, e, model.swiglu)
    total = norm_and_attention_kept_bytes(c, e) + mlp
    if model.hc_mode != "residual":
        fraction = None  # every input state and output
        if model.hc_mode == "mhc" and layout.recompute == "block":  # block starts only; inputs rebuilt
            fraction = kept_state_fraction(2 * layers_per_chunk, block_size(model, layers_per_chunk))
        total += 2 * connection_kept_bytes(n, c, e, fraction)
    return total / layout.tp


def in_flight(layout: Layout, micro_batches: int, stage: int) -> int:
    """Chunk passes (micro-batch x chunk) whose activations a stage holds at its peak."""
    if layout.vpp == 1:
        return min(micro_batches, layout.pp - stage)
    return min(micro_batches * layout.vpp, (layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp + 1)


def stage_memory(model: ModelSpec, layout: Layout, cluster: ClusterSpec, micro_batches: int, stage: int) -> dict:
    """Peak bytes per GPU of ``stage``: ``weights`` (parameters + gradients + optimizer states) and
    ``activations``."""
    params = stage_parameters(model, layout, stage)
    e = model.element_bytes
    optimizer = (12 if e == 2 else 8) / (data_parallel(layout, cluster) if layout.distributed_optimizer else 1)
    weights = params * (e + FLOAT32_BYTES + optimizer)
    layers = model.num_layers // (layout.pp * layout.vpp)
    tokens = model.seq_length * model.micro_batch_size
    activations = in_flight(layout, micro_batches, stage) * layers * tokens * activation_bytes_per_token_layer(model, layout, layers)
    if layout.recompute == "full":  # one layer's full set rebuilt at a time in backward
        activations += tokens * activation_bytes_per_token_layer(model, replace(layout, recompute="none"), layers)
    elif model.hc_mode == "mhc" and layout.recompute == "block":  # the rebuilt states held in backward
        held = block_size(model, layers) - 1 if layout.rebuild == "block" else 1
        activations += tokens * held * stream_state_bytes(model.streams, model.hidden_size, e) / layout.tp
    return {"weights": weights, "activations": activations, "total": weights + activations}
