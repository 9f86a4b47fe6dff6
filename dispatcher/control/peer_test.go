package control

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// serveWith starts a server with cfg on path and stops it when the test
// ends; Serve starts only when start is called.
func serveWith(t *testing.T, path string, cfg *Config, h Handler) (s *Server, start func()) {
	t.Helper()
	s, err := Listen(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	started := false
	t.Cleanup(func() {
		cancel()
		if !started {
			s.Close()
			return
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, func() {
		started = true
		go func() { done <- s.Serve(ctx, h) }()
	}
}

func admit65534(uid uint32) bool { return uid == 0 || uid == 65534 }

// TestOperatorOutsideWorkerTree: with a stand-in supervisor (a helper
// process), its child may only read status, while processes outside its
// tree, root (this test) and another allowed uid, may scale.
func TestOperatorOutsideWorkerTree(t *testing.T) {
	dir, bin := otherUIDBinary(t)
	path := filepath.Join(dir, SocketName)
	sup := startHelper(t, "", "spawn", path, nil)
	h := &fakeHandler{}
	s, start := serveWith(t, path, &Config{Supervisor: sup.cmd.Process.Pid, Allowed: admit65534}, h)
	if err := os.Chmod(s.Path(), 0o666); err != nil {
		t.Fatal(err)
	}
	start()
	if l := sup.line(t); !strings.HasPrefix(l, "scale: permission denied") || !strings.Contains(l, fmt.Sprintf("descends from pid %d", sup.cmd.Process.Pid)) {
		t.Errorf("the supervisor's child: %s", l)
	}
	if l := sup.line(t); l != "status: <nil>" {
		t.Errorf("the supervisor's child: %s", l)
	}
	if h.scaledTo() != 0 {
		t.Fatalf("a worker scaled to %d", h.scaledTo())
	}
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdScale, Workers: 3}); err != nil || h.scaledTo() != 3 {
		t.Errorf("root outside the tree: %v (scaled %d)", err, h.scaledTo())
	}
	other := startHelper(t, bin, "try", path, &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}})
	if l := other.line(t); l != "scale: <nil>" {
		t.Errorf("uid 65534 outside the tree: %s", l)
	}
	if s.Denied() != 1 {
		t.Errorf("denied = %d, want 1", s.Denied())
	}
}

// TestSlotsPerProcess: outside the worker trees one process gets
// maxPerPeer connections; several processes fill the shared pool, and root
// still gets in on its reserve.
func TestSlotsPerProcess(t *testing.T) {
	dir, bin := otherUIDBinary(t)
	path := filepath.Join(dir, SocketName)
	sup := startHelper(t, "", "sleep", path, nil) // a supervisor with no workers
	s, start := serveWith(t, path, &Config{Supervisor: sup.cmd.Process.Pid, Allowed: admit65534}, &fakeHandler{})
	if err := os.Chmod(s.Path(), 0o666); err != nil {
		t.Fatal(err)
	}
	start()
	nobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	total := 0
	for i := range maxOperatorConns/maxPerPeer + 1 {
		hog := startHelper(t, bin, "hog", path, nobody, "HOG_N=10")
		var n int
		if _, err := fmt.Sscanf(hog.line(t), "held %d", &n); err != nil {
			t.Fatal(err)
		}
		want := maxPerPeer
		if i == maxOperatorConns/maxPerPeer {
			want = 0 // the pool is full
		}
		if n != want {
			t.Errorf("hog %d held %d, want %d", i, n, want)
		}
		total += n
	}
	if total != maxOperatorConns {
		t.Errorf("hogs hold %d, want %d", total, maxOperatorConns)
	}
	for _, req := range []Request{{Cmd: CmdStatus}, {Cmd: CmdScale, Workers: 2}} {
		if _, err := Call(ctx(t), s.Path(), req); err != nil {
			t.Errorf("root's %s with the pool full: %v", req.Cmd, err)
		}
	}
	if s.Dropped() < 6 {
		t.Errorf("dropped = %d, want at least 6 per hog", s.Dropped())
	}
}

// TestConnectorGone: a connection whose connecting process exited before
// it was accepted (the shape of a pid-reuse attempt: the pid may belong to
// someone else by now) gets read-only rights, whoever holds it.
func TestConnectorGone(t *testing.T) {
	path := filepath.Join(t.TempDir(), SocketName)
	sup := startHelper(t, "", "sleep", path, nil)
	h := &fakeHandler{}
	_, start := serveWith(t, path, &Config{Supervisor: sup.cmd.Process.Pid}, h)
	conn := startHelper(t, "", "connector", path, nil)
	if l := conn.line(t); l != "connected" {
		t.Fatalf("connector: %s", l)
	}
	done := make(chan error, 1)
	go func() { // reaped, not cmd.Wait, which would close its stdout
		_, err := conn.cmd.Process.Wait()
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the connector did not exit")
	}
	start()
	conn.stdin.Write([]byte("go\n"))
	if l := conn.line(t); !strings.Contains(l, "permission denied") || !strings.Contains(l, "exited before it could be identified") {
		t.Errorf("the holder of a gone connector's connection: %s", l)
	}
	if h.scaledTo() != 0 {
		t.Errorf("scaled to %d", h.scaledTo())
	}
}

// TestParentOf: this process's own entry, against the kernel's answer;
// a pid that does not exist is an error that says the ancestry cannot
// be read. (The stat parser's cases are procfs's TestParseStat.)
func TestParentOf(t *testing.T) {
	if got, err := parentOf(os.Getpid()); err != nil || got != os.Getppid() {
		t.Errorf("parentOf(self) = %d, %v; want %d", got, err, os.Getppid())
	}
	if _, err := parentOf(1 << 30); err == nil || !strings.Contains(err.Error(), "its ancestry cannot be read") {
		t.Errorf("parentOf(no such pid): %v", err)
	}
}
