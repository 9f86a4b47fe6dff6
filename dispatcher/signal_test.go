package dispatcher

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestSignalWorkers: a signal request reaches the main process of every
// worker (or of one slot), not the dispatcher, and changes nothing the
// dispatcher supervises: same pids, no restart.
func TestSignalWorkers(t *testing.T) {
	t.Parallel()
	got := filepath.Join(t.TempDir(), "signals")
	f := startFromFile(t, appFile{workers: 2, env: map[string]string{"HELPER_SIGNAL_FILE": got}})
	testsync.WaitFor(t, 20*time.Second, "2 ready workers", func() bool {
		return strings.HasPrefix(f.status(t).Line, "2/2 workers ready")
	})
	before := f.status(t)
	pids := []int{before.Workers[0].PID, before.Workers[1].PID}
	sort.Ints(pids)

	rep, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdSignal, Signal: "usr2"})
	if err != nil {
		t.Fatalf("signal USR2: %v", err)
	}
	if sorted := slices.Sorted(slices.Values(rep.PIDs)); !slices.Equal(sorted, pids) {
		t.Errorf("signalled %v, want the workers %v", rep.PIDs, pids)
	}
	one := 1
	rep, err = f.call(t, 5*time.Second, control.Request{Cmd: control.CmdSignal, Signal: "SIGHUP", Worker: &one})
	if err != nil || !slices.Equal(rep.PIDs, []int{before.Workers[1].PID}) {
		t.Errorf("signal HUP to worker 1: %v %v, want [%d]", rep, err, before.Workers[1].PID)
	}
	want := []string{
		strconv.Itoa(before.Workers[0].PID) + " SIGUSR2",
		strconv.Itoa(before.Workers[1].PID) + " SIGUSR2",
		strconv.Itoa(before.Workers[1].PID) + " SIGHUP",
	}
	sort.Strings(want)
	var lines []string
	testsync.WaitFor(t, 10*time.Second, "3 signals received", func() bool {
		b, _ := os.ReadFile(got)
		lines = strings.Split(strings.TrimSpace(string(b)), "\n")
		return len(lines) >= 3
	})
	sort.Strings(lines)
	if !slices.Equal(lines, want) {
		t.Errorf("received %q, want %q", lines, want)
	}
	seven := 7
	if _, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdSignal, Signal: "USR2", Worker: &seven}); err == nil || !strings.Contains(err.Error(), "no worker 7") {
		t.Errorf("signal to worker 7: %v", err)
	}
	if _, err := f.call(t, 5*time.Second, control.Request{Cmd: control.CmdSignal, Signal: "SIGSEGV"}); err == nil || !strings.Contains(err.Error(), "unknown signal") {
		t.Errorf("signal SEGV: %v", err)
	}
	after := f.status(t)
	for i, w := range after.Workers {
		if w.PID != before.Workers[i].PID || w.Restarts != 0 || w.State != "ready" {
			t.Errorf("after the signals worker %d: %+v, before %+v", i, w, before.Workers[i])
		}
	}
	if log := f.logs.String(); !strings.Contains(log, fmt.Sprintf("sent SIGHUP to worker 1 (pid %d)", before.Workers[1].PID)) {
		t.Errorf("no log line of the signal:\n%s", log)
	}
}
