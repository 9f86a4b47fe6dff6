#!/usr/bin/python3
"""The logflood scenario's worker (stdlib only). Worker 0 floods stdout
with fixed-size lines at about RATE lines/s (paced, so that it does not
take a whole CPU more than the scenario needs); every other worker writes
a numbered mark line every 50 ms, "mark <pid> <n>", so that a lost line
shows as a gap. SIGTERM ends either at once."""
import os
import signal
import sys
import time

RATE = 200000   # lines/s worker 0 aims at
BLOCK = 2000    # lines per write
LINE = 64       # bytes per line, newline included: the test turns wchar into lines


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pid = os.getpid()
    if os.environ.get("COHORT_WORKER") == "0":
        line = (b"flood %d " % pid).ljust(LINE - 1, b"x") + b"\n"
        block = line * BLOCK
        start, n = time.monotonic(), 0
        while True:
            os.write(1, block)
            n += BLOCK
            ahead = n / RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    n = 0
    while True:
        os.write(1, b"mark %d %d\n" % (pid, n))
        n += 1
        time.sleep(0.05)


main()
