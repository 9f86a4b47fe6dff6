package dispatcher

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"

	"github.com/coreos/go-systemd/v22/journal"
)

// maxLine is the longest worker output line passed on in one piece;
// longer lines are split, as journald splits at its LineMax.
const maxLine = 16 << 10

// output is where worker lines and the dispatcher's own log lines go. It
// serializes writers so lines never interleave.
type output struct {
	mu      sync.Mutex
	app     string
	stdout  io.Writer // worker lines, in terminal mode
	stderr  io.Writer // the dispatcher's log
	journal bool
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
		err := journal.Send(string(msg), prio, map[string]string{
			"SYSLOG_IDENTIFIER": o.app,
			"SYSLOG_PID":        strconv.Itoa(t.pid),
			"COHORT_APP":        o.app,
			"COHORT_WORKER":     strconv.Itoa(t.index),
			"COHORT_PID":        strconv.Itoa(t.pid),
			"COHORT_GENERATION": strconv.Itoa(t.gen),
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
// set by the owner) and passes each line to o. A last line without a
// newline is passed on too. It closes r.
func (o *output) copyLines(t workerTag, r *os.File) {
	defer r.Close()
	br := bufio.NewReaderSize(r, maxLine)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			o.workerLine(t, bytes.TrimSuffix(line, []byte{'\n'}))
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}
