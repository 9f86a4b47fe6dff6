package logrelay

import (
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestCopyLinesSplit: a line longer than maxLine is passed on in
// maxLine pieces, and a last line without a newline is passed on.
func TestCopyLinesSplit(t *testing.T) {
	t.Parallel()
	var out testsync.Buffer
	o := New(Config{App: "a", Stdout: &out, Stderr: io.Discard})
	in := strings.Repeat("z", 2*maxLine+maxLine/2) + "\nsecond\n\nno newline"
	o.CopyLines(Tag{Index: 3}, io.NopCloser(strings.NewReader(in)))
	o.Close()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	var lens []int
	for _, l := range lines {
		lens = append(lens, len(strings.TrimPrefix(l, "a.3 | ")))
	}
	want := []int{maxLine, maxLine, maxLine / 2, len("second"), 0, len("no newline")}
	if fmt.Sprint(lens) != fmt.Sprint(want) {
		t.Errorf("line lengths %v, want %v", lens, want)
	}
}

// TestColor: with Color (cohort run on a terminal) worker lines and the
// dispatcher's carry logline's coloured labels, and a worker's escape
// sequences are made visible; without it they pass as they are.
func TestColor(t *testing.T) {
	t.Parallel()
	for _, color := range []bool{true, false} {
		var out, errOut testsync.Buffer
		o := New(Config{App: "a", Stdout: &out, Stderr: &errOut, Color: color})
		o.CopyLines(Tag{Index: 1}, io.NopCloser(strings.NewReader("x\x1b]0;t\x07\n")))
		o.Infof("started")
		o.Close()
		wantOut, wantErr := "a.1 | x\x1b]0;t\x07\n", "a.cohort | started\n"
		if color {
			wantOut, wantErr = "\x1b[33ma.1\x1b[0m | x\\x1b]0;t\\x07\n", "\x1b[1ma.cohort\x1b[0m | started\n"
		}
		if out.String() != wantOut || !strings.Contains(errOut.String(), wantErr) {
			t.Errorf("color %v: %q %q, want %q %q", color, out.String(), errOut.String(), wantOut, wantErr)
		}
	}
}
