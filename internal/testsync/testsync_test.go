package testsync

import (
	"sync"
	"testing"
	"time"
)

func TestBufferConcurrent(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { b.Write([]byte("ab")) })
	}
	wg.Wait()
	if got := b.String(); got != "abababababababab" {
		t.Errorf("String() = %q", got)
	}
}

func TestWaitForHolds(t *testing.T) {
	start := time.Now()
	WaitFor(t, time.Second, "a condition that becomes true", func() bool { return time.Since(start) > 20*time.Millisecond })
}
