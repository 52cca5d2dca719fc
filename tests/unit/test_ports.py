"""The process-wide port allocator every test and server here picks its ports from
(serving.triton.server.free_ports): the ports of one call are distinct, no port is handed out twice
in a process (even once released, before the server it was meant for binds it), and each was free."""

import socket
import threading

from serving.triton.server import free_port, free_ports


def test_one_call_gives_distinct_free_ports():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:  # free when handed out (nothing here binds them)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_no_port_is_handed_out_twice_in_a_process():
    given = [free_port() for _ in range(200)] + free_ports(100)
    assert len(set(given)) == len(given)


def test_a_port_the_kernel_offers_again_is_skipped(monkeypatch):
    """Released ports come back from bind(0) (here: forced, the first port each time); the
    allocator never returns one it handed out before."""
    import serving.triton.server as server

    first = free_port()
    real_socket = socket.socket
    offered = []

    class Again(real_socket):
        def bind(self, address):
            if not offered:  # the first bind of the call gets the port handed out before
                offered.append(first)
                return super().bind((address[0], first))
            return super().bind(address)

    monkeypatch.setattr(server.socket, "socket", Again)
    again = free_ports(2)
    assert offered == [first] and first not in again and len(set(again)) == 2


def test_concurrent_callers_get_disjoint_ports():
    results = []

    def take():
        results.append(free_ports(10))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [p for ports in results for p in ports]
    assert len(every) == 80 and len(set(every)) == 80
