#!/usr/bin/env python3
"""A cohort worker in plain Python: serves HTTP on the socket cohort (or
systemd) passed at fd 3, in shared mode.

    command = ["python3", "/path/to/shared_worker.py"]
    ready = "notify"

It checks LISTEN_PID like sd_listen_fds(3), sends READY=1 to NOTIFY_SOCKET
once it serves, and stops gracefully on SIGTERM (the request in flight is
answered first). Standard library only.
"""
import http.server
import os
import signal
import socket
import sys
import threading

SD_LISTEN_FDS_START = 3


def listen_fds():
    """The sockets passed by socket activation, as socket objects."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(n)]


def sd_notify(state):
    """Send state to NOTIFY_SOCKET, if there is one (sd_notify(3))."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), path)


WORKER = os.environ.get("COHORT_WORKER", "-")
GEN = os.environ.get("COHORT_GENERATION", "-")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"hello from python worker {WORKER} (pid {os.getpid()}, gen {GEN})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # let requests in flight finish on shutdown


def main():
    socks = listen_fds()
    if not socks:
        print("shared_worker.py: no socket passed (LISTEN_FDS/LISTEN_PID)", file=sys.stderr)
        return 1
    server = Server(socks[0].getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socks[0]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"python worker {WORKER} (pid {os.getpid()}) serving", flush=True)
    sd_notify("READY=1\nSTATUS=serving")
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
