// Package testproc is what cohort's tests read of other processes in
// /proc: who holds a socket, and the sweep that kills whatever a test
// started, found by a mark in its environment. Production code reads /proc
// through its own bounded readers (dispatcher/internal/probe); these are
// for tests only.
package testproc

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// pids lists the processes of the machine but this one.
func pids() []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && pid != os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

// Holders lists the pids (other than this process) with an open fd whose
// /proc/PID/fd link, such as "socket:[1234]", match accepts. A process
// that cannot be read (gone, or another user's without root) is left out.
func Holders(match func(link string) bool) []int {
	var out []int
	for _, pid := range pids() {
		dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			if l, _ := os.Readlink(filepath.Join(dir, fd.Name())); match(l) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// KillMarked sends SIGKILL to every process (but this one) whose
// environment has the entry kv ("NAME=value"), which a test puts in the
// environment of what it starts: whatever happens, nothing of the test
// outlives it, daemons that left their process group included.
func KillMarked(kv string) {
	mark := []byte(kv + "\x00")
	for _, pid := range pids() {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "environ"))
		if err == nil && (bytes.HasPrefix(b, mark) || bytes.Contains(b, append([]byte{0}, mark...))) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Children lists pid's children: those of every one of its threads
// (/proc/PID/task/TID/children lists the children a thread forked, and a
// Go program forks from whichever thread runs the goroutine).
func Children(pid int) []int {
	tasks, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	var kids []int
	for _, task := range tasks {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "task", task.Name(), "children"))
		for _, f := range bytes.Fields(b) {
			if n, err := strconv.Atoi(string(f)); err == nil {
				kids = append(kids, n)
			}
		}
	}
	return kids
}

// State is the state letter of pid from /proc/PID/stat ("Z" for a
// zombie), "" when it is gone.
func State(pid int) string {
	st, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return ""
	}
	if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) {
		return string(st[i+2])
	}
	return ""
}

// OpenFDs is how many descriptors this process holds, not counting the one
// that reads /proc/self/fd: for tests that check that nothing leaks.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1
}
