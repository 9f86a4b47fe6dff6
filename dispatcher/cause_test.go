package dispatcher

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestRestartCauseOOM: a worker the kernel's OOM killer ended (its
// cgroup's memory.events counted the kill) restarts for "oom_killed",
// not "crashed", so status and metrics tell an OOM kill from a crash
// whether or not the slot has a worker at the moment (the cgroup table,
// which also counts them, is shown only for a running worker).
func TestRestartCauseOOM(t *testing.T) {
	killed := unix.WaitStatus(unix.SIGKILL) // terminated by SIGKILL
	segv := unix.WaitStatus(unix.SIGSEGV)
	for _, tc := range []struct {
		name string
		w    worker
		ws   unix.WaitStatus
		want string
	}{
		{"OOM-killed", worker{oomKilled: true}, killed, causeOOMKilled},
		{"SIGKILL from elsewhere", worker{}, killed, causeCrashed},
		{"SIGKILL sent by cohort", worker{killed: true, oomKilled: true}, killed, causeExited},
		{"a crash in an OOM-killing cgroup", worker{oomKilled: true}, segv, causeCrashed},
		{"exit 0", worker{oomKilled: true}, unix.WaitStatus(0), causeExited},
	} {
		if got := restartCause(&tc.w, tc.ws); got != tc.want {
			t.Errorf("%s: cause %q, want %q", tc.name, got, tc.want)
		}
	}
	if got := describeExit(killed, &worker{oomKilled: true}); got != "was killed by the kernel's OOM killer (memory.events oom_kill)" {
		t.Errorf("describeExit of an OOM kill: %q", got)
	}
}
