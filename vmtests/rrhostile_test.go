package vmtests

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// rrHoarder is a round-robin worker program for testRoundRobinHostile:
// the first process of worker 1 says HELLO, reads every connection it is
// sent and never acknowledges one, and ignores SIGTERM; every other
// process (and worker 1's replacement) execs the Go example. The marker
// lives in the service's private /tmp (DynamicUser= implies PrivateTmp=).
const rrHoarder = `#!/usr/bin/python3
"""cohort vmtest: a round-robin worker that hoards its connections."""
import os, signal, socket, struct, time

HELLO_BIN = "/usr/local/lib/cohort-vmtest/cohort-hello"


def notify(state):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


def hoard():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chan = socket.socket(fileno=3)
    if os.environ.get("COHORT_RR_HELLO") == "1":
        chan.send(struct.pack("<BBHI", 1, 5, 0, 0))
    notify("READY=1")
    kept = []
    while True:
        msg, fds, _, _ = socket.recv_fds(chan, 1024, 64)
        if not msg and not fds:
            break
        kept.extend(fds)
    print("hoarder: channel ended, holding %d connections" % len(kept), flush=True)
    while True:
        time.sleep(60)


if os.environ.get("COHORT_WORKER") == "1":
    try:
        os.close(os.open("/tmp/rr-hoarded", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    else:
        hoard()
os.execv(HELLO_BIN, [HELLO_BIN])
`

// testRoundRobinHostile: under systemd, a round-robin worker that reads
// its connections and never acknowledges them (default max_pending = 64)
// holds no client past ack_timeout: a load through the socket gets every
// answer, the journal names the worker, cohort status shows it unhealthy
// while it is stopped (SIGKILL after stop_timeout, since it ignores
// SIGTERM), and its replacement serves its share.
func testRoundRobinHostile(t *testing.T, c *Container) {
	bin := buildHello(t)
	c.Watch(t, "rrh.socket", "rrh.service")
	port := FreePort(t)
	c.CopyFile(t, bin, "/usr/local/lib/cohort-vmtest/cohort-hello", 0o755)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/rr-hoarder.py", []byte(rrHoarder), 0o755)
	c.WriteFile(t, "/etc/cohort/rrh.toml", []byte(fmt.Sprintf(`command = ["/usr/bin/python3", "/usr/local/lib/cohort-vmtest/rr-hoarder.py"]
workers = 2
mode = "round-robin"
ready = "notify"
ack_timeout = "2s"
stop_timeout = "10s"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", "rrh.socket")
	t.Cleanup(func() { c.Exec(t, "systemctl", "stop", "rrh.socket", "rrh.service") })

	// The load starts the service (the first connections wait in the
	// socket's backlog), and worker 1 hoards from its first connection on.
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	const n = 600
	start := time.Now()
	load := StartLoad(t, LoadOptions{URL: url, Requests: n, Duration: 2 * time.Minute, Concurrency: 8, Timeout: 20 * time.Second})
	var unhealthy string
	Eventually(t, 30*time.Second, "cohort status showing the hoarder unhealthy", func() error {
		out := c.Exec(t, "cohort", "status", "rrh").Stdout
		if !strings.Contains(out, "unhealthy") {
			return fmt.Errorf("cohort status rrh:\n%s", out)
		}
		unhealthy = out
		return nil
	})
	t.Logf("while the hoarder is stopped:\n%s", unhealthy)
	select {
	case <-load.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("the load did not finish")
	}
	res, kinds := load.Stop()
	t.Logf("%s with a worker that never acknowledges (ack_timeout 2s): %s; failures: %s", c.Release.Name, res, kinds)
	if res.Failed() > 0 || res.OK != n {
		t.Errorf("%d of %d requests failed (%s), want 0", res.Failed(), n, kinds)
	}
	t.Logf("the load took %v", time.Since(start).Round(time.Millisecond))

	c.WaitJournal(t, 10*time.Second, "left a connection unacknowledged for ack_timeout (2s); stopping it", "-u", "rrh.service")
	// SIGKILL follows the stop by stop_timeout (10s), and the stop may
	// come as late as the end of the load: 10s from here was a coin toss.
	c.WaitJournal(t, 25*time.Second, "sending SIGKILL", "-u", "rrh.service")
	Eventually(t, 30*time.Second, "the hoarder replaced", func() error {
		if got := c.Property(t, "rrh.service", "StatusText"); got != "2/2 workers ready · gen 1 · round-robin · 1 restart" {
			return fmt.Errorf("rrh.service StatusText=%q", got)
		}
		return nil
	})
	more, failed, first := spreadRequests(url, 100, 1)
	if failed > 0 || more["0"] != 50 || more["1"] != 50 {
		t.Errorf("100 sequential requests after the replacement: %v, %d failed (%v); want 50 per worker", more, failed, first)
	}
}
