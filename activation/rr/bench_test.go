package rr

import (
	"os"
	"sync"
	"testing"
	"time"
)

// BenchmarkPassFD measures connections passed per second through the
// round-robin channel (encode, sendmsg with MaxFDs fds, recvmsg, decode,
// close), without TCP. Its baseline, measured in the same run, is plain
// sendmsg/recvmsg of one byte without fds over the same kind of socket; the
// ratio x-baseline is fds/s divided by baseline messages/s. Run it on one
// core with -cpu 1.
func BenchmarkPassFD(b *testing.B) {
	base := baseline(b, 100000)

	ch, w := newPair(b)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		b.Fatal(err)
	}
	defer devnull.Close()
	fds := make([]int, MaxFDs)
	for i := range fds {
		fds[i] = int(devnull.Fd())
	}
	var wg sync.WaitGroup
	var sendErr error
	b.ResetTimer()
	start := time.Now()
	wg.Go(func() { // sends b.N fds, then ends
		es := make([]entry, MaxFDs)
		var buf []byte
		for sent := 0; sent < b.N; sent += MaxFDs {
			n := min(MaxFDs, b.N-sent)
			for i := range n {
				es[i] = entry{id: uint64(sent + i)}
			}
			buf = appendConns(buf[:0], es[:n])
			if err := ch.s.send(buf, fds[:n]); err != nil {
				sendErr = err
				return
			}
		}
	})
	for got := 0; got < b.N; {
		ds, err := w.Recv()
		if err != nil {
			b.Fatal(err)
		}
		for _, d := range ds {
			d.File.Close()
		}
		got += len(ds)
	}
	elapsed := time.Since(start)
	wg.Wait()
	if sendErr != nil {
		b.Fatal(sendErr)
	}
	rate := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "fds/s")
	b.ReportMetric(base, "baseline-msgs/s")
	b.ReportMetric(rate/base, "x-baseline")
}

// baseline returns one-byte messages per second without fds.
func baseline(b *testing.B, n int) float64 {
	ch, w := newPair(b)
	var wg sync.WaitGroup
	defer wg.Wait()
	start := time.Now()
	wg.Go(func() { // sends n messages, then ends
		for range n {
			if err := ch.s.send([]byte{1}, nil); err != nil {
				return
			}
		}
	})
	buf := make([]byte, 1)
	for range n {
		if _, _, err := w.s.recv(buf, nil); err != nil {
			b.Fatal(err)
		}
	}
	return float64(n) / time.Since(start).Seconds()
}
