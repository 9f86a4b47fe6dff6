package procfs

import (
	"context"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// TestParseStat: fields are found after the last ")", whatever the
// command says; malformed lines are refused.
func TestParseStat(t *testing.T) {
	line := "4242 (evil) 1 2 3 (x) R 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 9000 10000000 300 18446744073709551615\n"
	p, ok := ParseStat([]byte(line), 4096)
	if !ok {
		t.Fatal("refused a well-formed line")
	}
	want := Proc{PID: 4242, PPID: 17, PGID: 4242, Ticks: 250 + 50 + 7 + 3, Start: 9000, RSS: 300 * 4096}
	if p != want {
		t.Errorf("got %+v, want %+v", p, want)
	}
	for _, bad := range []string{"", "4242 (x", "x (y) R 1 2", "4242 (y) R 1 2 3", "4242 (y) R 1 1 1 0 -1 0 0 0 0 0 -5 0 0 0 20 0 1 0 9 1 1"} {
		if _, ok := ParseStat([]byte(bad), 4096); ok {
			t.Errorf("accepted %q", bad)
		}
	}
}

// TestTree: the group, descendants that changed group, and adopted
// orphans that name the leader; nothing else.
func TestTree(t *testing.T) {
	tab := Table{
		1:  {PID: 1, PPID: 0, PGID: 1, Ticks: 1000, RSS: 1000},
		10: {PID: 10, PPID: 1, PGID: 10, Ticks: 1, RSS: 1},      // the supervisor
		20: {PID: 20, PPID: 10, PGID: 20, Ticks: 2, RSS: 2},     // the worker
		21: {PID: 21, PPID: 20, PGID: 20, Ticks: 4, RSS: 4},     // its child
		22: {PID: 22, PPID: 21, PGID: 22, Ticks: 8, RSS: 8},     // setsid, parent alive
		30: {PID: 30, PPID: 10, PGID: 30, Ticks: 16, RSS: 16},   // another worker
		31: {PID: 31, PPID: 10, PGID: 31, Ticks: 32, RSS: 32},   // orphan of 20
		32: {PID: 32, PPID: 31, PGID: 31, Ticks: 64, RSS: 64},   // its child
		33: {PID: 33, PPID: 10, PGID: 33, Ticks: 128, RSS: 128}, // orphan of 30
		40: {PID: 40, PPID: 1, PGID: 40, Ticks: 256, RSS: 256},  // unrelated
	}
	owner := func(pid int) int {
		return map[int]int{31: 20, 32: 20, 33: 30, 30: 30, 20: 20}[pid]
	}
	u := tab.Tree(20, 10, owner)
	if want := (Usage{Procs: 5, Ticks: 2 + 4 + 8 + 32 + 64, RSS: 2 + 4 + 8 + 32 + 64}); u != want {
		t.Errorf("tree of 20: %+v, want %+v", u, want)
	}
	if u := tab.Tree(99, 10, owner); u.Procs != 0 {
		t.Errorf("tree of a gone worker: %+v", u)
	}
}

// TestScanTree: a real process group with a child that burns CPU and
// holds memory; the tree counts the child.
func TestScanTree(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", `dd if=/dev/zero of=/dev/null bs=16M count=100000 & wait`)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		syscall.Kill(-pid, syscall.SIGKILL)
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		tab, err := Scan(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := tab[os.Getpid()]; !ok {
			t.Fatalf("scan misses this process %d", os.Getpid())
		}
		u := tab.Tree(pid, 0, nil)
		own := tab[pid]
		// dd's 16 MiB buffer is resident in the child, not in sh.
		if u.Procs == 2 && u.RSS >= 16<<20 && own.RSS < 16<<20 && u.Ticks > own.Ticks {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tree of sh %d: %+v (sh itself %+v)", pid, u, own)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestEnvValue: the variable is read from a real process's environment.
func TestEnvValue(t *testing.T) {
	cmd := exec.Command("/bin/sleep", "30")
	cmd.Env = []string{"A=1", "COHORT_WORKER_PID=77", "B=2"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if v, ok := EnvValue(cmd.Process.Pid, "COHORT_WORKER_PID", 1<<16); !ok || v != "77" {
		t.Errorf("got %q %v", v, ok)
	}
	if _, ok := EnvValue(cmd.Process.Pid, "C", 1<<16); ok {
		t.Error("found C")
	}
	if _, ok := EnvValue(1<<30, "A", 1<<16); ok {
		t.Error("read a process that does not exist")
	}
}
