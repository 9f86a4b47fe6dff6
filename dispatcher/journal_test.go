package dispatcher

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/journal/journaltest"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestJournalAttribution: each worker's lines reach journald as entries
// with COHORT_APP, COHORT_WORKER, COHORT_PID and COHORT_GENERATION of
// the worker that wrote them; "<N>" prefixes set PRIORITY; a 300 KB line
// (more than a datagram) arrives whole through a memfd; a last line
// without a newline and the lines of a worker that then died by SIGKILL
// are not lost.
func TestJournalAttribution(t *testing.T) {
	t.Parallel()
	j := journaltest.Start(t)
	const long = 300 << 10
	app := testApp(t, 2, map[string]string{
		"COHORT_TEST_HELPER": "printer",
		"HELPER_LINES":       "<3>an error|plain line|<7>debug detail|with\ttab",
		"HELPER_LONG":        strconv.Itoa(long),
		"HELPER_TAIL":        "last words",
		"HELPER_EXIT":        "kill",
	})
	app.Restart = appfile.Restart{Initial: time.Minute, Max: time.Minute, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	stdout := &testsync.Buffer{}
	rec, _ := startRun(t, Options{App: app, Listeners: []*os.File{l}, Journal: true, JournalSocket: j.Path, Stdout: stdout})
	var from int
	pids := map[string]string{}
	for range 2 {
		e := rec.wait(t, &from, 10*time.Second, "worker start", func(e Event) bool { return e.Kind == WorkerStarted })
		pids[strconv.Itoa(e.Worker)] = strconv.Itoa(e.PID)
	}
	type key struct{ worker, msg string }
	got := map[key]map[string]string{}
	want := []string{"an error", "plain line", "debug detail", "with\ttab", "long", "last words"}
	deadline := time.After(15 * time.Second)
	for len(got) < 2*len(want) {
		select {
		case e := <-j.Entries:
			msg := e["MESSAGE"]
			if len(msg) == long {
				if strings.Trim(msg[:long-1], "x") != "" || msg[long-1] != 'y' {
					t.Errorf("long line mangled")
				}
				msg = "long"
			}
			got[key{e["COHORT_WORKER"], msg}] = e
		case <-deadline:
			var keys []string
			for k := range got {
				keys = append(keys, k.worker+":"+k.msg)
			}
			t.Fatalf("entries after 15s: %q, want %d; stdout (fallback): %q", keys, 2*len(want), stdout.String())
		}
	}
	prio := map[string]string{"an error": "3", "debug detail": "7"}
	for w, pid := range pids {
		for _, m := range want {
			e, ok := got[key{w, m}]
			if !ok {
				t.Errorf("worker %s: no entry %q", w, m)
				continue
			}
			p := prio[m]
			if p == "" {
				p = "6"
			}
			if e["COHORT_APP"] != "t" || e["COHORT_PID"] != pid || e["COHORT_GENERATION"] != "1" || e["PRIORITY"] != p || e["SYSLOG_IDENTIFIER"] != "t."+w+"/"+pid || e["SYSLOG_PID"] != pid {
				delete(e, "MESSAGE")
				t.Errorf("worker %s (pid %s), %q: fields %v, want priority %s", w, pid, m, e, p)
			}
		}
	}
	if stdout.String() != "" {
		t.Errorf("lines fell back to stdout: %q", stdout.String())
	}
}

// TestJournalUnreachable: when journald cannot be reached, lines go to
// stdout with their "app.N | " label rather than being lost.
func TestJournalUnreachable(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, map[string]string{"COHORT_TEST_HELPER": "printer", "HELPER_LINES": "hello", "HELPER_EXIT": "0"})
	app.Restart = appfile.Restart{Initial: time.Minute, Max: time.Minute, MinUptime: time.Hour}
	l, _ := tcpListener(t, "http")
	stdout := &testsync.Buffer{}
	startRun(t, Options{App: app, Listeners: []*os.File{l}, Journal: true, JournalSocket: filepath.Join(t.TempDir(), "none"), Stdout: stdout})
	testsync.WaitFor(t, 10*time.Second, "the fallback line", func() bool { return strings.Contains(stdout.String(), "t.0 | hello\n") })
}
