package logrelay

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testsync"
)

// blockingWriter is an io.Writer whose writes wait until release is
// closed, then fail with err (nil: succeed).
type blockingWriter struct {
	release chan struct{}
	err     error
	out     testsync.Buffer
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	if b.err != nil {
		return 0, b.err
	}
	return b.out.Write(p)
}

// TestStreamDropsAndCounts: with a writer stuck in a write, puts that do
// not wait never block, what does not fit is dropped, and the count is
// exact when the source's lines flow again.
func TestStreamDropsAndCounts(t *testing.T) {
	t.Parallel()
	bw := &blockingWriter{release: make(chan struct{})}
	var notices testsync.Buffer
	s := newStream("stdout", bw)
	s.notice = func(m string) { notices.Write([]byte(m + "\n")) }
	src := Tag{Index: 2, PID: 7}
	line := []byte(strings.Repeat("x", 1023) + "\n")
	s.put(src, line, false) // taken by the writer, which blocks
	testsync.WaitFor(t, 5*time.Second, "writer busy", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return !s.writing.IsZero()
	})
	start := time.Now()
	for range 1000 {
		s.put(src, line, false)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("1000 puts into a stuck stream took %s", took)
	}
	queued := perSourceQueue / len(line) // 256
	close(bw.release)
	testsync.WaitFor(t, 5*time.Second, "queue written", func() bool {
		return strings.Count(bw.out.String(), "\n") == 1+queued
	})
	s.put(src, []byte("again\n"), false)
	if !s.close(5 * time.Second) {
		t.Fatal("writer did not end")
	}
	want := "stdout is not draining: dropping lines of worker 2 (pid 7) until it does\n" +
		"dropped " + strconv.Itoa(1000-queued) + " lines of worker 2 (pid 7): stdout was not taking them fast enough\n"
	if notices.String() != want {
		t.Errorf("notices:\n%s\nwant\n%s", notices.String(), want)
	}
	if got := strings.Count(bw.out.String(), "\n"); got != 1+queued+1 {
		t.Errorf("%d lines written, want %d", got, 1+queued+1)
	}
}

// TestStreamBrokenPipe: a write that fails (EPIPE) is said once; later
// lines are dropped without blocking.
func TestStreamBrokenPipe(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	defer w.Close()
	var notices testsync.Buffer
	s := newStream("stdout", w)
	s.notice = func(m string) { notices.Write([]byte(m + "\n")) }
	for range 100 {
		s.put(Tag{Index: 0, PID: 1}, []byte("line\n"), true)
	}
	testsync.WaitFor(t, 5*time.Second, "broken", func() bool { return strings.Contains(notices.String(), "broken pipe") })
	start := time.Now()
	for range 1000 {
		s.put(Tag{Index: 0, PID: 1}, []byte("line\n"), true)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("puts into a broken stream took %s", took)
	}
	if !s.close(time.Second) {
		t.Error("writer of a broken stream did not end")
	}
	if n := strings.Count(notices.String(), "failed"); n != 1 {
		t.Errorf("%d failure notices, want 1:\n%s", n, notices.String())
	}
}
