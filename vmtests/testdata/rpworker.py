#!/usr/bin/python3
"""A reuseport-mode worker for the vmtests (stdlib only) that serves one
connection at a time, so that a test knows exactly what it holds when it
dies.

    command = ["/usr/bin/python3", "rpworker.py", "/run/cohort/APP"]
    ready = "notify"

It takes the socket at fd 3 as an unmodified socket-activated program
does (LISTEN_PID must be its own pid, LISTEN_FDS at least 1), logs how
many connections already wait in that socket's accept queue, sends
READY=1, then loops: accept, read the request head, answer
"hello from worker I (pid P, gen G)" with Connection: close, shut down its
side, read until the client's EOF and close. A connection it has
finished is therefore fully answered and closed, nothing unread in it
(so the close sends no RST), before it looks at anything else.

After each connection it looks for the trigger file DIR/kill-I holding a
number N: it then serves N more connections (the one just closed counts
as the first), removes the trigger and kills itself with SIGKILL, at a
moment when it holds no connection. SIGTERM (or SIGINT) stops it between
two connections: the signals are blocked and polled with sigpending(),
never handled in a Python signal handler.
"""
import os
import select
import signal
import socket
import struct
import sys

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
WORKER = os.environ.get("COHORT_WORKER", "-")
GEN = os.environ.get("COHORT_GENERATION", "-")


def log(msg):
    print(f"rpworker: worker {WORKER} (pid {os.getpid()}, gen {GEN}) {msg}", flush=True)


def sd_notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), path)


def queued(ls):
    """The connections waiting in the listening socket's accept queue:
    for a socket in LISTEN state the kernel reports sk_ack_backlog as
    tcp_info.tcpi_unacked (offset 24)."""
    info = ls.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("=I", info, 24)[0]


def serve(conn):
    conn.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            return  # the client gave up before a whole request
        head += chunk
        if len(head) > 65536:
            return
    body = f"hello from worker {WORKER} (pid {os.getpid()}, gen {GEN})\n".encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                 + f"Content-Length: {len(body)}\r\n".encode()
                 + b"Connection: close\r\n\r\n" + body)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):
        pass


def trigger(path):
    """N from the trigger file, or 0 when there is none."""
    try:
        with open(path) as f:
            return max(1, int(f.read().strip() or "1"))
    except FileNotFoundError:
        return 0


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("rpworker: no socket passed (LISTEN_FDS/LISTEN_PID)", file=sys.stderr)
        return 1
    if len(sys.argv) != 2:
        print("usage: rpworker.py TRIGGER-DIR", file=sys.stderr)
        return 2
    kill_file = os.path.join(sys.argv[1], f"kill-{WORKER}")
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    ls = socket.socket(fileno=3)
    ls.setblocking(False)  # a reload's old and new worker share the socket
    log(f"ready on fd 3, {queued(ls)} connections waiting in its socket")
    sd_notify("READY=1")
    left = 0  # connections to serve before the kill; 0: not armed
    served = 0
    while not STOP_SIGNALS & signal.sigpending():
        readable, _, _ = select.select([ls], [], [], 0.1)
        if not readable:
            continue
        try:
            conn, _ = ls.accept()
        except BlockingIOError:
            continue  # the other worker of a reload took it
        with conn:
            try:
                serve(conn)
            except OSError as e:
                log(f"connection: {e}")
        served += 1
        if not left:
            left = trigger(kill_file)
        if left:
            left -= 1
            if not left:
                os.unlink(kill_file)
                log(f"killing itself with SIGKILL after closing connection {served}")
                os.kill(os.getpid(), signal.SIGKILL)
    log(f"stopping after {served} connections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
