"""A user-space link emulator: a TCP proxy on loopback with a round-trip delay and a rate cap.

    python bench/linkproxy.py --target HOST:PORT [--listen 127.0.0.1:0] [--delay 10ms]
        [--rate 200Mbit] [--burst 64KiB] [--queue 500KB] [--window 4MiB]

Prints ``HOST:PORT`` it listens on as its first line on stdout, then forwards every connection
to the target until SIGTERM or SIGINT, and prints one JSON line (connections, bytes each way,
CPU seconds).  ``benchlib.link_process()`` starts and stops it.  For the benchmarks, since the
kernel's netem is not available here (issue 19).

Each direction is one ``Link`` shared by all connections: a token bucket of ``--rate`` (bytes
leave it no faster; ``--burst`` bytes may pass at once after a pause) in front of a fixed
one-way ``--delay``.  The delay is latency, not a pause of the sender: each chunk read is
stamped with the time it arrives at the far end (when the bucket lets it through, plus the
delay) and written then, while the next chunks are already being read and stamped, so a
transfer has a round trip of 2 x delay and still fills the rate.  The bucket's queue
(``--queue``, bytes waiting for the bucket; about the bandwidth-delay product by default) and
each connection's bytes in flight (``--window``, like a TCP receive window) are bounded: the
proxy then stops reading, and the sender's own TCP waits.  A new connection waits one round
trip before its first byte is forwarded, as a TCP handshake over the link would.

An ideal link: no loss, no reordering, no slow start; a real one of the same delay and rate
does no better.  The rate counts TCP payload bytes (HTTP and multipart included).

SIGUSR1 cuts the link: every connection through it is aborted at once (both ends see it
closed), and a new one is closed as soon as it is accepted, until SIGUSR2 mends it (the
tests cut one stowd node off its database this way: tests/test_fleet_nodes.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import signal
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

READ_SIZE = 64 * 1024
STREAM_LIMIT = 256 * 1024
UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_rate(text: str) -> float:
    """Bytes per second from ``200Mbit``, ``1Gbit``, ``25MB`` (per second), ``3MiB``."""
    found = re.fullmatch(r"\s*([\d.]+)\s*([kmgKMG]i?)?(bit|b|B)?(/s|ps)?\s*", text)
    if not found:
        raise ValueError(f"not a rate: {text!r} (e.g. 200Mbit, 25MB)")
    number, prefix, unit = float(found[1]), (found[2] or "").lower(), found[3] or "B"
    scale = UNITS[prefix] / (8 if unit in ("bit", "b") else 1)
    return number * scale


def parse_size(text: str) -> int:
    """Bytes from ``64KiB``, ``500KB``, ``4MiB``, ``1000``."""
    found = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]i?)?B?\s*", text)
    if not found:
        raise ValueError(f"not a size: {text!r} (e.g. 64KiB, 500KB)")
    return int(int(found[1]) * UNITS[(found[2] or "").lower()])


def parse_delay(text: str) -> float:
    """Seconds from ``10ms``, ``0.01s``, ``250us``."""
    found = re.fullmatch(r"\s*([\d.]+)\s*(us|ms|s)?\s*", text)
    if not found:
        raise ValueError(f"not a delay: {text!r} (e.g. 10ms)")
    return float(found[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[found[2] or "s"]


@dataclass
class Link:
    """One direction of the link: a token bucket (``rate`` bytes/s, ``burst`` bytes deep) in
    front of a fixed one-way ``delay`` (s), shared by every connection.  Pure arithmetic on
    the times it is given (the generic cell rate algorithm: ``busy_until`` is the theoretical
    time at which the bucket has let through every byte handed to it at its rate)."""

    rate: float
    delay: float
    burst: int = 0
    queue: int = 0  # bytes that may wait for the bucket before senders are held back
    busy_until: float = 0.0
    bytes: int = 0

    def send(self, size: int, now: float) -> float:
        """Hand *size* bytes to the link at *now*; return when they reach the far end."""
        self.busy_until = max(self.busy_until, now) + size / self.rate
        self.bytes += size
        leaves = max(now, self.busy_until - self.burst / self.rate)
        return leaves + self.delay

    def wait_before_send(self, now: float) -> float:
        """Seconds to wait before handing more bytes: 0 unless more than ``queue`` bytes
        already wait for the bucket."""
        waiting = (self.busy_until - now) * self.rate - self.burst
        return max(0.0, (waiting - self.queue) / self.rate)


@dataclass
class Pipe:
    """One direction of one connection: chunks stamped with their arrival time, in order."""

    link: Link
    window: int
    chunks: deque[tuple[float, bytes]] = field(default_factory=deque)
    in_flight: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a chunk was added
    room: asyncio.Event = field(default_factory=asyncio.Event)  # in_flight went down


async def pump(source: asyncio.StreamReader, pipe: Pipe, start: float) -> None:
    """Read from *source*, stamp each chunk with its arrival time; b"" marks the end."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - loop.time()))
    while True:
        data = await source.read(READ_SIZE)
        while pipe.in_flight > pipe.window:
            pipe.room.clear()
            await pipe.room.wait()
        wait = pipe.link.wait_before_send(loop.time())
        if wait:
            await asyncio.sleep(wait)
        arrival = pipe.link.send(len(data), loop.time())
        if pipe.chunks:  # never before the chunk ahead of it (the delay is fixed; the order kept)
            arrival = max(arrival, pipe.chunks[-1][0])
        pipe.chunks.append((arrival, data))
        pipe.in_flight += len(data)
        pipe.arrived.set()
        if not data:
            return


async def deliver(pipe: Pipe, target: asyncio.StreamWriter) -> None:
    """Write each chunk to *target* when it arrives; half-close *target* at the end."""
    loop = asyncio.get_running_loop()
    while True:
        while not pipe.chunks:
            pipe.arrived.clear()
            await pipe.arrived.wait()
        arrival, data = pipe.chunks.popleft()
        await asyncio.sleep(max(0.0, arrival - loop.time()))
        if not data:
            if target.can_write_eof():
                target.write_eof()
            return
        target.write(data)
        await target.drain()
        pipe.in_flight -= len(data)
        pipe.room.set()


@dataclass
class Proxy:
    target: tuple[str, int]
    up: Link  # client to target
    down: Link  # target to client
    window: int
    connections: int = 0
    cut: bool = False  # SIGUSR1 .. SIGUSR2: every connection is closed at once
    open: set[asyncio.StreamWriter] = field(default_factory=set)  # both ends of each

    def cut_all(self) -> None:
        """Cut the link: abort every connection through it; refuse new ones until mended."""
        self.cut = True
        for writer in list(self.open):
            writer.transport.abort()

    def mend(self) -> None:
        self.cut = False

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.cut:
            client_w.transport.abort()
            return
        self.connections += 1
        loop = asyncio.get_running_loop()
        start = loop.time() + 2 * self.up.delay  # the handshake's round trip
        try:
            server_r, server_w = await asyncio.open_connection(*self.target, limit=STREAM_LIMIT)
        except OSError:
            client_w.close()
            return
        if self.cut:  # cut while connecting
            client_w.transport.abort()
            server_w.transport.abort()
            return
        self.open.update((client_w, server_w))
        up, down = Pipe(self.up, self.window), Pipe(self.down, self.window)
        tasks = [
            asyncio.create_task(pump(client_r, up, start)),
            asyncio.create_task(deliver(up, server_w)),
            asyncio.create_task(pump(server_r, down, start)),
            asyncio.create_task(deliver(down, client_w)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.CancelledError):
            pass  # a connection reset; or the proxy stopping (asyncio.run cancels this task)
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_w, server_w):
                self.open.discard(writer)
                writer.close()


def _stopper(stop: asyncio.Future[None]) -> Callable[[], None]:
    def handler() -> None:
        if not stop.done():
            stop.set_result(None)

    return handler


async def serve(args: argparse.Namespace) -> Proxy:
    host, _, port = args.target.rpartition(":")
    delay = parse_delay(args.delay)
    rate, burst, queue = parse_rate(args.rate), parse_size(args.burst), parse_size(args.queue)
    proxy = Proxy(
        (host, int(port)),
        Link(rate, delay, burst, queue),
        Link(rate, delay, burst, queue),
        parse_size(args.window),
    )
    listen_host, _, listen_port = args.listen.rpartition(":")
    server = await asyncio.start_server(
        proxy.handle, listen_host, int(listen_port), limit=STREAM_LIMIT, backlog=128
    )
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(stop))
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut_all)
    loop.add_signal_handler(signal.SIGUSR2, proxy.mend)
    print(f"{listen_host}:{server.sockets[0].getsockname()[1]}", flush=True)  # then signals work
    await stop
    server.close()
    return proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default a free port)")
    parser.add_argument("--delay", default="10ms", help="one-way delay (default 10ms: 20 ms RTT)")
    parser.add_argument("--rate", default="200Mbit", help="per direction (default 200Mbit)")
    parser.add_argument("--burst", default="64KiB", help="token bucket depth (default 64KiB)")
    parser.add_argument(
        "--queue", default="500KB", help="bytes waiting for the bucket before reads stop"
    )
    parser.add_argument("--window", default="4MiB", help="bytes in flight per connection")
    args = parser.parse_args(argv)
    proxy = asyncio.run(serve(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "connections": proxy.connections,
        "bytes_up": proxy.up.bytes,
        "bytes_down": proxy.down.bytes,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
