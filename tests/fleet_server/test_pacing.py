"""Per-device token buckets (fleet_server/pacing.py)."""

import pytest

from fleet_server.pacing import TokenBuckets


@pytest.mark.parametrize(("costs", "admitted"), [
    ([1] * 12, [True] * 10 + [False] * 2),  # a burst of 10, then nothing until the refill
    ([25, 1], [True, False]),  # one large cost overdraws once
    ([5, 5, 1], [True, True, False]),
])
def test_a_bucket_admits_its_burst_then_waits(costs, admitted):
    buckets = TokenBuckets(rate=1.0, burst=10)
    assert [buckets.take("d1", c, now=100.0) for c in costs] == admitted


def test_refill_is_per_key_and_capped_at_the_burst():
    buckets = TokenBuckets(rate=2.0, burst=4)
    assert all(buckets.take("d1", 1, now=0.0) for _ in range(4))
    assert not buckets.take("d1", 1, now=0.0)
    assert buckets.take("d2", 1, now=0.0)  # another device is not limited by d1
    assert buckets.take("d1", 1, now=0.6)  # refilled 1.2 tokens
    assert sum(buckets.take("d1", 1, now=1000.0) for _ in range(10)) == 4  # capped at the burst


def test_keys_are_bounded():
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=3)
    for k in range(10):
        assert buckets.take(f"d{k}", 1, now=0.0)
    assert len(buckets._buckets) <= 3
