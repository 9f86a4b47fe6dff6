package vmtests

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// steerWorker is a worker that tries to steer its own dispatcher through
// the control socket next to its $NOTIFY_SOCKET (issue 14 item 6): worker
// 0 of generation 1 tries scale and reload (a raw request) itself, from a grandchild, and
// from a daemon it double-forks and detaches with setsid; worker 1 starts
// a hog that holds as many control connections as it can. Then each execs
// the hello server. The results are journal lines "steer: …".
const steerWorker = `#!/bin/sh
sock="$(dirname "$NOTIFY_SOCKET")/control.sock"
if [ "$COHORT_WORKER" = 0 ] && [ "$COHORT_GENERATION" = 1 ]; then
	out=$(cohort scale --socket "$sock" steer 1 2>&1); echo "steer: worker scale exit $? $out"
	out=$(python3 /usr/local/lib/cohort-vmtest/ctl.py "$sock" '{"cmd":"reload"}' 2>&1); echo "steer: worker reload exit $? $out"
	out=$(sh -c 'cohort scale --socket "$1" steer 1 2>&1' sh "$sock"); echo "steer: grandchild scale exit $? $out"
	( setsid sh -c 'sleep 1; out=$(cohort scale --socket "$1" steer 1 2>&1); echo "steer: orphan scale exit $? ppid $(ps -o ppid= -p $$ | tr -d " ") $out"; touch /tmp/steer-done' sh "$sock" & )
	cohort status --socket "$sock" steer >/dev/null 2>&1; echo "steer: worker status exit $?"
fi
if [ "$COHORT_WORKER" = 1 ]; then
	python3 /usr/local/lib/cohort-vmtest/hog.py "$sock" &
fi
exec /usr/local/lib/cohort-vmtest/cohort-hello
`

// ctlScript sends one request line (argv[2]) to the control socket
// (argv[1]) and prints the reply; it exits 1 unless the reply is ok. (A
// reload through cohort dispatch-reload would stop earlier, at the
// snapshot a worker may not write.)
const ctlScript = `import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
line = s.makefile().readline().strip()
print(line)
sys.exit(0 if '"ok":true' in line else 1)
`

// hogScript waits for worker 0's attempts, opens 64 control connections, keeps every one that answers
// busy with a status request a second (so no idle bound frees it), and
// says how many it holds.
const hogScript = `import os, socket, sys, time
# After worker 0's attempts (PrivateTmp= gives the service's processes
# one /tmp of their own), so that they meet the permission check rather
# than a full pool.
for i in range(300):
    if os.path.exists("/tmp/steer-done"):
        break
    time.sleep(0.1)
held = []
for i in range(64):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(sys.argv[1])
        f = s.makefile("rw")
        f.write('{"cmd":"status"}\n'); f.flush()
        if '"ok":true' in f.readline():
            held.append(f)
            continue
    except OSError:
        pass
    s.close()
print("steer: hog %d holds %d of 64" % (os.getpid(), len(held)), flush=True)
while True:
    time.sleep(1)
    for f in held:
        try:
            f.write('{"cmd":"status"}\n'); f.flush(); f.readline()
        except OSError:
            pass
`

// testControl: under systemd, a worker (and its grandchild, and a setsid
// daemon it detached) is refused when it tries to scale or reload its own
// app through the control socket, and `systemctl reload`, `cohort scale`
// and `cohort status` still work while a worker holds all the connections
// it can get.
func testControl(t *testing.T, c *Container) {
	const app = "steer"
	c.Watch(t, app+".socket", app+".service")
	installHello(t, c, "/usr/local/lib/cohort-vmtest/cohort-hello")
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/steer.sh", []byte(steerWorker), 0o755)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/hog.py", []byte(hogScript), 0o644)
	c.WriteFile(t, "/usr/local/lib/cohort-vmtest/ctl.py", []byte(ctlScript), 0o644)
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = ["/usr/local/lib/cohort-vmtest/steer.sh"]
workers = 3
ready = "notify"
ready_timeout = "30s"
stop_timeout = "10s"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", app+".socket", app+".service")
	c.WaitJournal(t, 30*time.Second, "all 3 workers ready", "-u", app+".service")
	hog := c.WaitJournal(t, 20*time.Second, "steer: hog", "-u", app+".service", "-o", "cat")
	c.WaitJournal(t, 20*time.Second, "steer: orphan scale", "-u", app+".service", "-o", "cat")
	mainPID := c.Property(t, app+".service", "MainPID")

	lines := map[string]string{}
	for _, l := range strings.Split(c.Journal(t, "-u", app+".service", "-o", "cat"), "\n") {
		if rest, ok := strings.CutPrefix(l, "steer: "); ok {
			who, _, _ := strings.Cut(rest, " exit")
			lines[who] = rest
			t.Logf("%s", l)
		}
	}
	for _, who := range []string{"worker scale", "worker reload", "grandchild scale", "orphan scale"} {
		if l := lines[who]; !strings.Contains(l, "exit 1 ") || !strings.Contains(l, "changes the dispatcher's state") {
			t.Errorf("%s: %q; want exit 1 and the control socket's refusal", who, l)
		}
	}
	if l := lines["orphan scale"]; !strings.Contains(l, "ppid "+mainPID+" ") {
		t.Errorf("the detached daemon was not adopted by the dispatcher (MainPID %s): %q", mainPID, l)
	}
	if l := lines["worker status"]; l != "worker status exit 0" {
		t.Errorf("worker status: %q; want exit 0", l)
	}

	status := func() statusJSON {
		t.Helper()
		var st statusJSON
		out := c.Run(t, "cohort", "status", "--json", app)
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("cohort status --json: %v\n%s", err, out)
		}
		return st
	}
	if st := status(); st.Generation != 1 || len(st.Workers) != 3 {
		t.Fatalf("the workers changed what runs: generation %d, %d workers", st.Generation, len(st.Workers))
	}

	// The operator, while the hog holds its connections: systemctl reload
	// (ExecReload= runs cohort dispatch-reload, no descendant of the
	// dispatcher), then cohort scale as root.
	start := time.Now()
	res := c.Exec(t, "systemctl", "reload", app)
	t.Logf("with %q: systemctl reload: exit %d after %v %s", hog, res.Code, time.Since(start).Round(time.Millisecond), strings.TrimSpace(res.Stderr))
	if res.Code != 0 {
		t.Errorf("systemctl reload while a worker hogs the control socket: %s", res)
	}
	if st := status(); st.Generation != 2 || len(st.Workers) != 3 {
		t.Errorf("after the reload: generation %d, %d workers; want 2, 3", st.Generation, len(st.Workers))
	}
	// The new worker 1 starts a new hog; scale while it holds.
	c.WaitJournal(t, 20*time.Second, "steer: hog", "-u", app+".service", "-o", "cat", "COHORT_GENERATION=2")
	c.Run(t, "cohort", "scale", app, "2")
	Eventually(t, 20*time.Second, "2 workers after cohort scale", func() error {
		if n := len(status().Workers); n != 2 {
			return fmt.Errorf("%d workers", n)
		}
		return nil
	})
	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
}
