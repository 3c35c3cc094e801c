"""The bounds a connection is held to, and the token bucket that meters some of them (the per-user
limits shared by every gateway are in gateway/quota.py)."""

from __future__ import annotations

import time

from shared.settings import Settings

# join and history frames each start a task (Redis/MySQL reads); a connection may have this many
# running at once, further ones are answered `rate_limited` (a flood of them cannot pile up tasks).
MAX_PENDING_REQUESTS = 32
# Frames read per second per connection (any frame) is held to a budget well above what a polite
# client sends, see `inbound_bucket`; past it the receive loop stops reading for a while, so TCP
# pushes back on the client instead of the node spending a core answering one flooder.
INBOUND_MIN_RATE = 500.0
# The receive loop yields to the event loop after this many frames read back to back, so one
# client's burst (a TCP read can hold a thousand small frames) cannot hold up everyone else.
FRAMES_PER_TURN = 8
# Sends a connection may have queued for the producer (they reach it one at a time, in order);
# past it a send is answered `rate_limited`.
MAX_QUEUED_SENDS = 256


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")  # one or two per connection

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def debit(self, amount: float = 1) -> float:
        """Take `amount` tokens even when there are not as many (the balance may go below zero);
        the seconds to wait until the balance is back at zero."""
        self._refill()
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


def inbound_bucket(settings: Settings) -> TokenBucket:
    """A connection's budget of frames read: room for its sends at the full rate and burst, a
    join per room on reconnect, history paging and pings, several times over."""
    rate = max(INBOUND_MIN_RATE, 4 * settings.send_rate_per_s)
    return TokenBucket(rate, int(max(rate, 2 * (settings.send_burst + settings.max_rooms_per_conn))))
