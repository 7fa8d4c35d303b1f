"""Answering one generation request: a JSON body, or an SSE stream, and what gets observed.

Non-streaming: wait until every choice finished while watching the connection; a client that
goes away aborts the request at once. Streaming: the HTTP status is chosen only after the
engine accepted the request (its "ack"), so a refusal (queue full, prompt too long) is a proper
4xx; once the stream started, an error becomes one SSE ``event: error`` and the stream closes.
A client that goes away is seen by a task reading the connection (the next ASGI message after the
body is the disconnect): it ends the stream, and the request is aborted.

A stream is written straight to the ASGI ``send`` (no response task group): the headers go out
with the first chunk when that chunk is ready at once (the engine's acknowledgement and the
first token usually arrive as one message), and never wait for a token that has not arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.http import formatting as fmt
from service.http.errors import REJECT_REASON, ApiError
from service.http.formatting import Formatter
from service.http.jobs import Job
from service.process.frontend import ClientGone, Frontend, Gone, Pending

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request", for metrics and logs only


class EventStream(StreamingResponse):
    """An SSE response written by its own loop; runs ``on_close`` however it ends (done, error,
    client gone). The headers are StreamingResponse's (content type, no length); the body is not."""

    def __init__(self, fe: Frontend, p: Pending, formatter: Formatter, on_close: Callable[[], None]):
        super().__init__(
            (),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._fe, self._p, self._formatter, self._on_close = fe, p, formatter, on_close

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(_watch_disconnect(receive, self._p))
        try:
            await self._write(send)
        except OSError:  # a server of ASGI 2.4 reports the client's disconnect from send
            pass
        finally:
            watcher.cancel()
            self._on_close()

    async def _write(self, send) -> None:
        p, m, f = self._p, self._fe.model, self._formatter
        job = p.job
        ready = list(f.opening(job, m))  # frames not written yet
        started = False

        async def flush(last: bool = False) -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if ready or last:  # the last frames and the end of the body: one write
                body = "".join(ready).encode()
                ready.clear()
                await send({"type": "http.response.body", "body": body, "more_body": not last})

        try:
            while not p.complete:
                if started or not p.ready():  # the headers wait only for what has already arrived
                    await flush()
                ev = await p.next_event()
                if ev is None:  # the acknowledgement
                    continue
                c, out = ev
                chunk = f.chunk(p, m, c, out)
                if chunk:
                    if c.first_sent_t is None:
                        c.first_sent_t = time.monotonic()
                    ready.append(chunk)
            if job.include_usage:
                ready.append(f.usage_chunk(job, m, p.choices))
            ready.append(fmt.DONE)
        except ApiError as e:
            p.error = e
            ready.append(e.sse())
        except ClientGone:
            return
        await flush(last=True)


async def generate(fe: Frontend, request: Request, route: str, job: Job, formatter: Formatter) -> Response:
    p = fe.submit(job, request.state.arrival)
    p.request_id = request.state.request_id
    if not job.stream:
        return await _unary(fe, request, route, p, formatter)
    try:
        await p.next_event()  # the ack, or the engine's refusal
    except ApiError as e:
        p.error = e
        _end(fe, route, p, e.status_on(route))
        return e.response(route)
    except BaseException:  # cancelled: the request must still end (in-flight count, abort)
        _end(fe, route, p, CLIENT_CLOSED)
        raise
    return EventStream(fe, p, formatter, on_close=lambda: _end(fe, route, p, 200))


async def _unary(fe: Frontend, request: Request, route: str, p: Pending, formatter: Formatter) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request.receive, p))
    status = 500
    try:
        async for _ in p.outputs():
            pass
        body = formatter.body(p, fe.model)
        status = 200
        return Response(body.model_dump_json(), media_type="application/json")
    except ClientGone:
        status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)
    except ApiError as e:
        p.error, status = e, e.status_on(route)
        return e.response(route)
    finally:
        watcher.cancel()
        _end(fe, route, p, status)


async def _watch_disconnect(receive, p: Pending) -> None:
    """After the body was read, the next ASGI message is the disconnect (if it happens)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            p.put(Gone())
            return


def _end(fe: Frontend, route: str, p: Pending, status: int) -> None:
    """Finish the request once, and record it: metrics, then one log line."""
    if p.ended:
        return
    fe.finish(p)
    m = fe.metrics
    m.observe_http(route, status)
    now = time.monotonic()
    if p.error is not None and not p.acked and p.error.kind in REJECT_REASON:
        m.observe_rejected(REJECT_REASON[p.error.kind])
    # A client that left before the engine's acknowledgement was aborted all the same: count it once,
    # here, as an abort (the engine's late answer for it is dropped), so no request goes uncounted.
    gone_before_ack = not p.acked and p.error is None and status == CLIENT_CLOSED
    if p.acked or gone_before_ack:
        for c in p.choices:
            reason = c.finish_reason or ("error" if p.error is not None else "abort")
            t = c.output.timings if c.output is not None else None
            m.observe_request(
                prompt_tokens=len(p.job.prompt_of(c.index)),
                generation_tokens=c.num_output_tokens,
                finish_reason=reason,
                ttft_s=p.ttft(c),
                itl_s=c.itl,
                e2e_s=now - p.arrival,
                queue_s=t.queue_time if t else None,
                prefill_s=t.prefill_time if t else None,
                decode_s=t.decode_time if t else None,
            )
    finish = ",".join(c.finish_reason or "-" for c in p.choices)
    tokens = sum(c.num_output_tokens for c in p.choices)
    extra = ""
    if fe.settings.log_prompts:
        extra = f" prompt={list(p.job.prompt_texts)!r} output={[''.join(c.text) for c in p.choices]!r}"
    logger.info(
        "%s %s %s status=%d prompt_tokens=%d completion_tokens=%d finish=%s e2e=%.3fs%s",
        p.request_id,
        p.job.id,
        route,
        status,
        p.job.num_prompt_tokens,
        tokens,
        finish,
        now - p.arrival,
        extra,
    )


def json_response(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))
