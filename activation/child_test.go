package activation_test

import (
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/activation/rr"
)

// Shared mode / plain systemd: the child inherits the listener at fd 3 (and
// a second socket at fd 4), serves on it, unsets LISTEN_*, sends READY=1 on
// its first Accept and STOPPING=1 on SIGTERM, and exits cleanly.
func TestSharedModeChild(t *testing.T) {
	lnFile, addr := listenerFile(t)
	other, _ := listenerFile(t)
	notify, next := notifySocket(t)
	c := startChild(t, "serve", nil, []*os.File{other, lnFile},
		append(activation.Environ("metrics", "http"), "NOTIFY_SOCKET="+notify)...)
	if msg := next(); msg != "READY=1" {
		t.Fatalf("first notify message %q, want READY=1", msg)
	}
	body := get(t, addr)
	want := fmt.Sprintf("pid=%d addr=%s local=%s env=\"\"", c.cmd.Process.Pid, addr, addr)
	if body != want {
		t.Fatalf("got %q, want %q", body, want)
	}
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if msg := next(); msg != "STOPPING=1" {
		t.Fatalf("notify message %q, want STOPPING=1", msg)
	}
	if err := c.wait(t, childWait); err != nil {
		t.Fatalf("child exited with %v", err)
	}
}

// LISTEN_PID of another process: the sockets are not for us. The variables
// are still unset.
func TestInheritOtherPID(t *testing.T) {
	lnFile, _ := listenerFile(t)
	self, _ := os.Executable()
	c := startChild(t, "report", []string{"/bin/sh", "-c", `LISTEN_PID=1 exec "$0"`, self}, []*os.File{lnFile},
		activation.Environ("http")...)
	if err := c.wait(t, childWait); err != nil {
		t.Fatal(err)
	}
	if got, want := c.out.String(), "activated=false names=[] env=\"\"\n"; got != want {
		t.Fatalf("child printed %q, want %q", got, want)
	}
}

func TestInheritReportsNames(t *testing.T) {
	a, _ := listenerFile(t)
	b, _ := listenerFile(t)
	ch, w, err := rr.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	defer w.Close()
	c := startChild(t, "report", nil, []*os.File{a, w, b},
		append(activation.Environ("http", rr.FDName, "http"), rr.ListenersEnv+"=web:admin")...)
	if err := c.wait(t, childWait); err != nil {
		t.Fatal(err)
	}
	if got, want := c.out.String(), "activated=true names=[http http web admin] env=\"\"\n"; got != want {
		t.Fatalf("child printed %q, want %q", got, want)
	}
}

// TestTakeAll: TakeAll hands out, in fd order, the inherited sockets that
// Listen has not, an unnamed one as UnnamedFD, and each only once.
func TestTakeAll(t *testing.T) {
	a, _ := listenerFile(t)
	b, _ := listenerFile(t)
	c, _ := listenerFile(t)
	ch := startChild(t, "take", nil, []*os.File{a, b, c}, activation.Environ("http", "", "admin")...)
	if err := ch.wait(t, childWait); err != nil {
		t.Fatal(err)
	}
	want := "[" + activation.UnnamedFD + "@4 admin@5] names=[]\n[] names=[]\n"
	if got := ch.out.String(); got != want {
		t.Fatalf("child printed %q, want %q", got, want)
	}
}

// dispatch plays the dispatcher's part for one worker: it accepts on ln
// and sends each connection over ch, until ln is closed. It ends when ln
// is closed.
func dispatch(t *testing.T, ln net.Listener, ch *rr.Channel, listener uint16) {
	for id := uint64(1); ; id++ {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		f, err := c.(*net.TCPConn).File()
		c.Close()
		if err != nil {
			t.Error(err)
			return
		}
		conn, err := rr.FileConn(f, listener)
		if err != nil {
			t.Error(err)
			return
		}
		conn.ID = id
		if err := ch.Send(conn); err != nil {
			t.Error(err)
			return
		}
	}
}

// waitDispatch waits for dispatch to end after its listener was closed.
// (dispatch can block only in Channel.Send, when the worker stops reading
// while its receive buffer is full.)
func waitDispatch(t *testing.T, dispatched <-chan struct{}) {
	select {
	case <-dispatched:
	case <-time.After(childWait):
		t.Errorf("dispatch did not end within %v after its listener was closed", childWait)
	}
}

// Round-robin mode: the same helper program, unchanged, gets its
// connections from a Channel. Acks and close notifications come back; when
// the dispatcher goes away, Accept fails with net.ErrClosed.
func TestRoundRobinModeChild(t *testing.T) {
	ch, workerEnd, err := rr.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // on failure; the test closes ch itself
		left, _ := ch.Close()
		for _, c := range left {
			c.Close()
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	notify, next := notifySocket(t)
	c := startChild(t, "serve", nil, []*os.File{workerEnd},
		append(activation.Environ(rr.FDName), rr.ListenersEnv+"=admin:http", "NOTIFY_SOCKET="+notify)...)
	workerEnd.Close()
	if msg := next(); msg != "READY=1" {
		t.Fatalf("first notify message %q, want READY=1", msg)
	}
	dispatched := make(chan struct{})
	go func() { // ends when ln is closed
		defer close(dispatched)
		dispatch(t, ln, ch, 1)
	}()
	t.Cleanup(func() { ln.Close(); waitDispatch(t, dispatched) })

	events := make(chan rr.Event, 100)
	recvErr := make(chan error, 1)
	go func() { // ends when the channel is closed
		for {
			ev, err := ch.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			events <- ev
		}
	}()

	const n = 5
	for range n {
		body := get(t, ln.Addr().String())
		if !strings.HasPrefix(body, fmt.Sprintf("pid=%d addr=http local=%s env=\"\"", c.cmd.Process.Pid, ln.Addr())) {
			t.Fatalf("got %q", body)
		}
	}
	acked, closed := 0, 0
	deadline := time.After(childWait)
	for acked < n || closed < n {
		select {
		case ev := <-events:
			switch ev.Type {
			case rr.TypeAck:
				acked += len(ev.IDs)
			case rr.TypeClosed:
				closed += len(ev.IDs)
			default:
				t.Fatalf("unexpected %v", ev.Type)
			}
		case err := <-recvErr:
			t.Fatal(err)
		case <-deadline:
			t.Fatalf("after %v: %d acked, %d closed, want %d", childWait, acked, closed, n)
		}
	}
	if ch.Unacked() != 0 || ch.Open() != 0 {
		t.Fatalf("Unacked, Open = %d, %d", ch.Unacked(), ch.Open())
	}

	// The dispatcher goes away: the worker's Accept returns net.ErrClosed.
	left, err := ch.Close()
	if err != nil || len(left) != 0 {
		t.Fatalf("Close = %v, %v", left, err)
	}
	err = c.wait(t, childWait)
	if code := c.cmd.ProcessState.ExitCode(); code != 3 || c.out.String() != "dispatcher gone\n" {
		t.Fatalf("child exited %d (%v) printing %q, want 3 and \"dispatcher gone\"", code, err, c.out.String())
	}
}
