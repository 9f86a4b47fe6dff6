package logline

import (
	"bytes"
	"testing"
)

func TestAppend(t *testing.T) {
	for _, c := range []struct {
		label string
		color Color
		msg   string
		want  string
	}{
		{"web.2", NoColor, "hi\x1b[2J\tthere", "web.2 | hi\x1b[2J\tthere"},
		{"web.2", WorkerColor(2), "hi\x1b]0;owned\x07\tthere\r", "\x1b[35mweb.2\x1b[0m | hi\\x1b]0;owned\\x07\tthere\\x0d"},
		{"web.cohort", Bold, "bad \xff utf-8 \u009b", "\x1b[1mweb.cohort\x1b[0m | bad \uFFFD utf-8 \\x9b"},
		{"w.12", WorkerColor(12), "ünïcode ok", "\x1b[35mw.12\x1b[0m | ünïcode ok"},
	} {
		if got := string(Append(nil, c.label, c.color, []byte(c.msg))); got != c.want {
			t.Errorf("Append(%q, %d, %q) = %q, want %q", c.label, c.color, c.msg, got, c.want)
		}
	}
	if Worker("web", 3) != "web.3" || Dispatcher("web") != "web.cohort" || Systemd("a.b") != "a.b.systemd" {
		t.Error("labels")
	}
	if WorkerColor(-1) != Bold || WorkerColor(0) == WorkerColor(1) {
		t.Error("colours")
	}
}

func FuzzAppend(f *testing.F) {
	f.Add("web.0", 3, []byte("x\x1b[31m\xffy"))
	f.Fuzz(func(t *testing.T, label string, idx int, msg []byte) {
		out := Append(nil, label, WorkerColor(idx%100), msg)
		// After the label's own escapes (msg has none left, so the last
		// reset is the label's), no ESC, BEL or line end is left.
		end := bytes.LastIndex(out, []byte("\x1b[0m"+Sep))
		if end < 0 {
			t.Fatalf("no label end in %q", out)
		}
		rest := out[end+4+len(Sep):]
		for _, b := range rest {
			if b == 0x1b || b == 0x07 || b == '\n' || b == '\r' {
				t.Fatalf("control byte %#x in %q", b, out)
			}
		}
	})
}
