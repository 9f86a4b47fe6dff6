#!/usr/bin/env python3
"""A cohort worker in plain Python: serves HTTP on the socket cohort (or
systemd) passed at fd 3, in shared mode.

    command = ["python3", "/path/to/shared_worker.py"]
    ready = "notify"

It checks LISTEN_PID like sd_listen_fds(3), sends READY=1 to NOTIFY_SOCKET
once it serves, and stops gracefully on SIGTERM (or SIGINT): it stops
accepting, answers the requests in flight (with "Connection: close"), closes
idle keep-alive connections and exits 0. Standard library only.

Two things make the stop prompt:

* In shared mode every worker polls the same listening socket, and all of
  them wake up for a new connection that only one gets. The listener is
  therefore made non-blocking (as Go's net package and Node's libuv do with
  an inherited socket), so that the losers' accept() fails with EAGAIN
  (which socketserver ignores) instead of blocking until some later
  connection, deaf to the stop.
* SIGTERM is never handled in a Python signal handler (one that starts a
  thread or takes a lock can deadlock with the code it interrupted): the
  signals are blocked in every thread, and the main thread waits for them
  with sigwait() while another thread runs serve_forever().
"""
import http.server
import os
import signal
import socket
import sys
import threading

SD_LISTEN_FDS_START = 3
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


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
    timeout = 30  # a client that stalls mid-request is dropped

    def handle(self):
        # A connection is idle while it waits for a request: a stop may
        # close it then, never while a request is under way (parse_request
        # marks it busy).
        self.close_connection = False
        while not self.close_connection:
            self.server.set_idle(self.connection, True)
            self.handle_one_request()
            self.server.set_idle(self.connection, False)

    def parse_request(self):
        self.server.set_idle(self.connection, False)
        return super().parse_request()

    def do_GET(self):
        body = f"hello from python worker {WORKER} (pid {os.getpid()}, gen {GEN})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight

    def __init__(self, sock):
        super().__init__(sock.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.socket.setblocking(False)  # see the module's doc
        self.lock = threading.Lock()
        self.idle = set()
        self.stopping = False

    def get_request(self):
        # Raises BlockingIOError when another worker took the connection.
        conn, addr = self.socket.accept()
        conn.setblocking(True)
        return conn, addr

    def set_idle(self, conn, idle):
        """Mark conn idle (waiting for a request) or busy."""
        with self.lock:
            if not idle:
                self.idle.discard(conn)
            elif self.stopping:
                shut_rd(conn)
            else:
                self.idle.add(conn)

    def stop(self):
        """Stop accepting, shut the idle connections for reading (a request
        already received is still read and answered, then the handler reads
        EOF) and wait for the requests in flight."""
        self.shutdown()  # serve_forever runs in another thread
        with self.lock:
            self.stopping = True
            for conn in self.idle:
                shut_rd(conn)
        self.server_close()  # joins the handler threads


def shut_rd(conn):
    try:
        conn.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # the client is gone already


def main():
    socks = listen_fds()
    if not socks:
        print("shared_worker.py: no socket passed (LISTEN_FDS/LISTEN_PID)", file=sys.stderr)
        return 1
    # Before any thread starts, so that every thread inherits the mask and
    # only sigwait() below takes the signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    server = Server(socks[0])
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    serving.start()
    print(f"python worker {WORKER} (pid {os.getpid()}) serving", flush=True)
    sd_notify("READY=1\nSTATUS=serving")
    sig = signal.sigwait(STOP_SIGNALS)
    sd_notify("STOPPING=1")
    print(f"python worker {WORKER} (pid {os.getpid()}) stopping on {signal.Signals(sig).name}", flush=True)
    server.stop()
    serving.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
