#!/usr/bin/env python3
"""A cohort worker in plain Python 3 (stdlib only): an HTTP "hello" server.

It runs unchanged in every cohort mode, and without cohort:

* shared mode, or plain systemd socket activation: the listening socket named
  "http" is inherited through LISTEN_FDS/LISTEN_FDNAMES (fds 3, 4, ...) and
  this worker accepts on it;
* round-robin mode: the fd named "cohort-rr" is a unix SOCK_SEQPACKET socket
  on which the dispatcher sends accepted connections with SCM_RIGHTS
  (docs/protocol.md); this worker says HELLO when asked to
  (COHORT_RR_HELLO=1), takes the connections for the listener named "http"
  in COHORT_RR_LISTENERS, acknowledges them, and reports them closed;
* not activated: it listens on the address given as its argument
  (default 127.0.0.1:8080).

Every answer is "hello from worker N", N being $COHORT_WORKER.
"""

import os
import signal
import socket
import struct
import sys

# The round-robin protocol, version 1 (docs/protocol.md). Little-endian.
VERSION = 1
CONNS, ACK, CLOSED, REJECT, HELLO = 1, 2, 3, 4, 5
HEADER = struct.Struct("<BBHI")  # version, type, count, reserved (0)
ENTRY = struct.Struct("<QHHI")  # connection id, listener index, 0, 0
MAX_FDS = 32  # connections per CONNS message
MAX_IDS = 256  # ids per ACK, CLOSED or REJECT message
RR_NAME = "cohort-rr"


def inherit():
    """Return {name: [fd, ...]} of the sockets passed to this process."""
    pid, n = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)  # children must not inherit them
    if pid != str(os.getpid()) or not n:
        return {}
    fds = {}
    for i in range(int(n)):
        fd = 3 + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        fds.setdefault(name, []).append(fd)
    return fds


def notify(state):
    """Send an sd_notify message (READY=1, STOPPING=1, ...) if asked for."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), addr)


def answer(conn):
    """Read one HTTP request and answer it; the caller closes conn."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    body = ("hello from worker %s\n" % os.environ.get("COHORT_WORKER", "?")).encode()
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )


def serve(conn):
    try:
        answer(conn)
    except OSError as e:
        print("connection: %s" % e, file=sys.stderr)
    finally:
        # In round-robin mode the dispatcher holds a copy of the socket
        # until it reads the ACK (up to 1 ms late): close() alone would
        # leave the client waiting for the FIN until then.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()


def send_ids(chan, typ, ids):
    """Send ids as ACK, CLOSED or REJECT messages of at most MAX_IDS ids."""
    for i in range(0, len(ids), MAX_IDS):
        batch = ids[i : i + MAX_IDS]
        chan.send(HEADER.pack(VERSION, typ, len(batch), 0) + struct.pack("<%dQ" % len(batch), *batch))


def parse_conns(msg, nfds):
    """Return [(id, listener index)] of a CONNS message, or raise ValueError."""
    if len(msg) < HEADER.size:
        raise ValueError("short message (%d bytes)" % len(msg))
    version, typ, count, reserved = HEADER.unpack_from(msg)
    if version != VERSION or typ != CONNS or reserved != 0:
        raise ValueError("version %d type %d" % (version, typ))
    if not 1 <= count <= MAX_FDS or len(msg) != HEADER.size + count * ENTRY.size or nfds != count:
        raise ValueError("count %d, %d bytes, %d fds" % (count, len(msg), nfds))
    entries = []
    for i in range(count):
        cid, index, r1, r2 = ENTRY.unpack_from(msg, HEADER.size + i * ENTRY.size)
        if r1 or r2:
            raise ValueError("reserved bytes of entry %d" % i)
        entries.append((cid, index))
    return entries


def round_robin(chan_fd, want, hello):
    """Serve connections for listener index want until the dispatcher goes."""
    chan = socket.socket(fileno=chan_fd)  # AF_UNIX, SOCK_SEQPACKET
    if hello:
        # The dispatcher asked (COHORT_RR_HELLO=1): say that we speak the
        # protocol before anything else, so that it sends us more than one
        # connection at a time and knows we are no program that ignores it.
        chan.send(HEADER.pack(VERSION, HELLO, 0, 0))
    notify("READY=1")
    bufsize = HEADER.size + MAX_FDS * ENTRY.size + 1  # +1 to notice a longer message
    while True:
        msg, fds, flags, _ = socket.recv_fds(chan, bufsize, MAX_FDS + 1, socket.MSG_CMSG_CLOEXEC)
        try:
            if not msg and not fds:
                return 0  # the dispatcher closed the channel
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("truncated message (flags %#x)" % flags)
            entries = parse_conns(msg, len(fds))
        except ValueError as e:
            for fd in fds:  # never leak an fd we did not take
                os.close(fd)
            print("round-robin protocol error: %s" % e, file=sys.stderr)
            return 1  # closing the channel: the dispatcher re-sends what we had
        taken, rejected = [], []
        for (cid, index), fd in zip(entries, fds):
            if index == want:
                taken.append((cid, socket.socket(fileno=fd)))
            else:
                os.close(fd)
                rejected.append(cid)
        # Acknowledge before using them: from now on the dispatcher will
        # not hand them to anyone else. If the ACK cannot be sent, the
        # dispatcher took them back (we were too slow) or is gone: they are
        # not ours to serve.
        try:
            send_ids(chan, ACK, [cid for cid, _ in taken])
            send_ids(chan, REJECT, rejected)
        except OSError as e:
            for _, conn in taken:
                conn.close()
            print("round-robin channel: %s" % e, file=sys.stderr)
            return 1
        for _, conn in taken:
            serve(conn)
        try:
            send_ids(chan, CLOSED, [cid for cid, _ in taken])
        except OSError as e:
            print("round-robin channel: %s" % e, file=sys.stderr)
            return 1


def shared(sock):
    notify("READY=1")
    while True:
        conn, _ = sock.accept()
        serve(conn)


def main():
    def stop(signum, frame):
        notify("STOPPING=1")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    fds = inherit()
    rr_names = os.environ.pop("COHORT_RR_LISTENERS", "").split(":")
    hello = os.environ.pop("COHORT_RR_HELLO", "") == "1"
    if "http" in fds:
        return shared(socket.socket(fileno=fds["http"][0]))
    if RR_NAME in fds and "http" in rr_names:
        return round_robin(fds[RR_NAME][0], rr_names.index("http"), hello)
    if fds:
        print("no socket named http in LISTEN_FDNAMES", file=sys.stderr)
        return 2
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080").rpartition(":")
    return shared(socket.create_server((host, int(port))))


if __name__ == "__main__":
    sys.exit(main())
