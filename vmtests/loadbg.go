package vmtests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// FailureKinds sorts the failed requests of a load by what the client saw.
// Refused is the figure socket activation promises to keep at 0: systemd
// holds the listening socket, so a connect never fails while the service
// restarts. Reset and Closed are connections a worker had accepted when it
// died (RST, or a close before any response).
type FailureKinds struct {
	Refused int // ECONNREFUSED: nothing listened
	Reset   int // ECONNRESET or EPIPE
	Closed  int // EOF before a complete response
	Timeout int // no answer within LoadOptions.Timeout
	Other   int
}

func (k FailureKinds) String() string {
	return fmt.Sprintf("refused %d, reset %d, closed %d, timeout %d, other %d",
		k.Refused, k.Reset, k.Closed, k.Timeout, k.Other)
}

// failureKind names the kind of a failed request.
func failureKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return "other"
}

// BackgroundLoad is Load running in the background while a scenario acts
// on the service (restart, kill), with a live count of 2xx answers so that
// the scenario can wait for traffic before and after the event instead of
// sleeping, and with the failures sorted by kind.
type BackgroundLoad struct {
	opts   LoadOptions
	ok     atomic.Int64
	cancel context.CancelFunc
	done   chan struct{}

	mu    sync.Mutex
	res   LoadResult
	kinds FailureKinds
}

// StartLoad starts a bounded load (opts as for Load: loopback only,
// Requests and Duration required). It stops at those bounds or at Stop,
// and at the latest when t ends.
func StartLoad(t testing.TB, opts LoadOptions) *BackgroundLoad {
	t.Helper()
	opts, err := checkLoad(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), opts.Duration)
	l := &BackgroundLoad{opts: opts, cancel: cancel, done: make(chan struct{}), res: LoadResult{Status: map[int]int{}}}
	t.Cleanup(func() { l.Stop() })
	start := time.Now()
	go func() {
		runLoad(ctx, opts, l.record)
		l.mu.Lock()
		l.res.Elapsed = time.Since(start)
		l.mu.Unlock()
		close(l.done)
	}()
	return l
}

func (l *BackgroundLoad) record(code int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.res.add(code, err)
	switch {
	case err != nil:
		switch failureKind(err) {
		case "refused":
			l.kinds.Refused++
		case "reset":
			l.kinds.Reset++
		case "closed":
			l.kinds.Closed++
		case "timeout":
			l.kinds.Timeout++
		default:
			l.kinds.Other++
		}
	case code >= 200 && code < 300:
		l.ok.Add(1)
	}
}

// OK is the number of 2xx answers so far.
func (l *BackgroundLoad) OK() int64 { return l.ok.Load() }

// WaitOK waits until n more 2xx answers than now have arrived, and fails t
// after timeout or when the load ended first.
func (l *BackgroundLoad) WaitOK(t testing.TB, n int64, timeout time.Duration) {
	t.Helper()
	want := l.OK() + n
	Eventually(t, timeout, fmt.Sprintf("%d more 2xx answers", n), func() error {
		if got := l.OK(); got < want {
			select {
			case <-l.done:
				return fmt.Errorf("the load ended at %d 2xx answers, before %d", got, want)
			default:
			}
			return fmt.Errorf("%d 2xx answers, want %d", got, want)
		}
		return nil
	})
}

// Stop ends the load (requests in flight are abandoned, not counted) and
// returns what it counted.
func (l *BackgroundLoad) Stop() (LoadResult, FailureKinds) {
	l.cancel()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.res, l.kinds
}
