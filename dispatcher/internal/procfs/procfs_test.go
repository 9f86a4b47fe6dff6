package procfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
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
// TestParseStatPPID: the cases of the parsers this one replaced (the
// control socket's ancestry walk and the probe's tree): the parent is the
// field after the state, after the last ')' whatever the command holds;
// a line without a command, a short one, and a negative or overflowing
// parent are refused.
func TestParseStatPPID(t *testing.T) {
	// rest pads a line to the fields ParseStat reads (after ppid).
	const rest = " 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 1 1"
	for in, want := range map[string]int{
		"1234 (bash) S 1200" + rest:                 1200,
		"1234 (a) b) S 7" + rest:                    7,
		"1234 (a) b) (c) R 77" + rest:               77,
		"1234 (x y) S 5" + rest:                     5,
		"1234 (x\n) ) R 0" + rest:                   0,
		"1234 (x\n) ) R 0 0":                        -1, // short
		"1234 (a) S 1) S 99" + rest:                 99, // the last ')' decides
		"1234 (bash S 1200" + rest:                  -1,
		"1234 node S 5" + rest:                      -1,
		"1234 (bash) S":                             -1,
		"1234 (bash) S -5" + rest:                   -1,
		"1234 (bash) S 99999999999999999999" + rest: -1,
	} {
		p, ok := ParseStat([]byte(in), 4096)
		if want == -1 && ok {
			t.Errorf("ParseStat(%q): ppid %d, want no parse", in, p.PPID)
		}
		if want != -1 && (!ok || p.PPID != want) {
			t.Errorf("ParseStat(%q) = %+v %v, want ppid %d", in, p, ok, want)
		}
	}
}

// TestStat: this process's own entry, against the kernel's answer; a
// pid that does not exist wraps fs.ErrNotExist.
func TestStat(t *testing.T) {
	p, err := Stat(os.Getpid())
	if err != nil || p.PID != os.Getpid() || p.PPID != os.Getppid() || p.PGID != syscall.Getpgrp() {
		t.Errorf("Stat(self) = %+v, %v; want pid %d, ppid %d, pgid %d", p, err, os.Getpid(), os.Getppid(), syscall.Getpgrp())
	}
	if _, err := Stat(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat(no such pid): %v, want ErrNotExist", err)
	}
}

// TestChildren: a child of this process is listed, and is not once it
// has been reaped.
func TestChildren(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if !slices.Contains(Children(), pid) {
		t.Errorf("Children() = %v, without the child %d", Children(), pid)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if slices.Contains(Children(), pid) {
		t.Errorf("Children() = %v, still with the reaped child %d", Children(), pid)
	}
}

// TestDescendants: breadth first, bounded, and a pid's own entry never
// makes it its own descendant.
func TestDescendants(t *testing.T) {
	tb := Table{
		10: {PID: 10, PPID: 1},
		11: {PID: 11, PPID: 10},
		12: {PID: 12, PPID: 10},
		13: {PID: 13, PPID: 11},
		20: {PID: 20, PPID: 1},
	}
	got := tb.Descendants(10, 64)
	slices.Sort(got[:2]) // siblings come in map order
	if !slices.Equal(got, []int{11, 12, 13}) {
		t.Errorf("Descendants(10) = %v, want [11 12 13]", got)
	}
	if got := tb.Descendants(10, 2); len(got) != 2 || slices.Contains(got, 13) {
		t.Errorf("Descendants(10, max 2) = %v, want the two children", got)
	}
	if got := tb.Descendants(13, 64); len(got) != 0 {
		t.Errorf("Descendants(13) = %v, want none", got)
	}
}

// FuzzParseStat: the one /proc/PID/stat parser never panics on what a
// hostile command name or a future kernel puts there, and what it accepts
// is in range: no negative pid, parent, group or time, and the parent is
// a field after the last ')'.
func FuzzParseStat(f *testing.F) {
	for _, s := range []string{
		"1 (systemd) S 0 1 1 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 9000 10000000 300 1",
		"1234 (a) b) S 7 1 1", "5 () R 4", "(", ")", "1 (x) S 2147483648",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, ok := ParseStat(b, 4096)
		if !ok {
			return
		}
		if p.PID <= 0 || p.PPID < 0 || p.PGID < 0 || p.RSS < 0 {
			t.Fatalf("accepted %+v", p)
		}
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 || !strings.Contains(string(b[i+1:]), fmt.Sprint(p.PPID)) {
			t.Fatalf("ppid %d is not after the last ')' in %q", p.PPID, b)
		}
	})
}

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
	// Until its exec the child's environment is still this process's
	// (failed in CI: `got "" false`).
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid))
		if string(b) == "/bin/sleep\x0030\x00" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not exec /bin/sleep within 10s: %q", cmd.Process.Pid, b)
		}
		time.Sleep(time.Millisecond)
	}
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

// TestScanTreeFrom: ScanTree of this process holds it and a child tree
// it started (sh and the sleep sh forks, in another process group), with
// the same figures a full Scan gives for that tree, and nothing that does
// not descend from it (pid 1, when this is not pid 1).
func TestScanTreeFrom(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", `sleep 60 & wait`)
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
		tab, ok, err := ScanTree(context.Background(), os.Getpid())
		if !ok {
			testtool.Missing(t, "this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, in := tab[1]; in && os.Getpid() != 1 {
			t.Fatalf("ScanTree of %d holds pid 1: %v", os.Getpid(), tab)
		}
		full, err := Scan(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		u, want := tab.Tree(pid, os.Getpid(), nil), full.Tree(pid, os.Getpid(), nil)
		if u.Procs == 2 && want.Procs == 2 && u.RSS > 0 {
			if _, self := tab[os.Getpid()]; !self {
				t.Errorf("ScanTree lacks its top %d", os.Getpid())
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("tree of sh %d: ScanTree %+v, Scan %+v", pid, u, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// BenchmarkScanTree: reading the dispatcher's own trees against every
// process of the host (the status a second of cohort monit).
func BenchmarkScanTree(b *testing.B) {
	b.Run("Scan", func(b *testing.B) {
		for b.Loop() {
			Scan(context.Background())
		}
	})
	b.Run("ScanTree", func(b *testing.B) {
		for b.Loop() {
			ScanTree(context.Background(), os.Getpid())
		}
	})
}
