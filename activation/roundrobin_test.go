package activation

import (
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// rrSetup returns a dispatcher Channel and a demux over its other end with
// listeners named names (none opened yet).
func rrSetup(t *testing.T, n int) (*rr.Channel, *demux) {
	t.Helper()
	ch, wf, err := rr.NewPair()
	if err != nil {
		t.Fatal(err)
	}
	w, err := rr.NewWorker(wf)
	if err != nil {
		t.Fatal(err)
	}
	d := newDemux(w, n)
	t.Cleanup(func() {
		left, _ := ch.Close()
		for _, c := range left {
			c.File.Close()
		}
		d.mu.Lock()
		if !d.sockClosed {
			d.sockClosed = true
			w.Close()
		}
		for _, q := range d.queues {
			for _, dl := range q {
				dl.File.Close()
			}
		}
		d.mu.Unlock()
	})
	return ch, d
}

// sendConns connects n clients to a fresh 127.0.0.1 listener and sends the
// accepted sides for listener idx with ids from first on.
func sendConns(t *testing.T, ch *rr.Channel, idx uint16, first uint64, n int) []net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var clients []net.Conn
	var conns []rr.Conn
	for i := range n {
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
		conns = append(conns, rr.Conn{ID: first + uint64(i), Listener: idx, File: f})
	}
	if err := ch.Send(conns...); err != nil {
		t.Fatal(err)
	}
	return clients
}

// recvIDs collects ids of events of type typ until it has want of them.
func recvIDs(t *testing.T, ch *rr.Channel, typ rr.Type, want int) []uint64 {
	t.Helper()
	var ids []uint64
	for len(ids) < want {
		ev, err := ch.Recv()
		if err != nil {
			t.Fatalf("waiting for %d %v ids, got %v: %v", want, typ, ids, err)
		}
		if ev.Type == typ {
			ids = append(ids, ev.IDs...)
		}
		for _, c := range ev.Rejected {
			c.File.Close()
		}
	}
	slices.Sort(ids)
	return ids
}

func TestRoundRobinListeners(t *testing.T) {
	ch, d := rrSetup(t, 3)
	admin, err := d.listen(1, "admin")
	if err != nil {
		t.Fatal(err)
	}
	web, err := d.listen(0, "web")
	if err != nil {
		t.Fatal(err)
	}
	if got := web.Addr().String(); got != "web" {
		t.Fatalf("Addr = %q", got)
	}
	// 1 for listener 2 (never opened: rejected), 1 for listener 7 (unknown:
	// rejected), 3 for web, 2 for admin. The channel is read only by
	// Accept, so the first Accept reads them all.
	sendConns(t, ch, 2, 30, 1)
	sendConns(t, ch, 7, 40, 1)
	webClients := sendConns(t, ch, 0, 10, 3)
	sendConns(t, ch, 1, 20, 2)

	for i, client := range webClients {
		c, err := web.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if c.LocalAddr().String() != client.RemoteAddr().String() {
			t.Fatalf("conn %d local %s, client's remote %s", i, c.LocalAddr(), client.RemoteAddr())
		}
		c.Write([]byte("hi"))
		c.Close()
		// (No end of stream yet: the dispatcher's copy stays open until
		// it reads the ACK.)
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 2)
		if _, err := io.ReadFull(client, b); string(b) != "hi" || err != nil {
			t.Fatalf("client %d read %q, %v", i, b, err)
		}
	}
	for range 2 {
		c, err := admin.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if got := recvIDs(t, ch, rr.TypeReject, 2); !slices.Equal(got, []uint64{30, 40}) {
		t.Fatalf("rejected %v", got)
	}
	for ch.Unacked() > 0 {
		recvIDs(t, ch, rr.TypeAck, 1)
	}
	for ch.Open() > 0 {
		recvIDs(t, ch, rr.TypeClosed, 1)
	}
}

// Close wakes a blocked Accept; queued conns of a closed listener are
// rejected; closing the last listener closes the channel after
// acknowledging what was taken.
func TestRoundRobinClose(t *testing.T) {
	ch, d := rrSetup(t, 2)
	a, _ := d.listen(0, "a")
	b, _ := d.listen(1, "b")

	accepted := make(chan error, 1)
	go func() { // ends when a is closed
		_, err := a.Accept()
		accepted <- err
	}()
	sendConns(t, ch, 1, 1, 2) // for b, in one message
	a.Close()
	select {
	case err := <-accepted:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not wake Accept")
	}
	c, err := b.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b.Close() // the last listener: ack 1, reject 2 (queued), close
	var acked, rejected []uint64
	for {
		ev, err := ch.Recv()
		if errors.Is(err, net.ErrClosed) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch ev.Type {
		case rr.TypeAck:
			acked = append(acked, ev.IDs...)
		case rr.TypeReject:
			rejected = append(rejected, ev.IDs...)
		}
		for _, c := range ev.Rejected {
			c.File.Close()
		}
	}
	if !slices.Equal(acked, []uint64{1}) || !slices.Equal(rejected, []uint64{2}) || ch.Unacked() != 0 {
		t.Fatalf("acked %v, rejected %v, unacked %d", acked, rejected, ch.Unacked())
	}
	if _, err := b.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on closed listener = %v", err)
	}
	if _, err := d.listen(0, "a"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("listen after channel close = %v", err)
	}
}

// A malformed message from the dispatcher ends the channel: Accept fails
// with ErrProtocol, what is queued goes back as REJECT, then the channel
// closes.
func TestRoundRobinProtocolError(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	raw := fds[0]
	defer unix.Close(raw)
	w, err := rr.NewWorker(os.NewFile(uintptr(fds[1]), rr.FDName))
	if err != nil {
		t.Fatal(err)
	}
	d := newDemux(w, 2)
	l, _ := d.listen(0, "x")
	d.listen(1, "y")
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	dn := int(devnull.Fd())
	// CONNS {id 7, listener 1}, well formed, then a version 9 message.
	conns := []byte{1, 1, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}
	bad := slices.Clone(conns)
	bad[0] = 9
	for _, m := range [][]byte{conns, bad} {
		if err := unix.Sendmsg(raw, m, unix.UnixRights(dn), nil, 0); err != nil {
			t.Fatal(err)
		}
	}
	before := countFDs(t)
	if _, err := l.Accept(); !errors.Is(err, rr.ErrProtocol) {
		t.Fatalf("Accept = %v, want ErrProtocol", err)
	}
	if after := countFDs(t); after != before-1 { // the channel itself is closed
		t.Fatalf("%d fds before, %d after", before, after)
	}
	unix.SetsockoptTimeval(raw, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 10})
	b := make([]byte, 64)
	n, err := unix.Read(raw, b)
	if err != nil || string(b[:n]) != string([]byte{1, 4, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("read %x, %v, want REJECT [7]", b[:n], err)
	}
	if n, err := unix.Read(raw, b); n != 0 || err != nil {
		t.Fatalf("read %x, %v, want end of stream", b[:n], err)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}
