"""The bound on one ModelStreamInfer stream: requests computing plus answers not yet written.

A stream's requests run concurrently and their answers go out as they finish. A client that keeps
sending but does not read would otherwise make the server compute and hold every answer. The
`AnswerWindow` admits a request only while the stream holds fewer than `max_answers` requests
(computing, or answered and waiting to be written) and fewer than `max_bytes` of unwritten answers;
otherwise the stream's reader waits, gRPC stops reading that stream, and HTTP/2 flow control holds
the client back. Other streams and calls are not affected. The totals over every stream are the
gauges `splitstack_serving_stream_answers_pending` and `splitstack_serving_stream_answer_bytes_pending`.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import Message

from splitstack_serving import metrics


class AnswerWindow:
    """Admission of one stream's requests, bounded by answers held (count and bytes)."""

    def __init__(self, max_answers: int, max_bytes: int) -> None:
        self.max_answers = max(max_answers, 1)
        self.max_bytes = max(max_bytes, 1)
        self.answers = 0      # admitted and not yet written (computing, or waiting to be written)
        self.bytes = 0        # encoded size of the computed answers not yet written
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False

    def _full(self) -> bool:
        return self.answers >= self.max_answers or self.bytes >= self.max_bytes

    async def admit(self) -> None:
        """Wait until the stream has room for one more request, and take it."""
        while self._full():
            self._room.clear()
            await self._room.wait()
        self.answers += 1
        metrics.STREAM_ANSWERS.inc()

    def cancel_admission(self) -> None:
        """Give back a slot taken by `admit` that no request used (the client ended the stream)."""
        self._release(0)

    def computed(self, answer: Message) -> int:
        """An admitted request's answer is ready to be written; returns its size (bytes held)."""
        size = answer.ByteSize()
        self.bytes += size
        metrics.STREAM_ANSWER_BYTES.inc(size)
        return size

    def sent(self, size: int) -> None:
        """An answer of `size` bytes was handed to gRPC: its slot and bytes are free again."""
        self._release(size)

    def _release(self, size: int) -> None:
        if self._closed:
            return
        self.answers -= 1
        self.bytes -= size
        metrics.STREAM_ANSWERS.dec()
        metrics.STREAM_ANSWER_BYTES.dec(size)
        if not self._full():
            self._room.set()

    def close(self) -> None:
        """The stream ended: whatever it still held no longer counts."""
        if self._closed:
            return
        metrics.STREAM_ANSWERS.dec(self.answers)
        metrics.STREAM_ANSWER_BYTES.dec(self.bytes)
        self.answers = self.bytes = 0
        self._closed = True
        self._room.set()
