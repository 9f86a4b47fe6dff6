package vmtests

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"
)

// poll calls check until it returns nil or ctx is done, and returns ctx's
// error in that case. The interval starts at 20 ms and grows to 500 ms, so
// that fast events are seen fast and slow ones do not spin.
func poll(ctx context.Context, check func() error) error {
	interval := 20 * time.Millisecond
	for {
		if check() == nil {
			return nil
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		interval = min(interval*3/2, 500*time.Millisecond)
	}
}

// Eventually calls check until it returns nil, and fails t (with check's
// last error) when that has not happened within timeout. It is the only
// way the harness waits: no fixed sleeps.
func Eventually(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	if err := EventuallyErr(timeout, check); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// EventuallyErr is Eventually returning the error instead of failing: check's
// last error, annotated with the timeout.
func EventuallyErr(timeout time.Duration, check func() error) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	err := poll(ctx, func() error {
		last = check()
		return last
	})
	if err != nil {
		return fmt.Errorf("not within %v: %w", timeout, last)
	}
	return nil
}

// FreePort returns a TCP port on 127.0.0.1 that is free right now. The
// containers share the host's network namespace, so every container and
// every scenario takes its ports from here to avoid collisions.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
