"""
LoginThrottle: doubling delays, the per-address and per-user limit, forgetting after the window.
"""

from pymaild.throttle import LoginThrottle


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_delays_double_up_to_the_cap():
    """
    Each failure waits twice as long as the one before, at most maxDelay.
    """
    t = LoginThrottle(maxFailures=100, baseDelay=0.5, maxDelay=4, clock=Clock())
    assert [t.failed("192.0.2.1", "u") for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]


def test_limit_per_address_and_per_user_and_window():
    """
    After maxFailures from one address (any users) or for one user (any addresses) logins are
    blocked; five minutes later they are allowed again; a success clears the user only.
    """
    clock = Clock()
    t = LoginThrottle(maxFailures=3, window=300, clock=clock)
    for user in ("a", "b", "c"):
        t.failed("192.0.2.1", user)
    assert t.blocked("192.0.2.1", "someone") and not t.blocked("192.0.2.2", "someone")
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        t.failed(ip, "victim")
    assert t.blocked("203.0.113.9", "victim")
    t.succeeded("203.0.113.9", "victim")
    assert not t.blocked("203.0.113.9", "victim")
    clock.now += 301
    assert not t.blocked("192.0.2.1", "someone")


def test_checks_under_way_count_until_they_end():
    """
    Password checks started in parallel count against the limit before their answers are in:
    with a limit of 3, a fourth check does not start while three run; a success frees its slot.
    """
    from twisted.internet.defer import Deferred

    throttle = LoginThrottle(maxFailures=3)
    answers = [Deferred() for _ in range(4)]
    started = []

    def attempt(i):
        started.append(i)
        return answers[i]

    results = []
    for i in range(4):
        throttle.checking("192.0.2.1", f"u{i}", lambda i=i: attempt(i)).addBoth(results.append)
    assert started == [0, 1, 2]
    assert not throttle.blocked("192.0.2.1", "someone")  # (it waits; only failures refuse at once)
    answers[0].callback("ok")
    assert started == [0, 1, 2, 3] and results == ["ok"]
    for i in (1, 2, 3):
        answers[i].callback("ok")
    assert throttle._checking == {} and throttle._waiting == []
    assert not throttle.blocked("192.0.2.1", "someone")


def test_a_waiting_check_is_refused_when_the_checks_before_it_fail():
    """
    The checks a waiting one waited for failed (and were counted as failures by the caller, in
    its errback): the limit is reached, so the waiting check is refused without being tried.
    """
    from twisted.internet.defer import Deferred, fail

    from pymaild.throttle import LoginBlocked

    throttle = LoginThrottle(maxFailures=2)
    answers = [Deferred(), Deferred()]
    started, results = [], []
    for i in range(2):
        d = throttle.checking("192.0.2.1", "guess", lambda i=i: (started.append(i), answers[i])[1])
        d.addErrback(lambda f: (throttle.failed("192.0.2.1", "guess"), f)[1]).addErrback(results.append)
    waiting = throttle.checking("192.0.2.1", "guess", lambda: started.append("third") or fail(ValueError()))
    waiting.addErrback(lambda f: results.append(f.type))
    answers[0].errback(ValueError("wrong password"))
    assert started == [0, 1]  # (one failure + one under way: still full)
    answers[1].errback(ValueError("wrong password"))
    assert started == [0, 1] and results[-1] is LoginBlocked
    assert throttle._waiting == [] and throttle._checking == {}
