"""A WSGI app for the gunicorn test of ready = "listening"."""
import os


def app(environ, start_response):
    body = ("hello from gunicorn worker %s (pid %d, gen %s)\n" % (
        os.environ.get("COHORT_WORKER", "-"), os.getpid(), os.environ.get("COHORT_GENERATION", "-"))).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
