package envfile

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "A=1\nB = two \n", want: []string{"A=1", "B=two"}},
		{in: "# comment\n; also\n\nA=x", want: []string{"A=x"}},
		{in: `Q="quoted \"x\" \\ \n"`, want: []string{"Q=quoted \"x\" \\ \n"}},
		{in: `S='single \"kept\"'`, want: []string{`S=single \"kept\"`}},
		{in: "LONG=one \\\ntwo\n", want: []string{"LONG=one two"}},
		{in: "A=1\nA=2", want: []string{"A=1", "A=2"}}, // the caller decides who wins
		{in: "A=1\nnot an assignment\n", err: "line 2: not KEY=VALUE"},
		{in: "=value", err: "line 1: not KEY=VALUE"},
		{in: "MY KEY=v", err: "line 1: not KEY=VALUE"},
		{in: "A=" + strings.Repeat("x", 1<<20), err: "too long"},
	} {
		got, err := Parse([]byte(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Parse(%.40q): %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Parse(%.40q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

// TestRead: a relative name is taken from dir; "-" makes a missing file
// no error, but never a FIFO or a file bigger than appfile.MaxFileSize,
// and a required missing file is an error naming it.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "env"), []byte("A=1\n"), 0o644)
	if got, err := Read("env", dir); err != nil || !slices.Equal(got, []string{"A=1"}) {
		t.Errorf("Read(env, dir) = %q, %v", got, err)
	}
	if got, err := Read("-"+filepath.Join(dir, "env"), ""); err != nil || !slices.Equal(got, []string{"A=1"}) {
		t.Errorf("Read(-abs) = %q, %v", got, err)
	}
	if got, err := Read("-missing", dir); err != nil || got != nil {
		t.Errorf("Read(-missing) = %q, %v; want nothing, no error", got, err)
	}
	if _, err := Read("missing", dir); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), filepath.Join(dir, "missing")) {
		t.Errorf("Read(missing): %v, want ErrNotExist naming the file", err)
	}
	os.WriteFile(filepath.Join(dir, "bad"), []byte("oops\n"), 0o644)
	if _, err := Read("-bad", dir); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "bad")+": line 1") {
		t.Errorf("Read(-bad): %v, want the file and line named", err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Read("-"+fifo, ""); !errors.Is(err, appfile.ErrNotRegular) {
		t.Errorf("Read(-fifo): %v, want ErrNotRegular (and no wait for a writer)", err)
	}
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, appfile.MaxFileSize+1), 0o644)
	if _, err := Read("-"+big, ""); err == nil {
		t.Error("Read(-big): no error for a file over appfile.MaxFileSize")
	}
}
