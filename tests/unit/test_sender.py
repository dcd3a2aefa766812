"""The source's sender: what happens to the queue items it took when sending fails.

Seam: ``Connection._send_taken`` with a scripted ``_process`` on an object that has only
the queue (no service, no socket)."""

from __future__ import annotations

from typing import Any

import pytest

from dtake.ops import Op, OpKind
from dtake.protocol.errors import ProtocolError
from dtake.service.queue import SourceQueue
from dtake.service.source import Connection, _Gap


def sender(fail_at: str, exc: BaseException) -> tuple[Any, list[str]]:
    """A bare Connection whose ``_process`` records item paths and raises ``exc`` at
    the item ``fail_at``."""
    conn: Any = Connection.__new__(Connection)
    conn.queue = SourceQueue(1 << 20)
    conn._item_order = 0
    done: list[str] = []

    def process(item: Any) -> None:
        if item.op.path == fail_at:
            raise exc
        done.append(item.op.path)

    conn._process = process
    for name in ("a", "b", "c", "d"):
        assert conn.queue.put_op(Op(OpKind.TRUNCATE, name, size=0))
    return conn, done


def paths(q: SourceQueue) -> list[str]:
    return [it.op.path for it in q.get_many(100, timeout=0) if it.op is not None]


@pytest.mark.parametrize(
    "exc",
    [
        _Gap(),  # the socket was gone when the op was emitted
        ProtocolError("send failed: [Errno 32] Broken pipe", reason="SEND_FAILED"),
    ],
    ids=["gap", "send-failed"],
)
def test_a_lost_connection_puts_back_the_item_being_sent_and_the_rest(exc: BaseException) -> None:
    """A send failure in the middle of an item (a big file's WRITE ops) loses the
    connection: the item is processed again from its start after the reconnect, with
    everything taken after it, in order (before, a send failure dropped the item: a big
    file's remaining chunks and its FILE_END never went, and nothing told the operator)."""
    conn, done = sender("b", exc)
    items = conn.queue.get_many(4, timeout=0)
    with pytest.raises(type(exc)):
        conn._send_taken(items)
    assert done == ["a"]
    assert paths(conn.queue) == ["b", "c", "d"]


def test_a_local_failure_drops_only_its_item() -> None:
    """Any other failure of one item (not the connection) does not replay that item
    for ever; the items taken after it go back to the queue."""
    conn, done = sender("b", ValueError("bad item"))
    items = conn.queue.get_many(4, timeout=0)
    with pytest.raises(ValueError):
        conn._send_taken(items)
    assert done == ["a"]
    assert paths(conn.queue) == ["c", "d"]


def test_items_taken_and_not_finished_count_as_queued() -> None:
    """While the sender works through the items it took (a big file, a request to the
    target), they are still queued for ``idle()`` (``dtake wait --idle``) and the
    status' queued_items: the queue itself is empty then."""
    conn: Any = Connection.__new__(Connection)
    conn.queue = SourceQueue(1 << 20)
    conn._item_order = 0
    conn._holding = 0
    seen: list[int] = []
    conn._process = lambda item: seen.append(conn._holding)
    for name in ("a", "b", "c"):
        assert conn.queue.put_op(Op(OpKind.TRUNCATE, name, size=0))
    conn._send_taken(conn.queue.get_many(3, timeout=0))
    assert seen == [3, 2, 1] and len(conn.queue) == 0
    assert conn._holding == 0  # all done
