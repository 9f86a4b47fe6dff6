package activation_test

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/internal/testsock"
)

func TestNotActivated(t *testing.T) {
	t.Setenv("LISTEN_FDS", "1") // without LISTEN_PID: not for us
	files, err := activation.Inherit()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := os.LookupEnv("LISTEN_FDS"); ok {
		t.Fatal("LISTEN_FDS still set")
	}
	if files.Activated() {
		t.Fatal("Activated without LISTEN_PID")
	}
	if _, err := files.Listen("http", ""); !errors.Is(err, activation.ErrNotActivated) {
		t.Fatalf("Listen without fallback = %v, want ErrNotActivated", err)
	}
	if _, err := files.File("http"); !errors.Is(err, activation.ErrNotActivated) {
		t.Fatalf("File = %v, want ErrNotActivated", err)
	}
	// Every fallback Listen listens anew.
	for _, addr := range []string{"127.0.0.1:0", "127.0.0.1:0", filepath.Join(t.TempDir(), "sock")} {
		ln, err := files.Listen("http", addr)
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
	}
}

func TestInheritMalformed(t *testing.T) {
	for _, env := range [][2]string{
		{"LISTEN_PID", "x"},
		{"LISTEN_FDS", "-1"},
		{"LISTEN_FDS", "1000"}, // fds 3..1002 are not open
	} {
		t.Setenv("LISTEN_PID", itoa(os.Getpid()))
		t.Setenv("LISTEN_FDS", "1")
		t.Setenv(env[0], env[1])
		if _, err := activation.Inherit(); err == nil {
			t.Errorf("Inherit with %s=%s succeeded", env[0], env[1])
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestNotify(t *testing.T) {
	path, next := notifySocket(t)
	t.Setenv("NOTIFY_SOCKET", path)
	if err := activation.Status("serving\n3 conns"); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "STATUS=serving 3 conns" {
		t.Fatalf("got %q", got)
	}
	if err := activation.Stopping(); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "STOPPING=1" {
		t.Fatalf("got %q", got)
	}
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody"))
	if err := activation.Stopping(); err == nil {
		t.Fatal("Stopping to a missing socket succeeded")
	}
}

// A service manager that does not read its socket must not block the
// worker: once the socket's queue is full, sending gives up with an error
// (before, the first Accept blocked for good in READY=1).
func TestNotifyFullSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", testsock.FullNotify(t))
	done := make(chan error, 1)
	go func() { done <- activation.Status("stuck?") }() // ends within the notify timeout
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Status to a full socket = %v, want a timeout", err)
		}
	case <-time.After(childWait):
		t.Fatalf("Status to a full socket did not return within %v", childWait)
	}
}
