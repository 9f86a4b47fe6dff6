package sockdiag

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listen binds a stream socket of family to sa with backlog, with
// SO_REUSEPORT when reuse is set, and returns it as a file.
func listen(t *testing.T, family int, sa unix.Sockaddr, backlog int, reuse bool) *os.File {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if reuse {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "test")
	t.Cleanup(func() { f.Close() })
	return f
}

// fill connects n times to addr without the listener accepting, and
// waits until the kernel has completed every handshake.
func fill(t *testing.T, network, addr string, n int) {
	t.Helper()
	for range n {
		c, err := net.DialTimeout(network, addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
}

func ident(t *testing.T, f *os.File) Socket {
	t.Helper()
	s, err := Identify(f)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestQueues reads real listeners' accept queues: TCP on 127.0.0.1 and
// ::1, two SO_REUSEPORT sockets on one port (each its own queue), and a
// unix socket, against connections made and left unaccepted.
func TestQueues(t *testing.T) {
	tcp := listen(t, unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}, 7, false)
	s4 := ident(t, tcp)
	fill(t, "tcp", net.JoinHostPort("127.0.0.1", itoa(s4.Port)), 3)

	// Two reuseport sockets on one port; the kernel spreads by hash, so
	// only the sum is known before reading.
	r1 := listen(t, unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}, 9, true)
	p := ident(t, r1)
	r2 := listen(t, unix.AF_INET, &unix.SockaddrInet4{Port: int(p.Port), Addr: [4]byte{127, 0, 0, 1}}, 11, true)
	fill(t, "tcp", net.JoinHostPort("127.0.0.1", itoa(p.Port)), 4)

	socks := []Socket{s4, p, ident(t, r2)}
	if v6, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM, 0); err == nil {
		unix.Close(v6)
		tcp6 := listen(t, unix.AF_INET6, &unix.SockaddrInet6{Addr: [16]byte{15: 1}}, 5, false)
		s6 := ident(t, tcp6)
		fill(t, "tcp6", net.JoinHostPort("::1", itoa(s6.Port)), 2)
		socks = append(socks, s6)
	}
	path := filepath.Join(t.TempDir(), "q.sock")
	ux := listen(t, unix.AF_UNIX, &unix.SockaddrUnix{Name: path}, 6, false)
	fill(t, "unix", path, 1)
	socks = append(socks, ident(t, ux))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The handshakes of the last connections may still be completing:
	// wait for the counts, within the test's bound.
	var qs []Queue
	for {
		var err error
		qs, err = Queues(ctx, socks)
		if err != nil {
			t.Fatalf("Queues: %v", err)
		}
		if qs[0].Len == 3 && qs[1].Len+qs[2].Len == 4 && qs[len(qs)-1].Len == 1 || ctx.Err() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if qs[0] != (Queue{3, 7}) {
		t.Errorf("tcp: %+v, want 3 of 7", qs[0])
	}
	if qs[1].Limit != 9 || qs[2].Limit != 11 || qs[1].Len+qs[2].Len != 4 {
		t.Errorf("reuseport: %+v and %+v, want limits 9 and 11 and 4 queued in all", qs[1], qs[2])
	}
	if len(socks) == 5 && qs[3] != (Queue{2, 5}) {
		t.Errorf("tcp6: %+v, want 2 of 5", qs[3])
	}
	if q := qs[len(qs)-1]; q != (Queue{1, 6}) {
		t.Errorf("unix: %+v, want 1 of 6", q)
	}
}

// TestQueuesGone: a closed socket reads as Unknown, not as another.
func TestQueuesGone(t *testing.T) {
	f := listen(t, unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}, 3, false)
	s := ident(t, f)
	path := filepath.Join(t.TempDir(), "gone.sock")
	u := listen(t, unix.AF_UNIX, &unix.SockaddrUnix{Name: path}, 3, false)
	us := ident(t, u)
	f.Close()
	u.Close()
	qs, err := Queues(context.Background(), []Socket{s, us})
	if qs[0] != Unknown || qs[1] != Unknown {
		t.Errorf("closed sockets: %+v (err %v), want Unknown", qs, err)
	}
	if err == nil {
		t.Errorf("no error for a unix socket that is gone")
	}
}

// TestParseHostile: short and malformed replies are errors, never a
// panic or an out-of-range read.
func TestParseHostile(t *testing.T) {
	for n := range sizeofInetDiagMsg {
		if _, err := ParseInetDiagMsg(make([]byte, n)); err == nil {
			t.Errorf("inet_diag_msg of %d bytes accepted", n)
		}
	}
	for n := range sizeofUnixDiagMsg {
		if _, err := ParseUnixDiagMsg(make([]byte, n)); err == nil {
			t.Errorf("unix_diag_msg of %d bytes accepted", n)
		}
	}
	bad := make([]byte, sizeofUnixDiagMsg+4)
	bad[sizeofUnixDiagMsg] = 200 // attribute longer than the message
	if _, err := ParseUnixDiagMsg(bad); err == nil {
		t.Error("attribute overrunning the message accepted")
	}
	for _, b := range [][]byte{make([]byte, 15), {255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, {3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
		walk(b, 0, false, func([]byte) error { return nil })
	}
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// FuzzReplies: whatever a netlink read holds, walking it and parsing its
// payloads as either reply never panics or reads out of range, and a
// parsed message never claims more than its bytes hold.
func FuzzReplies(f *testing.F) {
	msg := func(typ uint16, seq uint32, payload []byte) []byte {
		b := make([]byte, unix.NLMSG_HDRLEN+len(payload))
		binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
		binary.NativeEndian.PutUint16(b[4:], typ)
		binary.NativeEndian.PutUint32(b[8:], seq)
		copy(b[unix.NLMSG_HDRLEN:], payload)
		return b
	}
	f.Add(msg(unix.SOCK_DIAG_BY_FAMILY, 1, make([]byte, sizeofInetDiagMsg)))
	f.Add(append(msg(unix.SOCK_DIAG_BY_FAMILY, 1, make([]byte, sizeofUnixDiagMsg+12)), msg(unix.NLMSG_DONE, 1, nil)...))
	f.Add(msg(unix.NLMSG_ERROR, 1, []byte{0xfe, 0xff, 0xff, 0xff}))
	f.Add([]byte{255, 255, 255, 255})
	f.Fuzz(func(t *testing.T, b []byte) {
		walk(b, 1, false, func(p []byte) error {
			ParseInetDiagMsg(p)
			if m, err := ParseUnixDiagMsg(p); err == nil && m.HasRQLen && len(p) < sizeofUnixDiagMsg+12 {
				t.Fatalf("queue read from %d bytes", len(p))
			}
			return nil
		})
	})
}
