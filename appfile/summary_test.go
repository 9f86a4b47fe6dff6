package appfile

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode"
)

func TestSummary(t *testing.T) {
	_, err := Parse("web.toml", []byte("command = [\"/bin/app\"]\nwokers = 2\n"+listenHTTP))
	if got, want := Summary(err), `web.toml:2:1: unknown key "wokers" (did you mean "workers"?)`; got != want {
		t.Errorf("one error: %q, want %q", got, want)
	}
	_, err = Parse("web.toml", []byte("wokers = 2\nmdoe = 1\n"))
	if got := Summary(err); !strings.HasPrefix(got, `web.toml:1:1: unknown key "wokers"`) || !strings.HasSuffix(got, "more: cohort check web.toml)") {
		t.Errorf("several errors: %q", got)
	}
	var many strings.Builder
	for i := range MaxErrors + 5 {
		fmt.Fprintf(&many, "wokers%d = 2\n", i)
	}
	_, err = Parse("web.toml", []byte(many.String()))
	if got := Summary(err); !strings.Contains(got, "and 26 more: ") { // 25 unknown keys, no command, no listen: 27
		t.Errorf("more than MaxErrors: %q", got)
	}
	if got := Summary(errors.New("read app file: open x: no such file\nsecond line")); got != "read app file: open x: no such file" {
		t.Errorf("plain error: %q", got)
	}
	if got := Summary(&Error{File: "a.toml", Line: 1, Col: 1, Msg: "bad \"x\nREADY=1\""}); strings.ContainsAny(got, "\n\r") {
		t.Errorf("control characters kept: %q", got)
	}
	if Summary(nil) != "" {
		t.Error("Summary(nil) is not empty")
	}
}

// FuzzSummary: whatever a file holds, the summary of its errors is one
// printable line naming the file (it goes into STATUS= and journal lines).
// The committed corpus is in testdata/fuzz/FuzzSummary.
func FuzzSummary(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte("wokers = 2\n"))
	f.Add([]byte("\"a\\nREADY=1\" = 1\n"))
	f.Add([]byte("command = [\"/bin/app\"]\nmode = \"\\u0007\"\n" + listenHTTP))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := Parse("/etc/cohort/fuzz.toml", data)
		s := Summary(err)
		if err == nil {
			if s != "" {
				t.Fatalf("summary of no error: %q", s)
			}
			return
		}
		if !strings.HasPrefix(s, "/etc/cohort/fuzz.toml") {
			t.Fatalf("summary does not name the file: %q", s)
		}
		for _, r := range s {
			if unicode.IsControl(r) {
				t.Fatalf("control character %U in %q", r, s)
			}
		}
	})
}
