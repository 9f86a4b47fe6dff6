package activation_test

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// pythonWorker returns the argv of examples/python/rr_worker.py; without
// python3 the test skips, or fails under CI (testtool.Need).
func pythonWorker(t *testing.T) []string {
	t.Helper()
	py := testtool.Need(t, "python3")
	script, err := filepath.Abs("../examples/python/rr_worker.py")
	if err != nil {
		t.Fatal(err)
	}
	return []string{py, "-B", script}
}

// The Python example implements the round-robin protocol against the real
// dispatcher-side Channel, with real TCP clients: it answers for "http",
// rejects what comes for "admin", acks and reports closes, and exits when
// the dispatcher goes away.
func TestPythonWorkerRoundRobin(t *testing.T) {
	argv := pythonWorker(t)
	ch, workerEnd, err := rr.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		left, _ := ch.Close()
		for _, c := range left {
			c.Close()
		}
	})
	notify, next := notifySocket(t)
	c := startChild(t, "", argv, []*os.File{workerEnd},
		append(activation.Environ(rr.FDName), rr.ListenersEnv+"=admin:http", "COHORT_WORKER=7", "NOTIFY_SOCKET="+notify)...)
	workerEnd.Close()
	if msg := next(); msg != "READY=1" {
		t.Fatalf("first notify message %q, want READY=1", msg)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// One connection for "admin" first: the worker rejects it and the
	// dispatcher gets its copy back.
	admin, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := s.(*net.TCPConn).File()
	s.Close()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := rr.FileConn(f, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn.ID = 99
	if err := ch.Send(conn); err != nil {
		t.Fatal(err)
	}
	ch.SetReadDeadline(time.Now().Add(childWait))
	ev, err := ch.Recv()
	ch.SetReadDeadline(time.Time{})
	if err != nil || ev.Type != rr.TypeReject || len(ev.Rejected) != 1 || ev.Rejected[0].ID != 99 {
		t.Fatalf("Recv = %+v, %v, want REJECT 99", ev, err)
	}
	ev.Rejected[0].Close()

	dispatched := make(chan struct{})
	go func() { // ends when ln is closed
		defer close(dispatched)
		dispatch(t, ln, ch, 1)
	}()
	t.Cleanup(func() { ln.Close(); waitDispatch(t, dispatched) })
	events := make(chan rr.Event, 100)
	go func() { // ends when the channel is closed
		defer close(events)
		for {
			ev, err := ch.Recv()
			if err != nil {
				return
			}
			events <- ev
		}
	}()
	const n = 40
	for range n {
		if body := get(t, ln.Addr().String()); body != "hello from worker 7\n" {
			t.Fatalf("got %q", body)
		}
	}
	acked, closed := 0, 0
	deadline := time.After(childWait)
	for acked < n || closed < n {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("channel closed after %d acked, %d closed, want %d", acked, closed, n)
			}
			switch ev.Type {
			case rr.TypeAck:
				acked += len(ev.IDs)
			case rr.TypeClosed:
				closed += len(ev.IDs)
			}
		case <-deadline:
			t.Fatalf("after %v: %d acked, %d closed, want %d", childWait, acked, closed, n)
		}
	}
	if ch.Unacked() != 0 || ch.Open() != 0 {
		t.Fatalf("Unacked, Open = %d, %d", ch.Unacked(), ch.Open())
	}
	ch.Close()
	if err := c.wait(t, childWait); err != nil {
		t.Fatalf("python worker exited with %v after the dispatcher went away", err)
	}
}

// In shared mode the same script accepts on the inherited socket.
func TestPythonWorkerShared(t *testing.T) {
	argv := pythonWorker(t)
	lnFile, addr := listenerFile(t)
	c := startChild(t, "", argv, []*os.File{lnFile},
		append(activation.Environ("http"), "COHORT_WORKER=3")...)
	if body := get(t, addr); body != "hello from worker 3\n" {
		t.Fatalf("got %q", body)
	}
	c.cmd.Process.Kill()
}
