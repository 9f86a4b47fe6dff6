package testtool

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// recorder is a testing.TB that records how Missing ended it. Fatalf and
// Skipf end the goroutine as the real ones do (runtime.Goexit).
type recorder struct {
	testing.TB
	how, msg string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.how, r.msg = "fatal", fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Skipf(format string, args ...any) {
	r.how, r.msg = "skip", fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func run(t *testing.T, f func(testing.TB)) *recorder {
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
	}()
	<-done
	return r
}

// TestMissing: a missing tool skips without CI and fails with it.
func TestMissing(t *testing.T) {
	const tool = "cohort-no-such-tool-anywhere"
	t.Setenv(EnvCI, "")
	if r := run(t, func(tb testing.TB) { Need(tb, tool) }); r.how != "skip" {
		t.Errorf("without CI: %q, want skip", r.how)
	}
	t.Setenv(EnvCI, "1")
	if r := run(t, func(tb testing.TB) { Need(tb, tool) }); r.how != "fatal" {
		t.Errorf("with CI=1: %q, want fatal", r.how)
	}
	if r := run(t, func(tb testing.TB) { Missing(tb, "x") }); r.how != "fatal" || !strings.Contains(r.msg, "x (CI is set") {
		t.Errorf("Missing with CI=1: %q %q", r.how, r.msg)
	}
}

// TestNeedFound: a present tool is returned, whatever CI says.
func TestNeedFound(t *testing.T) {
	t.Setenv(EnvCI, "1")
	if p := Need(t, "sh"); !strings.HasSuffix(p, "/sh") {
		t.Errorf("Need(sh) = %q", p)
	}
}
