"""The keyring's nonces (runtime.crypto): drawn in bulk, yet never handed out twice, in
threads or across a fork."""

from __future__ import annotations

import os
import threading

from runtime.crypto import _Nonces


def _split(nonces: bytes) -> list[bytes]:
    return [nonces[i : i + 12] for i in range(0, len(nonces), 12)]


def test_threads_taking_nonces_never_share_one():
    nonces = _Nonces()
    taken: list[bytes] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [chunk for _ in range(300) for chunk in _split(nonces.take(3))]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 8 * 300 * 3
    assert len(set(taken)) == len(taken)
    assert len(nonces.take(500)) == 500 * 12  # more than one draw holds: a draw of its own


def test_a_forked_child_never_repeats_its_parents_nonces():
    nonces = _Nonces()
    nonces.take(1)  # the parent holds drawn bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next nonces, to the parent
        os.write(write, nonces.take(5))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 60)
    os.close(read)
    assert len(child) == 60
    assert set(_split(child)).isdisjoint(_split(nonces.take(5)))
