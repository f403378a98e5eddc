"""The tracker's sender thread (trainer/registry/tracking.py) in-process: calls go out in order, an outage keeps
them queued and retried, a refusal is set aside without blocking the queue, and closing hands back what never
went through."""
from __future__ import annotations

import threading

from trainer.registry.tracking import _Call, _Sender


class Store:
    """Stands in for MLflow: down for the first `outage` attempts, refuses calls named "bad"."""

    def __init__(self, outage: int = 0) -> None:
        self.outage, self.attempts, self.sent = outage, 0, []
        self.lock = threading.Lock()

    def perform(self, call: _Call):
        with self.lock:
            self.attempts += 1
            if self.attempts <= self.outage:
                raise ConnectionRefusedError(111, "Connection refused")
            if call.what == "bad":
                raise PermissionError(13, "Permission denied", "mlruns/x")
            self.sent.append(call.payload)
            return call.payload


def test_calls_go_out_in_order_through_an_outage_and_a_refusal_is_set_aside():
    store, refused = Store(outage=3), []
    sender = _Sender(store.perform, lambda call, exc: refused.append((call.what, type(exc).__name__)), retry_s=0.01)
    sender.start()
    futures = [sender.submit(_Call("metrics", i)) for i in range(3)]
    bad = sender.submit(_Call("bad", "x"))
    futures.append(sender.submit(_Call("metrics", 3)))
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]
    assert store.sent == [0, 1, 2, 3] and store.attempts == 3 + 5  # three failed tries of the first call
    assert refused == [("bad", "PermissionError")] and isinstance(bad.exception(timeout=5), PermissionError)
    assert sender.close(timeout=5) == [] and not sender.is_alive()


def test_closing_during_an_outage_returns_the_calls_still_queued():
    store = Store(outage=10**9)
    sender = _Sender(store.perform, lambda call, exc: None, retry_s=0.01)
    sender.start()
    calls = [_Call("metrics", i) for i in range(4)]
    for call in calls:
        sender.submit(call)
    left = sender.close(timeout=0.3)
    assert [c.payload for c in left] == [0, 1, 2, 3] and store.sent == []
    sender.join(5)
    assert not sender.is_alive()  # abandoned: the thread ends instead of retrying for ever
    assert sender.outage_since is not None


def test_a_slow_store_is_waited_for_only_an_outage_ends_the_wait():
    """A new sqlite store on a loaded machine takes seconds to create its tables: that first call is slow, not
    an outage, and the end of the run waits for it instead of writing everything to the fallback file."""
    import time

    sent = []

    def slow(call: _Call):
        if not sent:
            time.sleep(1.0)  # five times the flush timeout below
        sent.append(call.payload)

    sender = _Sender(slow, lambda call, exc: None, retry_s=0.01)
    sender.start()
    for i in range(3):
        sender.submit(_Call("metrics", i))
    assert sender.close(timeout=0.2) == [] and sent == [0, 1, 2]
