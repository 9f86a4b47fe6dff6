#!/usr/bin/env python3
"""A test worker for ready = "listening": serves HTTP on the socket passed at
fd 3 and never sends READY=1, so only the dispatcher's /proc probe can tell
when it accepts. How it waits for connections (argv[1]):

    blocking  accept() in a loop on a blocking socket (accept4)
    select    select.select() on the listener, then accept
    poll      select.poll() on the listener, then accept
    asyncio   asyncio.start_server (epoll)

Environment: START_DELAY=seconds sleeps before listening (a slow start);
DIE_AFTER=seconds exits 3 that long after it started listening (a crash
just after start); in the select and poll modes it dies between two
connections, since a request a worker holds when it crashes is lost under
any supervisor and a test of the reload's report must not count it. SIGTERM stops it gracefully in the select and poll
modes (it finishes the connection it serves; the others wake up every
100 ms to look), at once in the others. Standard library only.
"""
import asyncio
import os
import select
import signal
import socket
import sys
import threading
import time

BODY = "hello from python worker %s (pid %d, gen %s)\n" % (
    os.environ.get("COHORT_WORKER", "-"), os.getpid(), os.environ.get("COHORT_GENERATION", "-"))
RESPONSE = ("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)).encode()


def answer(conn):
    with conn:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(RESPONSE)


def die():
    print("dying on purpose", flush=True)
    os._exit(3)


def die_later():
    """Arms DIE_AFTER as a timer that kills the process wherever it is."""
    after = os.environ.get("DIE_AFTER")
    if after:
        threading.Timer(float(after), die).start()


def die_at():
    """Returns when DIE_AFTER falls due (monotonic seconds), or None."""
    after = os.environ.get("DIE_AFTER")
    return time.monotonic() + float(after) if after else None


def main():
    how = sys.argv[1]
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        print("server.py: no socket passed", file=sys.stderr)
        return 1
    stopping = []
    if how in ("select", "poll"):
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    delay = float(os.environ.get("START_DELAY", "0"))
    if delay:
        threading.Event().wait(delay)
    lst = socket.socket(fileno=3)
    print("listening (%s)" % how, flush=True)
    if how in ("select", "poll"):
        deadline = die_at()
    else:
        die_later()
    if how == "asyncio":
        async def handle(reader, writer):
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(RESPONSE)
            await writer.drain()
            writer.close()

        async def serve():
            server = await asyncio.start_server(handle, sock=lst)
            async with server:
                await server.serve_forever()
        asyncio.run(serve())
        return 0
    if how == "blocking":
        lst.setblocking(True)
        while True:
            conn, _ = lst.accept()
            answer(conn)
    lst.setblocking(False)  # shared: another worker may win the connection
    poller = select.poll()
    poller.register(lst, select.POLLIN)
    while not stopping:
        if deadline is not None and time.monotonic() >= deadline:
            die()
        if how == "select":
            select.select([lst], [], [], 0.1)
        else:
            poller.poll(100)
        try:
            conn, _ = lst.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        answer(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
