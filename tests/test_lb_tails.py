"""The policies that bound tails and their cost, driven without sockets: the
peak-EWMA balancer, the retry budget over time, the hedge delay and its pause.
(On real processes: tests/test_lb_gray.py.)"""

from __future__ import annotations

from collections import Counter

from lb.hedgepolicy import MIN_ANSWERS, HedgePolicy
from lb.retry import RetryBudget
from lb.settings import RetryBudgetSettings
from proxycore.balancing import DECAY, PeakEwma, expected, failed, observe, pick
from proxycore.config import Address
from proxycore.histogram import BUCKETS, Histogram, quantile
from proxycore.servers import HealthParams, Server, ServerSpec


def server(name: str) -> Server:
    return Server(ServerSpec(name, Address("127.0.0.1", 1)), HealthParams())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peak_ewma_takes_a_slow_answer_at_once_and_forgets_it_in_time() -> None:
    s = server("a")
    observe(s, 0.001, 0.0)
    observe(s, 1.5, 0.01)
    assert s.ewma == 1.5  # the peak: one slow answer is news
    observe(s, 0.001, 0.02)  # a fast one a moment later moves it hardly at all
    assert s.ewma > 1.49
    observe(s, 0.001, 0.02 + 3 * DECAY)  # three decays later it is nearly forgotten
    assert s.ewma < 0.1
    # with no answer at all it fades towards nothing, so a slow server is tried again
    t = server("t")
    observe(t, 2.0, 0.0)
    assert expected(t, 0.0) == 2.0 and expected(t, 5 * DECAY) < 0.02


def test_p2c_sends_little_to_a_slow_server_and_tries_it_again_later() -> None:
    clock = Clock()
    fast, slow = server("fast"), server("slow")
    observe(fast, 0.001, clock.now)
    observe(slow, 1.5, clock.now)
    policy = PeakEwma(clock)
    chosen = Counter(pick([fast, slow], policy).name for _ in range(1000))
    assert chosen == {"fast": 1000}
    # the fast one busy enough to be expected slower: the slow one gets a request
    fast.active = 2000
    assert pick([fast, slow], policy) is slow
    fast.active = 30  # as busy as it is under load, and answering as fast as ever
    clock.now += 3 * DECAY
    observe(fast, 0.001, clock.now)
    assert pick([fast, slow], policy) is fast
    clock.now += 2 * DECAY  # long after: the slow one's past has faded below that
    observe(fast, 0.001, clock.now)
    assert pick([fast, slow], policy) is slow


def test_a_server_that_fails_fast_counts_as_slow() -> None:
    clock = Clock()
    good, failing = server("good"), server("failing")
    observe(good, 0.002, clock.now)
    observe(failing, 0.0005, clock.now)
    failed(failing, clock.now)  # a 503 in half a millisecond
    policy = PeakEwma(clock)
    good.active = 30  # busy, and still preferred to a server that fails
    assert Counter(pick([good, failing], policy).name for _ in range(100)) == {"good": 100}


def test_p2c_shares_equal_servers_evenly_and_draws_two_of_many() -> None:
    clock = Clock()
    servers = [server(n) for n in "abcd"]
    policy = PeakEwma(clock)
    two = Counter(pick(servers[:2], policy).name for _ in range(1000))
    assert two == {"a": 500, "b": 500}
    slow = servers[3]
    observe(slow, 1.0, clock.now)
    many = Counter(pick(servers, policy).name for _ in range(3000))
    # d is chosen only when drawn with... never: any other beats it
    assert "d" not in many and min(many.values()) > 700


def test_the_budget_over_time_bounds_the_share_of_extra_attempts() -> None:
    settings = RetryBudgetSettings(
        percent=100, min_concurrency=1000, window_percent=10, min_per_second=0.5, window=10.0
    )
    budget = RetryBudget(settings, now=0.0)
    taken = 0
    for second in range(1, 31):
        for _ in range(100):  # 100 requests a second, each wanting an extra attempt
            budget.requests += 1
            if budget.take(in_flight=100):
                taken += 1
                budget.give()
        budget.tick(float(second))
    # 10% of 3,000 requests plus 0.5 a second (the first window's floor counted once more)
    assert 300 <= taken <= 300 + 0.5 * 30 + 0.5 * 10
    assert budget.spent == 3000 - taken and budget.exhausted == 0


def test_the_budget_floor_lets_a_quiet_pool_retry() -> None:
    budget = RetryBudget(RetryBudgetSettings(min_per_second=1.0, window=10.0), now=0.0)
    budget.requests += 1
    assert budget.take(in_flight=1)  # 10% of one request is nothing; the floor allows it


def counts(*seconds: float) -> list[int]:
    h = Histogram()
    for s in seconds:
        h.observe(s)
    return h.counts


def test_quantile_interpolates_within_a_bucket() -> None:
    assert quantile([0] * (len(BUCKETS) + 1), 0.95) == 0.0
    c = counts(*[0.4] * 100)  # all in (0.25, 0.5]
    assert 0.25 < quantile(c, 0.5) < quantile(c, 0.95) <= 0.5
    assert quantile(counts(20.0), 0.5) == BUCKETS[-1]


def test_the_hedge_delay_follows_the_pools_recent_latency_above_its_floor() -> None:
    policy = HedgePolicy(percentile=95, min_wins=10, window=10.0, now=0.0)
    assert policy.after(0.3) == 0.3  # nothing known yet: the floor
    fast = counts(*[0.001] * MIN_ANSWERS * 5)
    policy.tick(1.0, fast)
    assert policy.after(0.3) == 0.3
    slow = [a + b for a, b in zip(fast, counts(*[0.4] * MIN_ANSWERS * 100), strict=True)]
    policy.tick(2.0, slow)
    assert 0.4 < policy.after(0.3) <= 0.5  # all slow: hedging waits past the usual answer
    policy.tick(30.0, slow)  # a window with no answers: unknown again
    assert policy.after(0.3) == 0.3


def test_hedging_pauses_while_hedges_lose_and_probes_once_a_second() -> None:
    policy = HedgePolicy(percentile=95, min_wins=10, window=10.0, now=0.0)
    nothing = [0] * (len(BUCKETS) + 1)
    policy.sent, policy.won = 20, 0
    policy.tick(1.0, nothing)
    assert policy.paused
    assert policy.may_hedge(1.0)  # the probe
    assert not policy.may_hedge(1.5) and policy.suppressed == 1
    assert policy.may_hedge(2.0)
    policy.sent, policy.won = 30, 5  # the probes win again (5 of the last 10)
    policy.tick(2.0, nothing)
    policy.tick(12.5, nothing)  # (the window has moved past the losing ones)
    assert not policy.paused and policy.may_hedge(12.6)
