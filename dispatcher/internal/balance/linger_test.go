package balance

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fillAndLinger writes to f until its send buffer and its peer's receive
// buffer are full (the peer does not read), then sets SO_LINGER 30 s.
func fillAndLinger(t *testing.T, f *os.File) {
	fd := int(f.Fd())
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Error(err)
		return
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := unix.Write(fd, chunk); err != nil {
			if !errors.Is(err, unix.EAGAIN) {
				t.Error(err)
			}
			break
		}
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 30}); err != nil {
		t.Error(err)
	}
}

// dialNonReading connects to addr as a client that will not read, with a
// small receive buffer so that the server fills it quickly; it is closed
// at the end of the test.
func dialNonReading(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) })
		return err
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestLingeringConnectionDoesNotBlockTheLoop: a worker may set SO_LINGER
// on a connection and close it while its client does not read. The
// dispatcher's copy is then the last reference, and a plain close of it
// waits up to the linger time for the client, with the event loop
// stopped: no other connection is accepted meanwhile. The dispatcher
// must close its copies without waiting.
func TestLingeringConnectionDoesNotBlockTheLoop(t *testing.T) {
	// The worker lingers on the first connection only; it closes its
	// copy before it acknowledges, so the dispatcher's copy is the last
	// one and the dispatcher's close is the one that would wait.
	var first sync.Once
	addr, served, _ := testBalancerHooked(t, Config{MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second}, 1,
		func(f *os.File) { first.Do(func() { fillAndLinger(t, f) }) })

	dialNonReading(t, addr)
	for deadline := time.Now().Add(10 * time.Second); served.Load() < 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the worker did not serve the first connection within 10 s")
		}
	}
	time.Sleep(50 * time.Millisecond) // the loop reads the ACK (within 1 ms) and closes its copy

	// Another client must be served meanwhile: its connection reaches
	// the worker, which closes it at once, so the client reads EOF.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetReadDeadline(start.Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if !errors.Is(err, io.EOF) {
		t.Fatalf("the next client read %v after %v, want EOF: the event loop waits in the close of a lingering connection", err, time.Since(start).Round(time.Millisecond))
	}
}
