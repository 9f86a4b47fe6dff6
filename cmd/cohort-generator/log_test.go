package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/journal"
	"github.com/cohort-dev/cohort/internal/journal/journaltest"
)

// TestSystemLogJournal: where there is no /dev/kmsg (a container), each
// report line is a journal entry of cohort-generator with the priority
// its kind has (a skipped file is a warning, the rest errors), and it is
// on stderr too.
func TestSystemLogJournal(t *testing.T) {
	j := journaltest.Start(t)
	var stderr bytes.Buffer
	l := &systemLog{stderr: &stderr, journal: journal.NewSender(j.Path)}
	defer l.journal.Close()
	l.Write([]byte("cohort-generator: skipped /etc/cohort/a.toml: bad\ncohort-generator: cannot write b.service\n"))
	for _, want := range []struct{ msg, prio string }{
		{"skipped /etc/cohort/a.toml: bad", "4"},
		{"cannot write b.service", "3"},
	} {
		select {
		case e := <-j.Entries:
			if e["MESSAGE"] != want.msg || e["PRIORITY"] != want.prio || e["SYSLOG_IDENTIFIER"] != "cohort-generator" {
				t.Errorf("entry %v, want MESSAGE=%q PRIORITY=%s SYSLOG_IDENTIFIER=cohort-generator", e, want.msg, want.prio)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no entry %q in 10s", want.msg)
		}
	}
	if got := stderr.String(); got != "cohort-generator: skipped /etc/cohort/a.toml: bad\ncohort-generator: cannot write b.service\n" {
		t.Errorf("stderr %q", got)
	}
}
