package balance

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/internal/testproc"
)

// The dispatcher holds its copy of a connection as a bare descriptor
// (rr.Conn), with no finalizer to close one it dropped: every path a
// connection takes must end in exactly one close. A worker that rejects
// everything and one that dies with connections unacknowledged send
// each connection back to the balancer, which hands it to the worker
// that serves; once all are served and the balancer is closed, the
// process holds exactly the descriptors it held before.
func TestEveryConnectionClosedOnce(t *testing.T) {
	before := testproc.OpenFDs(t)
	served := new(atomic.Int64)
	var rejected, stranded atomic.Int64
	workers := []func(end *os.File){
		func(end *os.File) { fakeWorker(end, served, nil) },
		func(end *os.File) { // rejects everything it is sent
			serveChannel(end, nil, func(w *rr.Worker, ids []uint64) bool {
				rejected.Add(int64(len(ids)))
				return w.Send(rr.TypeReject, ids) == nil
			})
		},
		func(end *os.File) { // takes one message and dies with it unacknowledged
			serveChannel(end, nil, func(_ *rr.Worker, ids []uint64) bool {
				stranded.Add(int64(len(ids)))
				return false
			})
		},
	}
	addr, ready, stop := testBalancerRuns(t, Config{MaxPending: 8, MaxHandoffs: 1000, AckTimeout: 10 * time.Second}, workers)
	ready()
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
	stop()
	if served.Load() != total || rejected.Load() == 0 || stranded.Load() == 0 {
		t.Fatalf("served %d of %d; %d rejected, %d stranded by a dying worker (want some of each)", served.Load(), total, rejected.Load(), stranded.Load())
	}
	var after int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if after = testproc.OpenFDs(t); after == before || time.Now().After(deadline) {
			break
		}
	}
	if after != before {
		t.Fatalf("%d descriptors before, %d after every connection ended", before, after)
	}
}
