"""The samples of each training step, as a pure function of the samples consumed before it.

The global batch after ``c`` consumed samples is samples ``c .. c+G-1`` of the dataset (``G`` the
global batch size); data-parallel rank ``r`` of ``D`` takes the ``r``-th contiguous ``G/D`` of them,
cut into micro-batches. Because nothing but ``c`` decides the batch, a run resumed after step ``k``
(``c = k*G``) sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import torch

from mhc_megatron.megatron.pipeline.step import MicroBatch


class StepBatches:
    """Micro-batches of one data-parallel rank for any step, from a map-style ``GPTDataset``."""

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        per_rank, remainder = divmod(global_batch_size, micro_batch_size * data_parallel_size)
        if remainder or per_rank == 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size {micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = per_rank
        self.first_sample_of_rank = data_parallel_rank * per_rank * micro_batch_size
        self.device = torch.device(device)

    def _micro_batch(self, first_sample: int) -> MicroBatch:
        samples = [self.dataset[(first_sample + i) % len(self.dataset)] for i in range(self.micro_batch_size)]

        def stacked(key: str) -> torch.Tensor:
            return torch.stack([torch.as_tensor(sample[key]) for sample in samples]).to(self.device)

        return MicroBatch(tokens=stacked("tokens"), labels=stacked("labels"), loss_mask=stacked("loss_mask"))

    def global_batch(self, consumed_samples: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global batch that starts at sample ``consumed_samples``."""
        first = consumed_samples + self.first_sample_of_rank
        return [self._micro_batch(first + m * self.micro_batch_size) for m in range(self.num_micro_batches)]
