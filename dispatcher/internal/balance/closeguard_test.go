package balance

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testsync"
	"golang.org/x/sys/unix"
)

// lingeringSocket returns the server's end of a loopback TCP connection
// whose close waits up to 30 s: its client does not read, both buffers
// are full and SO_LINGER is on (fillAndLinger). The client is closed at
// the end of the test.
func lingeringSocket(t *testing.T) *os.File {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialNonReading(t, ln.Addr().String())
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := sc.(*net.TCPConn).File() // a blocking copy, out of the netpoller
	sc.Close()
	if err != nil {
		t.Fatal(err)
	}
	fillAndLinger(t, f)
	return f
}

// TestCloseGuardEndsAWaitingClose: a close that waits for a client (a
// worker set SO_LINGER again after rr.Conn.Close turned it off) is ended
// by the balancer's watcher within two looks, and logged. Without the
// guard it waits the full 30 s.
func TestCloseGuardEndsAWaitingClose(t *testing.T) {
	warned := make(chan string, 16)
	cfg := Config{MaxPending: 8, MaxHandoffs: 8, AckTimeout: 10 * time.Second,
		Warnf: func(format string, args ...any) {
			select {
			case warned <- fmt.Sprintf(format, args...):
			default:
			}
		},
		Infof: func(string, ...any) {}}
	testBalancer(t, cfg, 1)

	f := lingeringSocket(t)
	tid := make(chan int, 1)
	closed := make(chan time.Duration, 1)
	go func() {
		runtime.LockOSThread() // the thread ends with the goroutine: it was signalled
		tid <- unix.Gettid()
		start := time.Now()
		f.Close() // a blocking File: close(2) in this thread
		closed <- time.Since(start)
	}()
	closer := <-tid
	select {
	case took := <-closed:
		if took < 500*time.Millisecond {
			t.Fatalf("the close returned after %v: the socket did not linger, so this test shows nothing", took)
		}
	case <-time.After(4 * closeGuardEvery):
		unix.Tgkill(os.Getpid(), closer, unix.SIGURG) // what the guard should have done
		<-closed
		t.Fatalf("the close still waited after %v", 4*closeGuardEvery)
	}
	testsync.WaitFor(t, time.Second, "the warning", func() bool {
		select {
		case w := <-warned:
			return strings.Contains(w, fmt.Sprintf("thread %d", closer)) && strings.Contains(w, "interrupted")
		default:
			return false
		}
	})
}

// TestCloseGuardStopsTheWorker: a close that waits in an event loop's
// drain of a worker's channel closes a connection that worker
// acknowledged or rejected, and only that worker can have made it wait
// (it set SO_LINGER again after the dispatcher turned it off; its client
// does not read). Ending the wait is not enough: such a worker could stop
// the loop once per connection it is given. The guard names it, and the
// watcher takes its channel back and reports it, so the supervisor
// replaces it; the other worker goes on serving.
//
// A real close waits, of a lingering socket; the loop's drain of worker
// 0 is stood in for by setting what drainOn sets (winning the worker's
// race against the dispatcher's SO_LINGER check on demand is not
// possible from a test).
func TestCloseGuardStopsTheWorker(t *testing.T) {
	served := new(atomic.Int64)
	runs := []func(*os.File){
		func(end *os.File) { fakeWorker(end, served, nil) },
		func(end *os.File) { fakeWorker(end, served, nil) },
	}
	cfg := Config{MaxPending: 8, MaxHandoffs: 8, AckTimeout: 10 * time.Second}
	b, addr, ready, _ := startBalancer(t, cfg, runs)
	ready()
	b.mu.Lock()
	w := b.byPID[1000]
	b.mu.Unlock()
	testsync.WaitFor(t, 5*time.Second, "both workers' HELLO", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.byPID[1000].spoke && b.byPID[1001].spoke
	})

	f := lingeringSocket(t)
	l := b.loops[w.loop]
	closed := make(chan time.Duration, 1)
	go func() {
		l.drains.Add(1)
		l.draining.Store(w)
		defer l.draining.Store(nil)
		start := time.Now()
		f.Close() // a blocking File: close(2) in this thread
		closed <- time.Since(start)
	}()
	var faults []Fault
	testsync.WaitFor(t, 4*closeGuardEvery, "a fault", func() bool {
		select {
		case <-b.Faults():
			faults = append(faults, b.TakeFaults(func(int) bool { return true })...)
		default:
		}
		return len(faults) > 0
	})
	for _, f := range faults { // one from the watcher, one when the loop retires the channel it shut down
		if f.PID != 1000 || !strings.Contains(f.Why, "SO_LINGER") {
			t.Fatalf("faults %+v, want only worker 0 (pid 1000), for SO_LINGER", faults)
		}
	}
	select {
	case took := <-closed:
		if took < 500*time.Millisecond {
			t.Fatalf("the close returned after %v: the socket did not linger, so this test shows nothing", took)
		}
	case <-time.After(closeGuardEvery):
		t.Fatal("the worker was reported, but its close still waits")
	}

	// Worker 0 gets nothing more; worker 1 serves every new client.
	for range 10 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if !errors.Is(err, io.EOF) {
			t.Fatalf("a client read %v, want the worker's close", err)
		}
	}
	b.mu.Lock()
	revoked, handed := w.revoked, w.handed
	b.mu.Unlock()
	if !revoked || handed != 0 {
		t.Fatalf("worker 0: revoked %v, handed %d connections; want revoked and none", revoked, handed)
	}
}
