package balance

import (
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// The dispatcher holds its copy of a connection as a bare descriptor
// (rr.Conn), with no finalizer to close one it dropped: every path a
// connection takes must end in exactly one close. A worker that rejects
// everything and one that dies with connections unacknowledged send
// each connection back to the balancer, which hands it to the worker
// that serves; once all are served and the balancer is closed, the
// process holds exactly the descriptors it held before.
func TestEveryConnectionClosedOnce(t *testing.T) {
	before := countFDs(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	lf, err := ln.(*net.TCPListener).File()
	ln.Close()
	if err != nil {
		t.Fatal(err)
	}
	bal, err := New(context.Background(), Config{
		Listeners: []*os.File{lf}, Names: []string{"http"},
		MaxPending: 8, MaxHandoffs: 1000, AckTimeout: 10 * time.Second,
		Warnf: func(string, ...any) {}, Infof: func(string, ...any) {},
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	served := new(atomic.Int64)
	var rejected, stranded atomic.Int64
	workers := []func(end *os.File){
		func(end *os.File) { fakeWorker(end, served, nil) },
		func(end *os.File) { // rejects everything it is sent
			w, err := rr.NewWorker(end)
			if err != nil {
				return
			}
			defer w.Close()
			w.Hello()
			for {
				ds, err := w.Recv()
				if err != nil {
					return
				}
				ids := make([]uint64, len(ds))
				for i, d := range ds {
					ids[i] = d.ID
					d.File.Close()
				}
				rejected.Add(int64(len(ds)))
				if w.Send(rr.TypeReject, ids) != nil {
					return
				}
			}
		},
		func(end *os.File) { // takes one message and dies with it unacknowledged
			w, err := rr.NewWorker(end)
			if err != nil {
				return
			}
			defer w.Close()
			w.Hello()
			ds, _ := w.Recv()
			for _, d := range ds {
				d.File.Close()
			}
			stranded.Add(int64(len(ds)))
		},
	}
	for i, run := range workers {
		st, err := bal.NewChannel(i)
		if err != nil {
			t.Fatal(err)
		}
		fd, err := unix.FcntlInt(st.End.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		end := os.NewFile(uintptr(fd), rr.FDName)
		st.Forked(1000 + i)
		wg.Go(func() { run(end) })
	}
	for i := range workers {
		bal.Ready(1000 + i)
	}
	const total = 200
	var cw sync.WaitGroup
	for range 8 {
		cw.Go(func() {
			for range total / 8 {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Error(err)
					return
				}
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				_, err = c.Read(b[:])
				c.Close()
				if err == nil || os.IsTimeout(err) {
					t.Errorf("read %v: want the server's close", err)
					return
				}
			}
		})
	}
	cw.Wait()
	bal.Stop()
	bal.Close()
	wg.Wait()
	lf.Close()
	if served.Load() != total || rejected.Load() == 0 || stranded.Load() == 0 {
		t.Fatalf("served %d of %d; %d rejected, %d stranded by a dying worker (want some of each)", served.Load(), total, rejected.Load(), stranded.Load())
	}
	var after int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if after = countFDs(t); after == before || time.Now().After(deadline) {
			break
		}
	}
	if after != before {
		t.Fatalf("%d descriptors before, %d after every connection ended", before, after)
	}
}

func countFDs(t testing.TB) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}
