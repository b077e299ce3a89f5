"""Running the model: megatron-core's pipeline schedules over the n-stream state, and one step.

``buffers`` (the pipeline buffers sized for the stream state), ``schedules`` (1F1B with the
exchange overlapped), ``exchange_thread`` (the gloo exchange posted from a communication thread),
``exchange_timing`` (time blocked in exchanges, the exposed transfer, the critical path) and
``step`` (DDP, optimizer, the schedule of one global batch, the optimizer step).
"""
