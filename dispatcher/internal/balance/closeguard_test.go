package balance

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
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
