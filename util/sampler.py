"""A DistributedSampler that can start part-way through an epoch, for mid-epoch resume."""
import itertools

from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """Same order as DistributedSampler for (seed, epoch, rank); `set_start(k)` skips its first k indices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)


class ShardSampler(Sampler):
    """Rank r takes samples r, r + world, r + 2*world, ...: no padding, so no sample is seen twice."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
