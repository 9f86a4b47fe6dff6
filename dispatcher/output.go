package dispatcher

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/coreos/go-systemd/v22/journal"
)

// maxLine is the longest worker output line passed on in one piece;
// longer lines are split every maxLine bytes. journald's LineMax (48K by
// default) applies to stdout streams, not to the native protocol the
// dispatcher uses, so a long line (a JSON log record, a stack trace in one
// line) stays one journal entry; one bigger than a datagram goes through
// a memfd (see journalSender).
const maxLine = 1 << 20

// output is where worker lines and the dispatcher's own log lines go:
// two streams (stream.go), so that no writer that stops draining can block
// the supervision loop or a worker, and lines never interleave.
type output struct {
	app     string
	journal bool
	jw      *journalSender // set when journal
	log     *stream        // the dispatcher's log (stderr)
	lines   *stream        // worker lines (stdout), and the journal's fallback
}

// newOutput starts the streams toward stdout and stderr; close ends them.
func newOutput(app string, stdout, stderr io.Writer, journal bool) *output {
	o := &output{app: app, journal: journal}
	o.log = newStream("stderr", stderr)
	o.lines = newStream("stdout", stdout)
	o.log.notice = o.noticef
	o.lines.notice = o.noticef
	return o
}

// noticef is a log line about the streams themselves; like every log
// line, it never waits.
func (o *output) noticef(msg string) { o.warnf("%s", msg) }

// close writes out what is queued, waiting at most flushTimeout per
// stream, and reports lines dropped and not reported yet. A stream whose
// write never returns (a pipe nobody reads) is left to its goroutine,
// which ends with the write or with the process.
func (o *output) close() {
	o.lines.close(flushTimeout)
	for src, n := range o.lines.takeDrops() {
		o.lines.reportDrops(src, n)
	}
	if n := o.log.takeDrops()[logSource]; n > 0 {
		o.log.reportDrops(logSource, n)
	}
	o.log.close(flushTimeout)
}

// workerTag identifies the worker a line comes from.
type workerTag struct {
	index, pid, gen int
}

// logf writes one dispatcher log line. In journal mode prio becomes a
// syslog "<N>" prefix (stderr is then a journal stream); in terminal
// mode the line is prefixed "[app] ". It never blocks: a line the log
// has no room for is dropped and counted.
func (o *output) logf(prio journal.Priority, format string, args ...any) {
	var b []byte
	if o.journal {
		b = fmt.Appendf(nil, "<%d>", prio)
	} else {
		b = fmt.Appendf(nil, "[%s] ", o.app)
	}
	b = fmt.Appendf(b, format, args...)
	b = append(b, '\n')
	o.log.put(logSource, b, false)
}

func (o *output) infof(format string, args ...any) { o.logf(journal.PriInfo, format, args...) }
func (o *output) warnf(format string, args ...any) { o.logf(journal.PriWarning, format, args...) }

// workerLine passes on one line of a worker's output (without its
// newline). In journal mode it becomes a journal entry with the worker's
// fields and the priority of a leading "<N>"; otherwise it is queued for
// stdout prefixed "[app.N] ", waiting while stdout drains, dropped (and
// counted) when it does not.
func (o *output) workerLine(t workerTag, line []byte) {
	if o.journal {
		prio, msg := journal.PriInfo, line
		if len(line) >= 3 && line[0] == '<' && line[2] == '>' && line[1] >= '0' && line[1] <= '7' {
			prio, msg = journal.Priority(line[1]-'0'), line[3:]
		}
		err := o.jw.send([]journalField{
			{"MESSAGE", msg},
			{"PRIORITY", []byte{'0' + byte(prio)}},
			{"SYSLOG_IDENTIFIER", []byte(o.app)},
			{"SYSLOG_PID", strconv.AppendInt(nil, int64(t.pid), 10)},
			{"COHORT_APP", []byte(o.app)},
			{"COHORT_WORKER", strconv.AppendInt(nil, int64(t.index), 10)},
			{"COHORT_PID", strconv.AppendInt(nil, int64(t.pid), 10)},
			{"COHORT_GENERATION", strconv.AppendInt(nil, int64(t.gen), 10)},
		})
		if err == nil {
			return
		}
	}
	buf := make([]byte, 0, len(line)+len(o.app)+8)
	buf = fmt.Appendf(buf, "[%s.%d] ", o.app, t.index)
	buf = append(buf, line...)
	buf = append(buf, '\n')
	o.lines.put(t, buf, true)
}

// copyLines reads r line by line until EOF or an error (a read deadline
// set by the owner) and passes each line to o: what a worker wrote before
// it died is still in the pipe and is passed on, and so is a last line
// without a newline. Lines longer than maxLine are split. It closes r.
func (o *output) copyLines(t workerTag, r io.ReadCloser) {
	defer r.Close()
	br := bufio.NewReaderSize(r, 64<<10)
	var long []byte // a line longer than br's buffer, so far
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long = append(long, line...)
			for len(long) >= maxLine {
				o.workerLine(t, long[:maxLine])
				long = append(long[:0], long[maxLine:]...)
			}
			continue
		}
		if len(long) > 0 {
			line = append(long, line...)
			long = long[:0]
		}
		line = bytes.TrimSuffix(line, []byte{'\n'})
		for len(line) > maxLine {
			o.workerLine(t, line[:maxLine])
			line = line[maxLine:]
		}
		if len(line) > 0 || err == nil {
			o.workerLine(t, line)
		}
		if err != nil {
			return
		}
	}
}
