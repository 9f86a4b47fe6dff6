"""A WSGI app whose gunicorn worker (the master's child) spins a CPU
from import on, for the status test: cohort's worker is gunicorn's
master, which sleeps."""
import threading
import time


def _spin():
    end = time.time() + 120
    while time.time() < end:
        pass


threading.Thread(target=_spin, daemon=True).start()


def app(environ, start_response):
    body = b"burning\n"
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
