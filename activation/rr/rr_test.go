package rr

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testproc"
	"golang.org/x/sys/unix"
)

// tcpConns returns n connected pairs over 127.0.0.1: the client side and
// the accepted side as an *os.File (fileConn makes a Conn of it).
func tcpConns(t testing.TB, n int) (clients []net.Conn, files []*os.File) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		f, err := s.(*net.TCPConn).File()
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		files = append(files, f)
	}
	return clients, files
}

// fileConn makes the Conn id of f (which it closes), accepted on
// listener.
func fileConn(t testing.TB, id uint64, listener uint16, f *os.File) Conn {
	t.Helper()
	c, err := FileConn(f, listener)
	if err != nil {
		t.Fatal(err)
	}
	c.ID = id
	return c
}

func newPair(t testing.TB) (*Channel, *Worker) {
	t.Helper()
	ch, wf, err := NewPair()
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewWorker(wf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.Close()
		left, _ := ch.Close()
		for _, c := range left {
			c.Close()
		}
	})
	if _, bench := t.(*testing.B); !bench {
		// A lost message fails the test with a timeout instead of hanging it.
		deadline := time.Now().Add(10 * time.Second)
		ch.SetReadDeadline(deadline)
		w.SetReadDeadline(deadline)
	}
	return ch, w
}

// A Recv that times out reads nothing: the Channel is still usable.
func TestChannelReadDeadline(t *testing.T) {
	ch, w := newPair(t)
	ch.SetReadDeadline(time.Now())
	if _, err := ch.Recv(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Recv past the deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	if err := w.Send(TypeClosed, []uint64{5}); err != nil {
		t.Fatal(err)
	}
	ch.SetReadDeadline(time.Now().Add(10 * time.Second))
	if ev, err := ch.Recv(); err != nil || ev.Type != TypeClosed || !slices.Equal(ev.IDs, []uint64{5}) {
		t.Fatalf("Recv after a timeout = %+v, %v, want CLOSED [5]", ev, err)
	}
}

func TestSendRecvAckClosedReject(t *testing.T) {
	ch, w := newPair(t)
	const n = MaxFDs + 8
	clients, files := tcpConns(t, n+2)
	conns := make([]Conn, n)
	for i := range conns {
		conns[i] = fileConn(t, uint64(100+i), uint16(i%2), files[i])
	}
	if err := ch.Send(conns...); err != nil {
		t.Fatal(err)
	}
	if got := ch.Unacked(); got != n {
		t.Fatalf("Unacked = %d, want %d", got, n)
	}
	var got []Delivery
	for len(got) < n {
		ds, err := w.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(ds) > MaxFDs {
			t.Fatalf("got %d conns in one message, max %d", len(ds), MaxFDs)
		}
		got = append(got, ds...)
	}
	var ids []uint64
	for i, d := range got {
		if d.ID != conns[i].ID || d.Listener != conns[i].Listener {
			t.Fatalf("delivery %d = {%d %d}, want {%d %d}", i, d.ID, d.Listener, conns[i].ID, conns[i].Listener)
		}
		// The worker's copy is the real connection: write through it.
		c, err := net.FileConn(d.File)
		d.File.Close()
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "conn %d\n", d.ID)
		c.Close()
		ids = append(ids, d.ID)
	}
	if err := w.Send(TypeAck, ids); err != nil {
		t.Fatal(err)
	}
	ev, err := ch.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if ev.Type != TypeAck || !slices.Equal(ev.IDs, ids) {
		t.Fatalf("event = %v %v, want ACK %v", ev.Type, ev.IDs, ids)
	}
	// The dispatcher closed its copies on ACK and the worker closed its
	// own: the client sees its line, then end of stream.
	for i, c := range clients[:n] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil || string(b) != fmt.Sprintf("conn %d\n", 100+i) {
			t.Fatalf("client %d read %q, %v", i, b, err)
		}
	}
	if ch.Unacked() != 0 || ch.Open() != n {
		t.Fatalf("Unacked, Open = %d, %d, want 0, %d", ch.Unacked(), ch.Open(), n)
	}
	if err := w.Send(TypeClosed, ids[:3]); err != nil {
		t.Fatal(err)
	}
	if ev, err := ch.Recv(); err != nil || ev.Type != TypeClosed || ch.Open() != n-3 {
		t.Fatalf("after CLOSED: %v, %v, Open = %d", ev, err, ch.Open())
	}

	// REJECT hands the dispatcher's copies back.
	if err := ch.Send(fileConn(t, 1, 0, files[n]), fileConn(t, 2, 0, files[n+1])); err != nil {
		t.Fatal(err)
	}
	ds, err := w.Recv()
	if err != nil || len(ds) != 2 {
		t.Fatalf("Recv = %v, %v", ds, err)
	}
	for _, d := range ds {
		d.File.Close()
	}
	if err := w.Send(TypeReject, []uint64{1, 2}); err != nil {
		t.Fatal(err)
	}
	ev, err = ch.Recv()
	if err != nil || ev.Type != TypeReject || len(ev.Rejected) != 2 || ev.Rejected[0].ID != 1 {
		t.Fatalf("after REJECT: %+v, %v", ev, err)
	}
	for _, c := range ev.Rejected {
		c.Close()
	}
	if ch.Unacked() != 0 {
		t.Fatalf("Unacked = %d after REJECT", ch.Unacked())
	}
}

func TestSendInvalid(t *testing.T) {
	ch, _ := newPair(t)
	_, files := tcpConns(t, 1)
	c := fileConn(t, 1, 0, files[0])
	defer c.Close()
	for _, conns := range [][]Conn{
		{{ID: 1}},
		{c, c},
	} {
		if err := ch.Send(conns...); !errors.Is(err, ErrInvalidConn) || !errors.Is(err, ErrNotSent) {
			t.Errorf("Send(%v) = %v, want ErrInvalidConn and ErrNotSent", conns, err)
		}
	}
	if ch.Unacked() != 0 {
		t.Fatalf("Unacked = %d after invalid sends", ch.Unacked())
	}
}

// A worker that exits leaves its unacknowledged conns to the dispatcher,
// which gets them back from Close in send order.
func TestWorkerExitReturnsUnacked(t *testing.T) {
	ch, w := newPair(t)
	_, files := tcpConns(t, 7)
	var conns []Conn
	for i, f := range files[:5] {
		conns = append(conns, fileConn(t, uint64(i), 0, f))
	}
	if err := ch.Send(conns...); err != nil {
		t.Fatal(err)
	}
	ds, err := w.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(TypeAck, []uint64{ds[1].ID}); err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		d.File.Close()
	}
	w.Close()
	if ev, err := ch.Recv(); err != nil || ev.Type != TypeAck {
		t.Fatalf("Recv = %v, %v, want the ACK", ev, err)
	}
	if _, err := ch.Recv(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Recv after worker exit = %v, want net.ErrClosed", err)
	}
	if err := ch.Send(fileConn(t, 9, 0, files[5])); err == nil || errors.Is(err, ErrNotSent) {
		t.Fatalf("Send to an exited worker = %v, want a failed sendmsg (the Channel owns the Conn)", err)
	}
	left, err := ch.Close()
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint64
	for _, c := range left {
		ids = append(ids, c.ID)
		c.Close()
	}
	if want := []uint64{0, 2, 3, 4, 9}; !slices.Equal(ids, want) {
		t.Fatalf("Close returned %v, want %v", ids, want)
	}
	if _, err := ch.Recv(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Recv after Close = %v, want net.ErrClosed", err)
	}
	late := fileConn(t, 10, 0, files[6])
	defer late.Close() // not sent: still the caller's
	if err := ch.Send(late); !errors.Is(err, ErrNotSent) || !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Send after Close = %v, want ErrNotSent and net.ErrClosed", err)
	}
}

// A worker that acknowledges connections and then exits with a CONNS
// message unread makes the kernel report ECONNRESET on the dispatcher's
// end before the ACK it sent; Recv must still return that ACK first, or
// the dispatcher would hand acknowledged connections to a second worker.
func TestAckBeforeResetIsRead(t *testing.T) {
	ch, w := newPair(t)
	_, files := tcpConns(t, 2)
	if err := ch.Send(fileConn(t, 1, 0, files[0])); err != nil {
		t.Fatal(err)
	}
	ds, err := w.Recv()
	if err != nil {
		t.Fatal(err)
	}
	ds[0].File.Close()
	if err := ch.Send(fileConn(t, 2, 0, files[1])); err != nil { // never read
		t.Fatal(err)
	}
	if err := w.Send(TypeAck, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	w.Close()
	ev, err := ch.Recv()
	if err != nil || ev.Type != TypeAck || !slices.Equal(ev.IDs, []uint64{1}) {
		t.Fatalf("Recv = %+v, %v; want the ACK of 1", ev, err)
	}
	if _, err := ch.Recv(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Recv after the ACK = %v, want net.ErrClosed", err)
	}
	left, _ := ch.Close()
	if len(left) != 1 || left[0].ID != 2 {
		t.Fatalf("Close returned %+v, want only conn 2", left)
	}
	left[0].Close()
}

// rawPair returns a raw peer fd and the other end as a Worker and as a
// Channel's socket, for sending hand-made messages.
func rawPair(t *testing.T) (raw int, other *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]) })
	return fds[0], os.NewFile(uintptr(fds[1]), FDName)
}

// Every malformed message is refused and every fd that came with it is
// closed, on both ends.
func TestMalformedMessagesLeakNoFDs(t *testing.T) {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	dn := int(devnull.Fd())
	fdsOf := func(n int) []int { return slices.Repeat([]int{dn}, n) }
	good := func(n int) []byte {
		es := make([]entry, n)
		for i := range es {
			es[i].id = uint64(i)
		}
		return appendConns(nil, es)
	}
	bad := func(b []byte, i int, v byte) []byte { b = slices.Clone(b); b[i] = v; return b }
	cases := []struct {
		name string
		msg  []byte
		fds  []int
	}{
		{"short", []byte{1, 1, 1}, fdsOf(1)},
		{"empty with fds", nil, fdsOf(2)},
		{"version", bad(good(2), 0, 9), fdsOf(2)},
		{"type", bad(good(2), 1, 9), fdsOf(2)},
		{"reserved", bad(good(2), 5, 1), fdsOf(2)},
		{"entry reserved", bad(good(2), HeaderSize+12, 1), fdsOf(2)},
		{"count mismatch", bad(good(2), 2, 3), fdsOf(2)},
		{"fewer fds", good(3), fdsOf(2)},
		{"more fds", good(2), fdsOf(3)},
		{"ack with fds", appendIDs(nil, TypeAck, []uint64{1}), fdsOf(1)},
		{"too many fds (MSG_CTRUNC)", good(MaxFDs), fdsOf(MaxFDs + 10)},
		{"too long (MSG_TRUNC)", append(good(1), make([]byte, MaxMessage)...), fdsOf(1)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			raw, wf := rawPair(t)
			w, err := NewWorker(wf)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			before := testproc.OpenFDs(t)
			if err := unix.Sendmsg(raw, tc.msg, unix.UnixRights(tc.fds...), nil, 0); err != nil {
				t.Fatal(err)
			}
			w.SetReadDeadline(time.Now().Add(5 * time.Second))
			ds, err := w.Recv()
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("Recv = %v, %v, want ErrProtocol", ds, err)
			}
			if after := testproc.OpenFDs(t); after != before {
				t.Fatalf("%d fds before, %d after", before, after)
			}
		})
	}
	t.Run("dispatcher end", func(t *testing.T) {
		ch, w := newPair(t)
		before := testproc.OpenFDs(t)
		// A worker must not send fds; reach under Worker.Send to do it.
		if err := w.s.send(appendIDs(nil, TypeAck, []uint64{1}), fdsOf(3)); err != nil {
			t.Fatal(err)
		}
		if _, err := ch.Recv(); !errors.Is(err, ErrProtocol) {
			t.Fatalf("Recv = %v, want ErrProtocol", err)
		}
		if after := testproc.OpenFDs(t); after != before {
			t.Fatalf("%d fds before, %d after", before, after)
		}
	})
}

// The worker's end is a LISTEN_FDS entry; it must be SOCK_SEQPACKET.
func TestNewWorkerRejectsStreamSocket(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	if _, err := NewWorker(os.NewFile(uintptr(fds[0]), FDName)); err == nil {
		t.Fatal("NewWorker accepted a SOCK_STREAM socket")
	}
}

// A Conn owns one descriptor: FileConn takes a close-on-exec duplicate of
// the File's and closes the File, Close closes the descriptor once, and
// the zero Conn holds none (so it never closes fd 0).
func TestConnOwnsItsDescriptor(t *testing.T) {
	before := testproc.OpenFDs(t)
	var zero Conn
	if zero.FD() != -1 || !errors.Is(zero.Close(), ErrInvalidConn) {
		t.Fatalf("zero Conn: FD = %d, Close = %v; want -1 and ErrInvalidConn", zero.FD(), zero.Close())
	}
	clients, files := tcpConns(t, 1)
	c := fileConn(t, 7, 3, files[0])
	if c.ID != 7 || c.Listener != 3 {
		t.Fatalf("Conn = %+v", c)
	}
	if err := files[0].Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("FileConn left its File open (Close = %v)", err)
	}
	flags, err := unix.FcntlInt(uintptr(c.FD()), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("F_GETFD = %#x, %v; want close-on-exec", flags, err)
	}
	if _, err := unix.Write(c.FD(), []byte("x")); err != nil {
		t.Fatalf("write through the Conn: %v", err)
	}
	buf := make([]byte, 1)
	clients[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(clients[0], buf); err != nil || buf[0] != 'x' {
		t.Fatalf("client read %q, %v", buf, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(c.FD()), unix.F_GETFD, 0); err != unix.EBADF {
		t.Fatalf("after Close, F_GETFD = %v, want EBADF", err)
	}
	if after := testproc.OpenFDs(t); after != before+1 { // the client's end, closed at cleanup
		t.Fatalf("%d fds before, %d after", before, after)
	}
}
