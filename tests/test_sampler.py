from vlmalign.data.sampler import LengthGroupedBatchSampler


def test_every_sample_once_per_epoch_and_deterministic():
    lengths = [(i * 7) % 23 for i in range(100)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=4, drop_last=False)
    epoch0 = list(s)
    assert sorted(i for b in epoch0 for i in b) == list(range(100))
    epoch1 = list(s)
    assert epoch0 != epoch1  # a new shuffle each epoch
    again = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=4, drop_last=False)
    assert list(again) == epoch0


def test_grouping_cuts_padding():
    lengths = [(i * 7) % 23 + 1 for i in range(256)]
    s = LengthGroupedBatchSampler(lengths, batch_size=16, seed=0, group=8)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = padded(list(s))
    plain = padded([list(range(i, i + 16)) for i in range(0, 256, 16)])
    assert grouped < 0.8 * plain


def test_drop_last_gives_full_batches():
    s = LengthGroupedBatchSampler([1] * 50, batch_size=16, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 3 and all(len(b) == 16 for b in batches)
