// Package testsock makes the hostile sockets that cohort's tests point a
// process at: for now a notify socket whose reader never reads.
package testsock

import (
	"errors"
	"net"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// FullNotify returns the path of a datagram socket (a NOTIFY_SOCKET) whose
// receive queue is full and that nobody reads, like a service manager that
// has stopped reading: a blocking send to it waits for good. The socket is
// closed when t ends.
func FullNotify(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	for {
		err := unix.Sendto(fd, []byte("X"), 0, &unix.SockaddrUnix{Name: path})
		if errors.Is(err, unix.EAGAIN) {
			return path // the queue is full
		}
		if err != nil {
			t.Fatalf("fill %s: %v", path, err)
		}
	}
}
