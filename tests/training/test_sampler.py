"""The data order: deterministic per (seed, epoch), a permutation, length-grouped batches."""

from training.sampler import EpochShuffleSampler


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_order_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = EpochShuffleSampler(1000, seed=3, lengths=lengths, batch_size=8, mega_batch_factor=10)
    first = list(sampler)
    assert sorted(first) == list(range(1000))
    assert list(sampler) == first  # same epoch, same order, whatever else consumed randomness
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_length_grouping_pads_less_than_random_batches():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in _batches(order, 8))

    grouped = padded(list(EpochShuffleSampler(1000, 0, lengths, batch_size=8, mega_batch_factor=10)))
    plain = padded(list(EpochShuffleSampler(1000, 0, None, batch_size=8)))
    assert grouped < 0.7 * plain


def test_batch_lengths_do_not_cycle_long_to_short():
    """Inside a mega-batch the batches come in random order, not sorted by length."""
    lengths = list(range(800))
    order = list(EpochShuffleSampler(800, 1, lengths, batch_size=8, mega_batch_factor=100))
    longest = [max(lengths[i] for i in b) for b in _batches(order, 8)]
    assert longest != sorted(longest, reverse=True)
