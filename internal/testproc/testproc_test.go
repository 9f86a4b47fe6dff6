package testproc

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"syscall"
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

// TestChildrenAndState: a shell's child is listed (a single-threaded
// parent: a Go test forks from any of its threads, and children lists
// one thread's); a child that exited is a zombie until it is waited for;
// then it is gone.
func TestChildrenAndState(t *testing.T) {
	sh := exec.Command("/bin/sh", "-c", "sleep 30 & echo $!; wait")
	out, err := sh.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sh.Process.Kill(); sh.Wait() })
	var sleep int
	if _, err := fmt.Fscan(out, &sleep); err != nil {
		t.Fatal(err)
	}
	if kids := Children(sh.Process.Pid); !slices.Contains(kids, sleep) {
		t.Errorf("children of the shell %v lack its sleep %d", kids, sleep)
	}
	syscall.Kill(sleep, syscall.SIGKILL)

	cmd := exec.Command("/bin/sh", "-c", "read x")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	in.Close() // read gets EOF: the shell exits
	deadline := time.Now().Add(10 * time.Second)
	for State(pid) != "Z" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if st := State(pid); st != "Z" {
		t.Errorf("state of the exited child %q, want Z", st)
	}
	cmd.Wait()
	if st := State(pid); st != "" {
		t.Errorf("state of a reaped child %q, want none", st)
	}
}

// TestChildrenOfAnyThread: a child forked from a thread other than the
// main one is pid's child too (it is listed under that thread's task).
func TestChildrenOfAnyThread(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	// Each goroutine keeps its thread locked until the end, so a second
	// one cannot land on the main thread if the first did.
	var cmd *exec.Cmd
	for range 2 {
		started := make(chan *exec.Cmd)
		go func() {
			runtime.LockOSThread() // the thread ends with the goroutine
			if unix.Gettid() == os.Getpid() {
				started <- nil
				<-release
				return
			}
			c := exec.Command("sleep", "1000")
			if c.Start() != nil {
				c = nil
			}
			started <- c
			<-release
		}()
		if cmd = <-started; cmd != nil {
			break
		}
	}
	if cmd == nil {
		t.Fatal("could not start a child from a thread other than the main one")
	}
	defer cmd.Wait()
	defer cmd.Process.Kill() // by pid
	if kids := Children(os.Getpid()); !slices.Contains(kids, cmd.Process.Pid) {
		t.Fatalf("Children = %v, want it to hold %d, forked by a thread other than the main one", kids, cmd.Process.Pid)
	}
}
