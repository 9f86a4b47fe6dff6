package rr

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// epollTargets returns every fd that some epoll set of this process
// watches (the "tfd:" lines of /proc/self/fdinfo of each eventpoll fd).
// In this test binary the only sets are Go's netpoller's.
func epollTargets(t *testing.T) map[int]bool {
	t.Helper()
	links, err := filepath.Glob("/proc/self/fd/*")
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]bool{}
	for _, l := range links {
		if dest, err := os.Readlink(l); err != nil || dest != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + filepath.Base(l))
		if err != nil {
			continue // closed meanwhile
		}
		for line := range strings.Lines(string(info)) {
			f := strings.Fields(line)
			if len(f) >= 2 && f[0] == "tfd:" {
				if fd, err := strconv.Atoi(f[1]); err == nil {
					out[fd] = true
				}
			}
		}
	}
	return out
}

// netpollerFD returns an fd that is in Go's netpoller, so that a test that
// finds some fd missing from every epoll set knows it looked in the right
// place.
func netpollerFD(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatal(err)
	}
	if !epollTargets(t)[fd] {
		t.Fatalf("a net.Listener's fd %d is in no epoll set: epollTargets cannot see the netpoller", fd)
	}
	return fd
}

// The dispatcher's end stays out of Go's netpoller: there, every ACK and
// every message the worker read woke a runtime thread for nothing (the
// netpoller watches both directions, edge-triggered, waiter or not).
func TestChannelOutOfNetpoller(t *testing.T) {
	ch, w := newPair(t)
	var fd int
	if err := ch.FD(func(f int) { fd = f }); err != nil {
		t.Fatal(err)
	}
	if watched := epollTargets(t); watched[fd] {
		t.Fatalf("the dispatcher's end (fd %d) is in an epoll set of the process (%v)", fd, watched)
	}
	// It still works both ways.
	if err := w.Send(TypeClosed, []uint64{5}); err != nil {
		t.Fatal(err)
	}
	if ev, err := ch.Recv(); err != nil || ev.Type != TypeClosed {
		t.Fatalf("Recv = %+v, %v, want CLOSED", ev, err)
	}
}

// A deadline set while Recv waits ends that wait.
func TestChannelDeadlineWakesRecv(t *testing.T) {
	ch, _ := newPair(t)
	ch.SetReadDeadline(time.Time{})
	got := make(chan error, 1)
	go func() {
		_, err := ch.Recv()
		got <- err
	}()
	time.Sleep(20 * time.Millisecond) // let it wait
	ch.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	select {
	case err := <-got:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Recv = %v, want os.ErrDeadlineExceeded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Recv still waits after its deadline passed")
	}
}

// Close ends a Recv and a WaitWritable that wait.
func TestChannelCloseWakesWaiters(t *testing.T) {
	ch, _ := newPair(t)
	ch.SetReadDeadline(time.Time{})
	cs := conns(t, 1, 1)
	for id := uint64(1); ; id++ { // fill the worker's queue
		c := cs[0]
		c.ID = id
		if _, err := ch.TrySend(c); errors.Is(err, ErrWouldBlock) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	recvd := make(chan error, 1)
	waited := make(chan error, 1)
	go func() {
		_, err := ch.Recv()
		recvd <- err
	}()
	go func() { waited <- ch.WaitWritable() }()
	time.Sleep(20 * time.Millisecond) // let them wait
	left, err := ch.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range left {
		c.Close()
	}
	for name, done := range map[string]chan error{"Recv": recvd, "WaitWritable": waited} {
		select {
		case err := <-done:
			if name == "Recv" && !errors.Is(err, net.ErrClosed) {
				t.Errorf("Recv after Close = %v, want net.ErrClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still waits after Close", name)
		}
	}
}

// The worker's end stays out of Go's netpoller too: there, each ACK the
// dispatcher read woke the worker's idle netpoller thread, and the
// dispatcher paid for that wake-up (issue 19).
func TestWorkerOutOfNetpoller(t *testing.T) {
	netpollerFD(t)
	ch, w := newPair(t)
	var fd int
	if err := w.s.control(func(f int) { fd = f }); err != nil {
		t.Fatal(err)
	}
	if watched := epollTargets(t); watched[fd] {
		t.Fatalf("the worker's end (fd %d) is in an epoll set of the process (%v)", fd, watched)
	}
	// Both directions still work.
	if _, err := ch.TrySend(conns(t, 1, 1)[0]); err != nil {
		t.Fatal(err)
	}
	ds, err := w.Recv()
	if err != nil || len(ds) != 1 {
		t.Fatalf("Recv = %v, %v, want one delivery", ds, err)
	}
	ds[0].File.Close()
	if err := w.Send(TypeAck, []uint64{ds[0].ID}); err != nil {
		t.Fatal(err)
	}
	if ev, err := ch.Recv(); err != nil || ev.Type != TypeAck {
		t.Fatalf("Recv = %+v, %v, want ACK", ev, err)
	}
}

// Close and a new deadline end a worker's Recv that waits.
func TestWorkerRecvWakes(t *testing.T) {
	for _, how := range []string{"close", "deadline"} {
		t.Run(how, func(t *testing.T) {
			_, w := newPair(t)
			w.SetReadDeadline(time.Time{})
			got := make(chan error, 1)
			go func() {
				_, err := w.Recv()
				got <- err
			}()
			time.Sleep(20 * time.Millisecond) // let it wait
			want := net.ErrClosed
			if how == "close" {
				w.Close()
			} else {
				w.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
				want = os.ErrDeadlineExceeded
			}
			select {
			case err := <-got:
				if !errors.Is(err, want) {
					t.Fatalf("Recv = %v, want %v", err, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Recv still waits")
			}
		})
	}
}
