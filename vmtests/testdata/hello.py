#!/usr/bin/python3
"""A cohort worker in plain Python (stdlib only): serves HTTP on the
listening socket it inherits as fd 3 (LISTEN_FDS), and answers every GET
with its worker index and pid."""
import http.server
import os
import socket
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "worker %s pid %d\n" % (os.environ.get("COHORT_WORKER", "?"), os.getpid())
        body = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("hello.py: no socket from LISTEN_FDS/LISTEN_PID")
    srv = Server(("", 0), Handler, bind_and_activate=False)
    srv.socket.close()
    srv.socket = socket.socket(fileno=3)
    print("hello.py: worker %s serving" % os.environ.get("COHORT_WORKER", "?"), flush=True)
    srv.serve_forever()


main()
