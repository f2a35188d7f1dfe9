"""Uniform numbers that are a pure function of integer keys, computed for a whole batch at once.

Masks in pretraining are keyed on (seed, epoch, sample index): a sample gets the same mask whichever rank,
batch or resume draws it. A generator per sample did that one sample at a time; here SplitMix64's finaliser
hashes the keys in int64 tensor arithmetic (multiplication wraps, shifts are made logical with masks), so a
batch's noise is a few vector operations.
"""
import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_BITS = 24  # float32 holds 24 bits exactly


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative numbers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: every input bit affects every output bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def keyed_uniform(keys: list[int], rows: torch.Tensor, count: int) -> torch.Tensor:
    """[len(rows), count] float32 in [0, 1): entry (i, j) depends only on `keys`, rows[i] and j."""
    state = torch.zeros((), dtype=torch.int64)
    for key in keys:
        state = mix64(state + _GOLDEN + key)
    per_row = mix64(state + _GOLDEN + rows.to(torch.int64).view(-1, 1))
    positions = torch.arange(count, dtype=torch.int64).view(1, -1)
    bits = _shift_right(mix64(per_row + (positions + 1) * _GOLDEN), 64 - _BITS)
    return bits.to(torch.float32) * (1.0 / (1 << _BITS))
