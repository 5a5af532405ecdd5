"""The order in which prompts reach the trainer: whole groups, each generation batch once per micro-step."""

import torch
from torch.utils.data import Sampler


class RepeatSampler(Sampler):
    """Dataset indices for generation batches.

    Each batch of `prompts_per_batch` prompts is emitted `repeat_count` times (once
    per micro-step it serves), each prompt `num_generations` times in a row, so a
    group of completions is consecutive in the global batch.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_batch: int, repeat_count: int,
                 shuffle: bool = True, seed: int = 0):
        if num_rows < prompts_per_batch:
            raise ValueError(f"the dataset has {num_rows} prompts but one generation batch needs "
                             f"{prompts_per_batch}: use a larger dataset or a smaller generation batch")
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_batch, self.repeat_count = prompts_per_batch, repeat_count
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.num_rows, generator=generator).tolist()
        return list(range(self.num_rows))

    def batch_prompts(self, batch_index: int) -> list[int]:
        """The prompts of generation batch `batch_index` counted from the first epoch's first (epoch e is
        the one iterated after set_epoch(e), as the Trainer does): asynchronous generation looks ahead."""
        per_epoch = self.num_rows // self.prompts_per_batch
        epoch, i = divmod(batch_index, per_epoch)
        return self._order(epoch)[i * self.prompts_per_batch : (i + 1) * self.prompts_per_batch]

    def __iter__(self):
        order = self._order(self.epoch)
        for start in range(0, len(order) - self.prompts_per_batch + 1, self.prompts_per_batch):
            chunk = order[start : start + self.prompts_per_batch]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows // self.prompts_per_batch) * self.prompts_per_batch * self.num_generations * self.repeat_count


class RepeatedStream(torch.utils.data.IterableDataset):
    """RepeatSampler's order for a dataset that cannot be indexed (a datasets.IterableDataset, streaming):
    `prompts_per_batch` rows are read from the stream, and that batch is emitted `repeat_count` times, each
    row `num_generations` times in a row. A last batch with fewer rows is dropped: groups stay whole.

    The trainer's data loader then hands each process its contiguous slice of every batch (accelerate's
    IterableDatasetShard, dispatch_batches=False), as RepeatSampler's batches are dealt."""

    def __init__(self, stream, num_generations: int, prompts_per_batch: int, repeat_count: int):
        self.stream, self.num_generations = stream, num_generations
        self.prompts_per_batch, self.repeat_count = prompts_per_batch, repeat_count

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):  # a shuffled stream reshuffles per epoch
            self.stream.set_epoch(epoch)

    def __iter__(self):
        chunk = []
        for row in self.stream:
            chunk.append(row)
            if len(chunk) == self.prompts_per_batch:
                for _ in range(self.repeat_count):
                    for item in chunk:
                        yield from [item] * self.num_generations
                chunk = []
