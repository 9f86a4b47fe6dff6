package journal_test

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/journal"
	"github.com/cohort-dev/cohort/internal/journal/journaltest"
	"golang.org/x/sys/unix"
)

func next(t *testing.T, j *journaltest.Journald) map[string]string {
	t.Helper()
	select {
	case e := <-j.Entries:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no entry reached the fake journald in 10s")
		return nil
	}
}

// TestSend: plain fields, a value with newlines (the binary-safe form)
// and an entry bigger than a datagram (a sealed memfd) arrive as sent.
func TestSend(t *testing.T) {
	j := journaltest.Start(t)
	s := journal.NewSender(j.Path)
	defer s.Close()
	if err := s.Send([]journal.Field{{Key: "MESSAGE", Value: []byte("hello")}, {Key: "PRIORITY", Value: []byte("6")}}); err != nil {
		t.Fatal(err)
	}
	if e := next(t, j); e["MESSAGE"] != "hello" || e["PRIORITY"] != "6" || len(e) != 2 {
		t.Errorf("entry %v, want MESSAGE=hello PRIORITY=6", e)
	}
	if err := s.Send([]journal.Field{{Key: "MESSAGE", Value: []byte("two\nlines\n")}}); err != nil {
		t.Fatal(err)
	}
	if e := next(t, j); e["MESSAGE"] != "two\nlines\n" {
		t.Errorf("MESSAGE %q, want the newlines kept", e["MESSAGE"])
	}
	big := strings.Repeat("x", 300<<10) // more than a datagram may hold
	if err := s.Send([]journal.Field{{Key: "MESSAGE", Value: []byte(big)}}); err != nil {
		t.Fatal(err)
	}
	if e := next(t, j); e["MESSAGE"] != big {
		t.Errorf("big MESSAGE arrived with %d bytes, want %d", len(e["MESSAGE"]), len(big))
	}
}

// TestSendUnreachable: with nobody at the path, Send says so.
func TestSendUnreachable(t *testing.T) {
	s := journal.NewSender(filepath.Join(t.TempDir(), "none"))
	defer s.Close()
	err := s.Send([]journal.Field{{Key: "MESSAGE", Value: []byte("lost")}})
	if !errors.Is(err, unix.ENOENT) {
		t.Errorf("Send to a missing socket: %v, want ENOENT", err)
	}
}
