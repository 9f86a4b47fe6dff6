package main

import (
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

// TestSignal: cohort signal sends the named signal, to all workers or
// --worker N, over a real control socket (the dispatcher behind it is
// TestSignalWorkers'); a name it does not know is a usage error before
// anything is sent.
func TestSignal(t *testing.T) {
	srv, err := control.Listen(filepath.Join(t.TempDir(), control.SocketName), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stub := &stubDispatcher{}
	go func() { done <- srv.Serve(ctx, stub) }()
	t.Cleanup(func() { cancel(); <-done })

	code, out, errOut := runCohort(t, nil, "signal", "--socket", srv.Path(), "web", "usr2")
	if code != 0 || stub.sig != syscall.SIGUSR2 || stub.worker != -1 || out != "web: sent SIGUSR2 to 2 worker process(es): 42 43\n" {
		t.Errorf("signal web usr2: %d %q %s (stub %v %d)", code, out, errOut, stub.sig, stub.worker)
	}
	code, _, errOut = runCohort(t, nil, "signal", "web", "SIGHUP", "--worker", "3", "--socket", srv.Path())
	if code != 0 || stub.sig != syscall.SIGHUP || stub.worker != 3 {
		t.Errorf("signal web SIGHUP --worker 3: %d %s (stub %v %d)", code, errOut, stub.sig, stub.worker)
	}
	stub.sig = 0
	for _, args := range [][]string{{"--socket", srv.Path(), "web", "SEGV"}, {"--socket", srv.Path(), "web", "9"}, {"--socket", srv.Path(), "web"}, {"../x", "HUP"}} {
		code, _, errOut := runCohort(t, nil, append([]string{"signal"}, args...)...)
		if code != 2 || stub.sig != 0 {
			t.Errorf("signal %q: exit %d, want 2 and nothing sent (%v)\n%s", args, code, stub.sig, errOut)
		}
	}
	if code, _, errOut := runCohort(t, nil, "signal", "--socket", srv.Path(), "web", "kill9"); !strings.Contains(errOut, "unknown signal") || code != 2 {
		t.Errorf("kill9: %d %s", code, errOut)
	}
}
