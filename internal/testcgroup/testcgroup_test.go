package testcgroup

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"testing"
)

// TestNewMoveRemove: a process moved into a new cgroup is listed there
// and in /proc, and the cgroup is gone after cleanup.
func TestNewMoveRemove(t *testing.T) {
	_, self := V1(t, "cpu")
	var dir string
	t.Run("inside", func(t *testing.T) {
		dir = New(t, self, [][2]string{{"cpu.cfs_quota_us", "150000"}})
		p := exec.Command("sleep", "30")
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { p.Process.Kill(); p.Wait() }()
		Move(dir, p.Process.Pid)
		if !slices.Contains(Procs(dir), p.Process.Pid) {
			t.Errorf("pid %d not in %s: %v", p.Process.Pid, dir, Procs(dir))
		}
		if got := Dir(t, p.Process.Pid, "cpu"); got != dir {
			t.Errorf("Dir = %s, want %s", got, dir)
		}
	})
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s after cleanup: %v, want it gone", dir, err)
	}
}
