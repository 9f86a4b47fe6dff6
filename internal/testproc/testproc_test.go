package testproc

import (
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHoldersAndKillMarked: a child that inherits a listener is among its
// holders; KillMarked kills it by the mark in its environment, and then
// it holds nothing.
func TestHoldersAndKillMarked(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	link := "socket:[" + itoa(st.Ino) + "]"
	mark := "COHORT_TESTPROC_MARK=" + t.Name() + itoa(uint64(os.Getpid()))
	cmd := exec.Command("sleep", "1000")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Env = append(os.Environ(), mark)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	is := func(l string) bool { return l == link }
	if h := Holders(is); !slices.Contains(h, cmd.Process.Pid) || slices.Contains(h, os.Getpid()) {
		t.Fatalf("Holders(%s) = %v, want the child %d and not this process", link, h, cmd.Process.Pid)
	}
	KillMarked(mark + "-not")
	KillMarked(mark[:len(mark)-1])
	select {
	case <-exited:
		t.Fatal("a different mark killed the child")
	case <-time.After(100 * time.Millisecond):
	}
	KillMarked(mark)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("KillMarked did not kill the child")
	}
	if h := Holders(is); slices.Contains(h, cmd.Process.Pid) {
		t.Errorf("Holders after the kill = %v", h)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }
