package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/internal/journal"
)

// systemLog carries the generator's report lines to where an administrator
// finds them. systemd runs generators with stderr on /dev/null, so like
// systemd's own generators it writes to the kernel log (/dev/kmsg, which
// journald reads, and which exists even at early boot); where there is no
// kmsg (a container) it sends to journald directly. Lines are copied to
// stderr too, for people running the generator by hand.
type systemLog struct {
	kmsg    io.Writer       // nil when /dev/kmsg cannot be opened
	journal *journal.Sender // nil when stderrOnly
	stderr  io.Writer
	pid     int
	partial []byte
}

func newSystemLog(stderr io.Writer, stderrOnly bool) *systemLog {
	l := &systemLog{stderr: stderr, pid: os.Getpid()}
	if stderrOnly {
		return l
	}
	l.journal = journal.NewSender("")
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		l.kmsg = f
	}
	return l
}

// Write splits p into lines and logs each complete one.
func (l *systemLog) Write(p []byte) (int, error) {
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		l.line(string(l.partial[:i]))
		l.partial = l.partial[i+1:]
	}
}

// facilityDaemon is LOG_DAEMON, the facility systemd's generators log with.
const facilityDaemon = 3 << 3

func (l *systemLog) line(msg string) {
	fmt.Fprintln(l.stderr, msg)
	prio := journal.PriErr
	// A skipped file and a file set aside for the running configuration
	// are warnings: the other apps, and that one, go on.
	if strings.HasPrefix(msg, "cohort-generator: skipped") || strings.Contains(msg, "; keeping the running configuration of ") {
		prio = journal.PriWarning
	}
	msg = strings.TrimPrefix(msg, "cohort-generator: ")
	switch {
	case l.kmsg != nil:
		// One write is one kernel log record.
		fmt.Fprintf(l.kmsg, "<%d>cohort-generator[%d]: %s\n", facilityDaemon|int(prio), l.pid, msg)
	case l.journal != nil:
		// No journald (not even a socket) is no error: the line is on
		// stderr already.
		_ = l.journal.Send([]journal.Field{
			{Key: "MESSAGE", Value: []byte(msg)},
			{Key: "PRIORITY", Value: []byte(strconv.Itoa(int(prio)))},
			{Key: "SYSLOG_IDENTIFIER", Value: []byte("cohort-generator")},
		})
	}
}
