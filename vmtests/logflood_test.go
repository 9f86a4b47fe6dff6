package vmtests

import (
	_ "embed"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

//go:embed testdata/logflood.py
var logfloodPy []byte

// floodLine is the length of the flooding worker's lines (LINE in
// logflood.py), newline included.
const floodLine = 64

// testLogFlood (issue 15.1, 15.2): worker 0 floods stdout with ≥ 100k
// lines/s while worker 1 writes numbered marks; through the flood come a
// `systemctl reload`, a SIGKILL of the flooding worker and a `systemctl
// stop`. The dispatcher's own lines of all three must be in the journal:
// the dispatcher's per-worker budget, not journald's per-unit one, decides
// what is dropped, and says so ("lines suppressed"). Worker 1 loses no
// mark. Default `journalctl -u` output names each worker line's worker
// and pid.
func testLogFlood(t *testing.T, c *Container) {
	const app = "logflood"
	unit := app + ".service"
	c.Watch(t, app+".socket", unit)
	script := "/usr/local/lib/cohort-vmtest/logflood.py"
	c.WriteFile(t, script, logfloodPy, 0o755)
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(appFile(fmt.Sprintf(`["/usr/bin/python3", %q]`, script), lifeWorkers,
		"ready = \"exec\"\nready_timeout = \"20s\"\nstop_timeout = \"5s\"\nlog_rate_limit_interval = \"10s\"\nlog_rate_limit_burst = 5000\n", port)), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	// 2 × (2 workers × 5000) + the dispatcher's 1000 + 100 per worker.
	if got := c.Property(t, unit, "LogRateLimitBurst"); got != "21200" {
		t.Errorf("%s: LogRateLimitBurst=%s; want 21200 (sized from the workers' budgets)", unit, got)
	}
	if got := c.Property(t, unit, "LogRateLimitIntervalUSec"); got != "10s" {
		t.Errorf("%s: LogRateLimitIntervalUSec=%s; want 10s", unit, got)
	}
	c.Run(t, "systemctl", "start", app+".socket", unit)
	t.Cleanup(func() { c.Exec(t, "systemctl", "stop", app+".socket", unit) })
	gen1 := waitWorkersReady(t, c, app, lifeWorkers, 20*time.Second)
	dispatcher := mainPID(t, c, app)

	// The flood's rate, from the kernel's count of bytes worker 0 wrote.
	rate := func(pid int) float64 {
		t.Helper()
		wchar := func() (int64, time.Time) {
			out := c.Run(t, "cat", fmt.Sprintf("/proc/%d/io", pid))
			m := regexp.MustCompile(`(?m)^wchar: (\d+)$`).FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("/proc/%d/io has no wchar:\n%s", pid, out)
			}
			n, _ := strconv.ParseInt(m[1], 10, 64)
			return n, time.Now()
		}
		b0, t0 := wchar()
		time.Sleep(time.Second)
		b1, t1 := wchar()
		return float64(b1-b0) / floodLine / t1.Sub(t0).Seconds()
	}
	r := rate(gen1.Workers[0].PID)
	t.Logf("worker 0 (pid %d) writes %.0f lines/s", gen1.Workers[0].PID, r)
	if r < 100000 {
		t.Errorf("worker 0 writes %.0f lines/s; the scenario needs a flood of at least 100000", r)
	}

	// 1. A reload through the flood.
	c.Run(t, "systemctl", "reload", unit)
	gen2 := waitWorkersReady(t, c, app, lifeWorkers, 20*time.Second)
	if gen2.Generation != 2 {
		t.Fatalf("after the reload: generation %d; want 2", gen2.Generation)
	}
	// 2. The flooding worker killed.
	victim := gen2.Workers[0].PID
	c.Run(t, "kill", "-9", strconv.Itoa(victim))
	var gen2b appStatusJSON
	Eventually(t, 20*time.Second, "worker 0 replaced", func() error {
		gen2b = appStatus(t, c, app)
		if w := gen2b.Workers[0]; w.PID == victim || w.PID == 0 || w.State != "ready" {
			return fmt.Errorf("worker 0: %+v (killed pid %d)", w, victim)
		}
		return nil
	})
	time.Sleep(2 * time.Second) // some flood from the new worker 0
	// 3. A stop through the flood.
	c.Run(t, "systemctl", "stop", unit)
	c.Run(t, "journalctl", "--sync")

	want := []string{
		"reloading (control socket): generation 2, 2 workers",
		"reload done in ",
		fmt.Sprintf("worker 0 (pid %d) was killed by signal 9 (killed) after ", victim),
		"stopping (",
		"all workers ended",
	}
	for i, w := range gen1.Workers {
		want = append(want, fmt.Sprintf("worker %d (pid %d, generation 1) ", i, w.PID))
	}
	for i, w := range gen2.Workers {
		want = append(want, fmt.Sprintf("worker %d (pid %d) ready after ", i, w.PID))
	}
	want = append(want, fmt.Sprintf("worker 0 (pid %d) ready after ", gen2b.Workers[0].PID))
	for i, w := range gen2b.Workers { // the stop
		want = append(want, fmt.Sprintf("worker %d (pid %d) exited with status 0 (SIGTERM sent by cohort) after ", i, w.PID))
	}
	want = append(want, fmt.Sprintf("worker 0 (pid %d): ", victim), "lines suppressed")
	var own string
	err := EventuallyErr(10*time.Second, func() error {
		own = c.Journal(t, "-u", unit, "_PID="+strconv.Itoa(dispatcher), "_TRANSPORT=stdout", "-o", "cat")
		for _, w := range want {
			if !strings.Contains(own, w) {
				return fmt.Errorf("no dispatcher line contains %q", w)
			}
		}
		return nil
	})
	if err != nil {
		t.Errorf("the dispatcher's lines of the reload, the kill and the stop: %v\njournalctl -u %s _TRANSPORT=stdout:\n%s", err, unit, tail(own, 60))
	}
	suppressed := regexp.MustCompile(`(?m)^worker 0 \(pid \d+\): [\d,]+ lines suppressed`).FindAllString(own, -1)
	t.Logf("%d dispatcher lines; suppression lines: %q", strings.Count(own, "\n"), suppressed)
	for _, l := range strings.Split(c.Journal(t, "-t", "systemd-journald", "-o", "cat"), "\n") {
		if strings.Contains(l, "Suppressed") && strings.Contains(l, unit) {
			t.Errorf("journald: %q: the dispatcher's budget, not journald's, should decide", l)
		}
	}

	// Worker 1's marks: none missing, each pid's numbers 0..max, and the
	// default output shows the worker and its pid in the identifier.
	short := c.Journal(t, "-u", unit, "COHORT_WORKER=1")
	lineRE := regexp.MustCompile(`^\S+ \S+ \S+ \S+ ` + app + `\.1/(\d+)\[(\d+)\]: mark (\d+) (\d+)$`)
	marks := map[int][]int{}
	for _, l := range strings.Split(strings.TrimSpace(short), "\n") {
		m := lineRE.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("journalctl -u %s COHORT_WORKER=1: %q is not %s.1/PID[DISPATCHER]: mark PID N", unit, l, app)
			continue
		}
		ident, bracket, pid, n := atoi(m[1]), atoi(m[2]), atoi(m[3]), atoi(m[4])
		if ident != pid || bracket != dispatcher {
			t.Errorf("%q: identifier pid %d, bracket %d; want the worker's pid %d and the dispatcher's %d", l, ident, bracket, pid, dispatcher)
		}
		marks[pid] = append(marks[pid], n)
	}
	if len(marks) < 2 {
		t.Errorf("worker 1's marks come from %d processes; want its generation 1 and 2 workers", len(marks))
	}
	for pid, ns := range marks {
		sort.Ints(ns)
		for i, n := range ns {
			if n != i {
				t.Errorf("worker 1 (pid %d): mark %d missing (have %d marks up to %d)", pid, i, len(ns), ns[len(ns)-1])
				break
			}
		}
		t.Logf("worker 1 (pid %d): marks 0..%d all in the journal", pid, len(ns)-1)
	}
	t.Logf("journalctl -u %s COHORT_WORKER=1 (tail):\n%s", unit, tail(short, 3))
	t.Logf("journalctl -u %s COHORT_WORKER=0 (tail):\n%s", unit, tail(c.Journal(t, "-u", unit, "COHORT_WORKER=0", "-n", "2"), 2))
	if w1 := c.Journal(t, "-u", unit, "COHORT_WORKER=1", "-o", "cat", "-n", "1"); !strings.HasPrefix(w1, "mark ") {
		t.Errorf("journalctl -u %s COHORT_WORKER=1 -o cat: %q; want worker 1's marks", unit, w1)
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
