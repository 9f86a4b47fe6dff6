// Package testterm runs a command in a real terminal for tests: a
// detached session of a private tmux server (its own socket, never the
// user's), at a fixed size, with keys sent and the screen captured the
// way a person would type and read them. A missing tmux ends the test
// through testtool.Missing (a skip on a laptop, a failure under CI).
package testterm

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// Pane is one tmux pane running a command.
type Pane struct {
	tmux, sock string
}

// Start runs argv in a new pane of width × height, with env added to
// its environment, and kills its tmux server (and so the command, by
// SIGHUP) when t ends.
func Start(t testing.TB, width, height int, env []string, argv ...string) *Pane {
	t.Helper()
	p := &Pane{tmux: testtool.Need(t, "tmux"), sock: filepath.Join(t.TempDir(), "tmux.sock")}
	quoted := make([]string, len(argv))
	for i, a := range argv {
		quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	args := []string{"new-session", "-d", "-x", fmt.Sprint(width), "-y", fmt.Sprint(height)}
	for _, kv := range env {
		args = append(args, "-e", kv)
	}
	// remain-on-exit keeps what the command printed last on the screen.
	args = append(args, "exec "+strings.Join(quoted, " "), ";", "set-option", "remain-on-exit", "on")
	t.Cleanup(func() { p.tmuxOut("kill-server") })
	if out, err := p.tmuxOut(args...); err != nil {
		t.Fatalf("tmux new-session: %v\n%s", err, out)
	}
	return p
}

// tmuxOut runs one tmux command on the private server, bounded.
func (p *Pane) tmuxOut(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.tmux, append([]string{"-S", p.sock, "-f", "/dev/null"}, args...)...)
	cmd.Env = append(cmd.Environ(), "TERM=xterm-256color")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (p *Pane) run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := p.tmuxOut(args...)
	if err != nil {
		t.Fatalf("tmux %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// Keys types keys into the pane, in tmux's send-keys notation ("r",
// "Down", "C-c").
func (p *Pane) Keys(t testing.TB, keys ...string) {
	t.Helper()
	p.run(t, append([]string{"send-keys", "-t", "0"}, keys...)...)
}

// Screen is what the pane shows now, as text (no colours).
func (p *Pane) Screen(t testing.TB) string {
	t.Helper()
	return p.run(t, "capture-pane", "-p", "-t", "0")
}

// PID is the pid of the pane's command.
func (p *Pane) PID(t testing.TB) int {
	t.Helper()
	var pid int
	fmt.Sscan(p.run(t, "display-message", "-p", "-t", "0", "#{pane_pid}"), &pid)
	return pid
}

// WaitFor waits until the screen holds every one of want and returns it;
// t fails with the last screen after timeout.
func (p *Pane) WaitFor(t testing.TB, timeout time.Duration, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := p.Screen(t)
		missing := ""
		for _, w := range want {
			if !strings.Contains(s, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("the terminal does not show %q after %v; it shows:\n%s", missing, timeout, s)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
