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
    with a limit of 3, a fourth check cannot start while three run; a success frees its slot.
    """
    from twisted.internet.defer import Deferred

    throttle = LoginThrottle(maxFailures=3)
    running = [throttle.checking("192.0.2.1", f"u{i}", Deferred()) for i in range(3)]
    assert throttle.blocked("192.0.2.1", "someone")
    assert not throttle.blocked("192.0.2.2", "someone")
    running[0].callback("ok")
    assert not throttle.blocked("192.0.2.1", "someone")
    running[1].addErrback(lambda f: throttle.failed("192.0.2.1", "u1"))
    running[1].errback(ValueError("wrong password"))
    running[2].callback("ok")
    assert throttle._checking == {}
    assert not throttle.blocked("192.0.2.1", "someone")
