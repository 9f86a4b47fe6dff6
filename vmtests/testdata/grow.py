#!/usr/bin/python3
"""A worker for the recycle scenario (stdlib only) that grows on request.

    command = ["/usr/bin/python3", "grow.py"]
    ready = "notify"

It takes the socket at fd 3 as an unmodified socket-activated program
does, sends READY=1, then serves one connection at a time: "GET /grow?mb=N"
makes it hold N MiB more (every page written, so resident), any other GET
is answered "worker I pid P". SIGTERM stops it between two connections
(blocked and polled with sigpending), so every connection it accepted is
answered: what a graceful stop must do.
"""
import os
import re
import select
import signal
import socket
import sys

STOP = {signal.SIGTERM, signal.SIGINT}
WORKER = os.environ.get("COHORT_WORKER", "-")
held = []


def sd_notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        if path.startswith("@"):
            path = "\0" + path[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), path)


def serve(conn):
    conn.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk or len(head) > 65536:
            return
        head += chunk
    m = re.match(rb"GET /grow\?mb=([0-9]{1,4}) ", head)
    if m:
        mb = int(m.group(1))
        held.append(b"\x01" * (mb << 20))
        body = f"grown worker {WORKER} pid {os.getpid()} by {mb} MiB\n"
    else:
        body = f"worker {WORKER} pid {os.getpid()}\n"
    body = body.encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 + f"Content-Length: {len(body)}\r\n".encode()
                 + b"Connection: close\r\n\r\n" + body)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):
        pass


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("grow.py: no socket passed (LISTEN_FDS/LISTEN_PID)", file=sys.stderr)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
    ls = socket.socket(fileno=3)
    ls.setblocking(False)  # shared with the other workers
    print(f"grow.py: worker {WORKER} (pid {os.getpid()}) serving", flush=True)
    sd_notify("READY=1")
    while not STOP & signal.sigpending():
        readable, _, _ = select.select([ls], [], [], 0.1)
        if not readable:
            continue
        try:
            conn, _ = ls.accept()
        except BlockingIOError:
            continue  # another worker took it
        with conn:
            try:
                serve(conn)
            except OSError as e:
                print(f"grow.py: connection: {e}", flush=True)
    print(f"grow.py: worker {WORKER} (pid {os.getpid()}) stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
