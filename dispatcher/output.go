package dispatcher

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"

	"github.com/coreos/go-systemd/v22/journal"
)

// maxLine is the longest worker output line passed on in one piece;
// longer lines are split every maxLine bytes. journald's LineMax (48K by
// default) applies to stdout streams, not to the native protocol the
// dispatcher uses, so a long line (a JSON log record, a stack trace in one
// line) stays one journal entry; one bigger than a datagram goes through
// a memfd (see journalSender).
const maxLine = 1 << 20

// output is where worker lines and the dispatcher's own log lines go. It
// serializes writers so lines never interleave.
type output struct {
	mu      sync.Mutex
	app     string
	stdout  io.Writer // worker lines, in terminal mode
	stderr  io.Writer // the dispatcher's log
	journal bool
	jw      *journalSender // set when journal
}

// workerTag identifies the worker a line comes from.
type workerTag struct {
	index, pid, gen int
}

// logf writes one dispatcher log line. In journal mode prio becomes a
// syslog "<N>" prefix (stderr is then a journal stream); in terminal
// mode the line is prefixed "[app] ".
func (o *output) logf(prio journal.Priority, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.journal {
		fmt.Fprintf(o.stderr, "<%d>%s\n", prio, msg)
		return
	}
	fmt.Fprintf(o.stderr, "[%s] %s\n", o.app, msg)
}

func (o *output) infof(format string, args ...any) { o.logf(journal.PriInfo, format, args...) }
func (o *output) warnf(format string, args ...any) { o.logf(journal.PriWarning, format, args...) }

// workerLine passes on one line of a worker's output (without its
// newline). In journal mode it becomes a journal entry with the worker's
// fields and the priority of a leading "<N>"; otherwise it is written to
// stdout prefixed "[app.N] ".
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
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stdout.Write(buf)
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
