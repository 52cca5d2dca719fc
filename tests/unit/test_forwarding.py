"""The unary front's bookkeeping (serving/triton/forwarding.py), without a server."""

import threading

import pytest

from serving.triton.forwarding import CancelRegistry, Forwards


def test_forwards_are_bounded_and_each_cancel_is_sent_once():
    forwards = Forwards(limit=2)
    gone = {"a": False, "b": False}
    sent = []
    assert forwards.add("a", lambda: gone["a"], lambda: sent.append("a"))
    assert forwards.add("b", lambda: gone["b"], lambda: sent.append("b"))
    assert not forwards.add("c", lambda: False, lambda: sent.append("c"))  # full: not registered
    assert forwards.sweep() == 0 and sent == []
    gone["a"] = True
    assert forwards.sweep() == 1 and forwards.sweep() == 0
    assert sent == ["a"] and len(forwards) == 1
    forwards.remove("b")  # finished: never cancelled, and its slot is free again
    gone["b"] = True
    assert forwards.sweep() == 0 and len(forwards) == 0
    assert forwards.add("c", lambda: False, lambda: None)


def test_no_sender_is_asked_after_its_final_response():
    """The forwarding threads remove their forward, then send (closing the sender), while a
    sweeper asks every registered sender: it must never ask a closed one (tritonserver 2.51
    crashes when it does)."""
    forwards = Forwards(limit=64)
    asked_closed = []
    stop = threading.Event()

    class Sender:
        closed = False

        def is_cancelled(self):
            if self.closed:
                asked_closed.append(self)
            return False

    def forward(sender, key):
        forwards.remove(key)
        sender.closed = True  # the final response went out

    def sweeper():
        while not stop.is_set():
            forwards.sweep()

    sweeping = threading.Thread(target=sweeper)
    sweeping.start()
    for round_ in range(100):
        senders = [Sender() for _ in range(16)]
        for i, sender in enumerate(senders):
            assert forwards.add((round_, i), sender.is_cancelled, lambda: None)
        threads = [threading.Thread(target=forward, args=(s, (round_, i))) for i, s in enumerate(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stop.set()
    sweeping.join()
    assert asked_closed == [] and len(forwards) == 0


def test_forwards_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight"):
        Forwards(0)


def test_cancel_registry_sets_the_flag_of_the_named_request_only():
    registry = CancelRegistry()
    a, b = registry.register("a"), registry.register("b")
    assert registry.cancel("a") is True
    assert a.is_set() and not b.is_set()
    registry.forget("a", a)
    registry.forget("b", b)
    assert len(registry) == 0


def test_a_second_request_with_an_id_in_flight_takes_over_nothing():
    """Ids travel from clients: a duplicate must neither steal the first's cancel flag nor
    remove it when it ends (the engine refuses the duplicate itself)."""
    registry = CancelRegistry()
    first = registry.register("dup")
    second = registry.register("dup")
    registry.forget("dup", second)  # the refused duplicate ends first
    assert registry.cancel("dup") is True
    assert first.is_set() and not second.is_set()
    registry.forget("dup", first)
    assert len(registry) == 0


def test_a_sweep_that_raises_does_not_end_cancellation():
    """One broken check or cancel (a sender Triton freed, a failed cancel message) is logged;
    the other forwards are still swept, and the sweeper thread goes on."""
    forwards = Forwards(limit=4)
    logged, sent, gone = [], [], {"b": False}

    def broken():
        raise RuntimeError("sender freed")

    def failing_cancel():
        sent.append("c")
        raise RuntimeError("cancel message refused")

    assert forwards.add("a", broken, lambda: sent.append("a"))
    assert forwards.add("b", lambda: gone["b"], lambda: sent.append("b"))
    assert forwards.add("c", lambda: True, failing_cancel)
    stopping, swept = threading.Event(), threading.Event()

    def log(message):
        logged.append(message)
        if sent.count("b"):
            swept.set()

    sweeper = threading.Thread(target=forwards.sweep_until, args=(stopping, 0.001), kwargs={"log": log})
    sweeper.start()
    try:
        gone["b"] = True  # cancelled after sweeps that raised: the thread still sees it
        assert swept.wait(10)
    finally:
        stopping.set()
        sweeper.join()
    assert sent.count("b") == 1 and sent.count("c") == 1 and "a" not in sent
    assert any("forward a" in m for m in logged) and any("cancelling forward c" in m for m in logged)


def test_a_cancel_that_arrives_first_is_remembered_boundedly():
    registry = CancelRegistry(remember=2)
    assert registry.cancel("early") is False
    assert registry.register("early").is_set()
    for name in ("x", "y", "z"):
        registry.cancel(name)
    assert not registry.register("x").is_set()  # pushed out by y and z
    assert registry.register("z").is_set()


def test_cancel_registry_is_thread_safe():
    registry = CancelRegistry()
    flags = [registry.register(str(i)) for i in range(200)]
    threads = [threading.Thread(target=registry.cancel, args=(str(i),)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(f.is_set() for f in flags)
