"""Round-trip latency between two processes: the service's channel against ZeroMQ.

    python -m bench.wire_latency --messages 2000

One process sends a message and waits for its echo; the other echoes from an asyncio event loop
(uvloop when installed), as an HTTP process does. Two transports: service.process.wire's
channel (the worker's ``EngineChannel``, an HTTP process's ``FrontendChannel`` on a Unix socket),
and ZeroMQ PUSH/PULL sockets over ``ipc://`` with pyzmq's asyncio sockets on the echoing side
(what the channel used before; pyzmq comes with LitServe). The same messages, pickled, both ways:
an ``Ack`` out, an ``Abort`` back. Prints p50, p90 and p99 in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import time

from service.process.wire import Abort, Ack, EngineChannel, FrontendChannel, new_channel_id


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _stats(name: str, rtt_us: list[float]) -> str:
    rtt_us.sort()
    q = lambda p: rtt_us[min(len(rtt_us) - 1, int(p * len(rtt_us)))]  # noqa: E731
    return f"{name:28s} round trip p50 {q(0.5):7.1f} µs  p90 {q(0.9):7.1f}  p99 {q(0.99):7.1f}"


def wire_round_trips(n: int) -> list[float]:
    channel_id = new_channel_id()
    engine = EngineChannel(channel_id)
    pid = os.fork()
    if pid == 0:  # the HTTP process's side: echo every event list back as an abort

        async def echo() -> None:
            front = FrontendChannel(channel_id, 0)
            for _ in range(n + 1):
                events = await front.receive()
                front.send(Abort(0, events[0].uid))
            await asyncio.sleep(0.2)

        _run(echo())
        os._exit(0)
    rtt = []
    try:
        while not engine._by_rqid:  # the echo process has connected and said hello
            engine.receive(0.01, 1)
        for k in range(n + 1):
            t = time.perf_counter()
            engine.send(0, [Ack(f"m{k}")])
            while not engine.receive(1.0, 1):
                pass
            if k:  # the first one warms both sides up
                rtt.append((time.perf_counter() - t) * 1e6)
    finally:
        os.waitpid(pid, 0)
        engine.close()
    return rtt


def zmq_round_trips(n: int) -> list[float]:
    import zmq

    tag = new_channel_id()
    pid = os.fork()
    if pid == 0:

        async def echo() -> None:
            import zmq.asyncio

            ctx = zmq.asyncio.Context()
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            pull.bind(f"ipc://@wire-latency-{tag}-in")
            push.connect(f"ipc://@wire-latency-{tag}-out")
            for _ in range(n + 1):
                events = pickle.loads(await pull.recv())
                push.send(pickle.dumps(Abort(0, events[0].uid), protocol=pickle.HIGHEST_PROTOCOL))
            await asyncio.sleep(0.2)
            ctx.destroy(linger=0)

        _run(echo())
        os._exit(0)
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(f"ipc://@wire-latency-{tag}-in")
    pull.bind(f"ipc://@wire-latency-{tag}-out")
    rtt = []
    try:
        for k in range(n + 1):
            t = time.perf_counter()
            push.send(pickle.dumps([Ack(f"m{k}")], protocol=pickle.HIGHEST_PROTOCOL))
            pickle.loads(pull.recv())
            if k:
                rtt.append((time.perf_counter() - t) * 1e6)
    finally:
        os.waitpid(pid, 0)
        ctx.destroy(linger=0)
    return rtt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wire_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000, help="round trips per transport (default: 2000)")
    args = p.parse_args(argv)
    if args.messages < 1:
        p.error(f"--messages must be >= 1, got {args.messages}")
    print(_stats("service channel (Unix socket)", wire_round_trips(args.messages)))
    print(_stats("ZeroMQ ipc, asyncio", zmq_round_trips(args.messages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
