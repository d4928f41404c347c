"""What the edge learned of the call's request as it decoded it from the wire.

A handler learns that its request is large (and its checks belong off the event loop)
without `ByteSize()`, which walks the whole message on the loop: tens of ms for megabytes.
"""

from __future__ import annotations

import contextvars

from google.protobuf.message import Message

# (id of the call's request, its size on the wire): set by the request deserializer, in the
# call's own context, and read by its handler while the request is alive.
_decoded: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("decoded")


def decoded(message: Message, size: int) -> None:
    """The call's request was decoded from `size` bytes."""
    _decoded.set((id(message), size))


def request_size(message: Message) -> int:
    """The message's size on the wire: known without a walk when it is the call's request."""
    known = _decoded.get(None)
    if known is not None and known[0] == id(message):
        return known[1]
    size: int = message.ByteSize()
    return size
