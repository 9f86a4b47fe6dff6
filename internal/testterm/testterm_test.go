package testterm

import (
	"testing"
	"time"
)

// TestPane: a real terminal runs the command, shows its output, takes
// keys; cat echoes what is typed.
func TestPane(t *testing.T) {
	p := Start(t, 80, 10, []string{"GREETING=hello"}, "sh", "-c", `echo "$GREETING from a tty: $(tty)"; exec cat`)
	p.WaitFor(t, 10*time.Second, "hello from a tty: /dev/pts/")
	p.Keys(t, "typed words", "Enter")
	p.WaitFor(t, 10*time.Second, "typed words\ntyped words")
	if p.PID(t) <= 0 {
		t.Error("no pane pid")
	}
}
