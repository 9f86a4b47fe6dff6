package main

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testsock"
)

// TestSdNotifyFullSocket: the dispatcher's sd_notify gives up on a
// service manager that does not read its socket (a full queue) instead of
// blocking its caller for good, as go-systemd's daemon.SdNotify did.
func TestSdNotifyFullSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", testsock.FullNotify(t))
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		sdNotify("STATUS=stuck?")
	}()
	const bound = 10 * time.Second // activation.Notify's 2s, with room for a loaded machine
	select {
	case <-done:
		t.Logf("returned after %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(bound):
		t.Fatalf("sdNotify to a full notify socket did not return within %v", bound)
	}
}

// TestDispatchMalformedActivation: cohort dispatch refuses LISTEN_* that
// say this process was activated but are malformed, naming the variable,
// instead of going on as if systemd had passed no socket.
func TestDispatchMalformedActivation(t *testing.T) {
	app := writeApp(t, t.TempDir(), "web.toml", goodApp)
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	t.Setenv("LISTEN_FDS", "two")
	code, _, stderr := runCohort(t, nil, "dispatch", "--running-dir", t.TempDir(), app)
	if code != 1 || !strings.Contains(stderr, `LISTEN_FDS="two"`) {
		t.Fatalf("cohort dispatch with LISTEN_FDS=two: exit %d, stderr %q; want 1 and a message naming LISTEN_FDS", code, stderr)
	}
	if v, ok := os.LookupEnv("LISTEN_FDS"); ok {
		t.Errorf("LISTEN_FDS=%q still set after dispatch", v)
	}
}
