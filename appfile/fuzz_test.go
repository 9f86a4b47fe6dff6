package appfile

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the parser: it must never panic, must
// return either a complete App or a non-empty Errors, and every error must
// carry a position inside the file. The committed corpus is in
// testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte("command = [\"/bin/app\"]\nrestart = { max = \"1s\", intial = \"1s\" }\n" + listenHTTP))
	f.Fuzz(func(t *testing.T, data []byte) {
		app, err := Parse("/etc/cohort/fuzz.toml", data)
		if err == nil {
			if app == nil || len(app.Command) == 0 || len(app.Listen) == 0 {
				t.Fatalf("accepted an incomplete app: %+v", app)
			}
			return
		}
		var errs Errors
		if !errors.As(err, &errs) || len(errs) == 0 {
			t.Fatalf("error is not a non-empty Errors: %T %v", err, err)
		}
		lines := 1
		for _, c := range data {
			if c == '\n' {
				lines++
			}
		}
		if len(errs) > MaxErrors+1 {
			t.Fatalf("%d errors reported, want at most %d and a count", len(errs), MaxErrors)
		}
		for i, e := range errs {
			// The count of the errors left out is about the whole file.
			if i == MaxErrors && e.Line == 0 && strings.HasPrefix(e.Msg, "… and ") {
				continue
			}
			if e.Line < 1 || e.Line > lines || e.Col < 1 {
				t.Fatalf("error outside the file (%d lines): %v", lines, e)
			}
		}
	})
}

// FuzzParseDuration: no panics, and accepted durations are never negative.
func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"1min 30s", "500ms", "90", "1.5 h", "2w3d", "-1s"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if d, err := ParseDuration(s); err == nil && d < 0 {
			t.Fatalf("ParseDuration(%q) = %v", s, d)
		}
	})
}

// FuzzParseSlotFDName: no panics; what it accepts is what SlotFDName
// makes, so that a name maps to exactly one listener and slot.
func FuzzParseSlotFDName(f *testing.F) {
	for _, s := range []string{"http.0", "v1.admin.12", "http", "http.01", ".3", "a.-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		l, slot, ok := ParseSlotFDName(name)
		if ok && (slot < 0 || l == "" || SlotFDName(l, slot) != name) {
			t.Fatalf("ParseSlotFDName(%q) = %q, %d: SlotFDName gives %q", name, l, slot, SlotFDName(l, slot))
		}
	})
}
