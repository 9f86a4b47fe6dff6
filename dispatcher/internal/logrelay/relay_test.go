package logrelay

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a stream's writer and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls cond until it holds, failing t after timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCopyLinesSplit: a line longer than maxLine is passed on in
// maxLine pieces, and a last line without a newline is passed on.
func TestCopyLinesSplit(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	o := New(Config{App: "a", Stdout: &out, Stderr: io.Discard})
	in := strings.Repeat("z", 2*maxLine+maxLine/2) + "\nsecond\n\nno newline"
	o.CopyLines(Tag{Index: 3}, io.NopCloser(strings.NewReader(in)))
	o.Close()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	var lens []int
	for _, l := range lines {
		lens = append(lens, len(strings.TrimPrefix(l, "[a.3] ")))
	}
	want := []int{maxLine, maxLine, maxLine / 2, len("second"), 0, len("no newline")}
	if fmt.Sprint(lens) != fmt.Sprint(want) {
		t.Errorf("line lengths %v, want %v", lens, want)
	}
}
