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
		lens = append(lens, len(strings.TrimPrefix(l, "[a.3] ")))
	}
	want := []int{maxLine, maxLine, maxLine / 2, len("second"), 0, len("no newline")}
	if fmt.Sprint(lens) != fmt.Sprint(want) {
		t.Errorf("line lengths %v, want %v", lens, want)
	}
}
