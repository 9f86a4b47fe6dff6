// Package logrelay carries the dispatcher's log lines and its workers'
// output to the terminal or the journal without ever blocking the
// supervision loop: bounded queues per destination and per source, drops
// counted and reported, a per-slot rate limit as journald's, worker lines
// as journal entries with the worker's fields. It exists apart from the
// dispatcher because it holds no supervisor state: the dispatcher tells it
// who a line comes from (a Tag) and reads nothing back.
package logrelay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/journal"
	"github.com/cohort-dev/cohort/internal/logline"
)

// maxLine is the longest worker output line passed on in one piece;
// longer lines are split every maxLine bytes. journald's LineMax (48K by
// default) applies to stdout streams, not to the native protocol the
// dispatcher uses, so a long line (a JSON log record, a stack trace in one
// line) stays one journal entry; one bigger than a datagram goes through
// a memfd (see journal.Sender).
const maxLine = 1 << 20

// Relay is where worker lines and the dispatcher's own log lines go:
// two streams (stream.go), so that no writer that stops draining can block
// the supervision loop or a worker, and lines never interleave.
type Relay struct {
	app     string
	journal bool
	jw      *journal.Sender // set when journal
	log     *stream         // the dispatcher's log (stderr)
	lines   *stream         // worker lines (stdout), and the journal's fallback
	limit   *limiter        // each worker slot's budget of lines; nil: none (ratelimit.go)
	color   bool            // terminal mode: labels in colour (logline)
}

// Config is what a Relay writes to.
type Config struct {
	App            string    // the app's name, for prefixes and journal fields
	Stdout, Stderr io.Writer // worker lines; the dispatcher's log lines
	// Journal, when set, gets each worker line as an entry (with
	// COHORT_* fields; Stdout is then the fallback when journald cannot
	// be reached), and log lines on Stderr get syslog "<N>" prefixes, for
	// a Stderr that is a journal stream. The caller keeps owning it.
	Journal *journal.Sender
	// RateLimit is each worker slot's budget of lines (ratelimit.go).
	RateLimit appfile.LogRateLimit
	// Color: Stdout and Stderr are terminals; labels get their colours
	// and control characters in lines are made visible (logline.Append).
	Color bool
}

// New starts the streams toward c.Stdout and c.Stderr; Close ends them.
func New(c Config) *Relay {
	o := &Relay{app: c.App, journal: c.Journal != nil, jw: c.Journal, color: c.Color}
	o.log = newStream("stderr", c.Stderr)
	o.lines = newStream("stdout", c.Stdout)
	o.log.notice = o.noticef
	o.lines.notice = o.noticef
	o.limit = newLimiter(c.RateLimit, o.Warnf)
	return o
}

// noticef is a log line about the streams themselves; like every log
// line, it never waits.
func (o *Relay) noticef(msg string) { o.Warnf("%s", msg) }

// Close writes out what is queued, waiting at most flushTimeout per
// stream, and reports lines dropped and not reported yet. A stream whose
// write never returns (a pipe nobody reads) is left to its goroutine,
// which ends with the write or with the process.
func (o *Relay) Close() {
	o.limit.close()
	o.lines.close(flushTimeout)
	for src, n := range o.lines.takeDrops() {
		o.lines.reportDrops(src, n)
	}
	if n := o.log.takeDrops()[logSource]; n > 0 {
		o.log.reportDrops(logSource, n)
	}
	o.log.close(flushTimeout)
}

// Tag identifies the worker process a line comes from: its slot, its pid
// and its generation.
type Tag struct {
	Index, PID, Gen int
}

// logf writes one dispatcher log line (Infof, Warnf). In journal mode prio becomes a
// syslog "<N>" prefix (stderr is then a journal stream); in terminal
// mode it is labelled "app.cohort | " (logline). It never blocks: a line the log
// has no room for is dropped and counted.
func (o *Relay) logf(prio journal.Priority, format string, args ...any) {
	var b []byte
	if o.journal {
		b = fmt.Appendf(nil, "<%d>", prio)
		b = fmt.Appendf(b, format, args...)
	} else {
		c := logline.NoColor
		if o.color {
			c = logline.Bold
		}
		b = logline.Append(nil, logline.Dispatcher(o.app), c, fmt.Appendf(nil, format, args...))
	}
	b = append(b, '\n')
	o.log.put(logSource, b, false)
}

func (o *Relay) Infof(format string, args ...any) { o.logf(journal.PriInfo, format, args...) }
func (o *Relay) Warnf(format string, args ...any) { o.logf(journal.PriWarning, format, args...) }

// JournalIdentifier is the SYSLOG_IDENTIFIER of a worker's journal
// entries: "web.2/4711" for worker 2, pid 4711 of app web. journalctl's
// default output prints an entry's _PID in brackets, the pid of the
// process that sent it (the dispatcher: the kernel vouches for it, and an
// unprivileged dispatcher cannot claim another), and never SYSLOG_PID
// when _PID is there (seen on systemd 252 and 257, vmtests/logflood), so
// the worker's index and pid are in the identifier:
// "web.2/4711[662]: GET /". The dispatcher's own lines are "web[662]:"
// (SyslogIdentifier= of the service). '/' as in postfix's
// "postfix/smtpd[123]:", since ':' and '[' would end a syslog tag.
func JournalIdentifier(app string, index, pid int) string {
	return app + "." + strconv.Itoa(index) + "/" + strconv.Itoa(pid)
}

// workerSink is where one worker process's lines go: its journal fields
// and its terminal prefix, made once per process rather than per line.
type workerSink struct {
	o      *Relay
	tag    Tag
	budget *budget
	fields []journal.Field // MESSAGE and PRIORITY first, filled per line
	label  string          // "app.N" (logline)
	color  logline.Color
}

func (o *Relay) sink(t Tag) *workerSink {
	pid := strconv.AppendInt(nil, int64(t.PID), 10)
	color := logline.NoColor
	if o.color {
		color = logline.WorkerColor(t.Index)
	}
	return &workerSink{
		o: o, tag: t, budget: o.limit.slot(t.Index),
		fields: []journal.Field{
			{Key: "MESSAGE", Value: nil},
			{Key: "PRIORITY", Value: nil},
			{Key: "SYSLOG_IDENTIFIER", Value: []byte(JournalIdentifier(o.app, t.Index, t.PID))},
			{Key: "SYSLOG_PID", Value: pid},
			{Key: "COHORT_APP", Value: []byte(o.app)},
			{Key: "COHORT_WORKER", Value: strconv.AppendInt(nil, int64(t.Index), 10)},
			{Key: "COHORT_PID", Value: pid},
			{Key: "COHORT_GENERATION", Value: strconv.AppendInt(nil, int64(t.Gen), 10)},
		},
		label: logline.Worker(o.app, t.Index),
		color: color,
	}
}

var priorities = [8][]byte{{'0'}, {'1'}, {'2'}, {'3'}, {'4'}, {'5'}, {'6'}, {'7'}}

// line passes on one line of the worker's output (without its newline),
// unless the slot's budget is spent (ratelimit.go). In journal mode it
// becomes a journal entry with the worker's fields and the priority of a
// leading "<N>"; otherwise it is queued for stdout labelled "app.N | ",
// waiting while stdout drains, dropped (and counted) when it does not.
// Only the worker's own goroutine calls it.
func (w *workerSink) line(line []byte) {
	if !w.budget.allow(w.tag.PID) {
		return
	}
	o := w.o
	if o.journal {
		prio, msg := journal.PriInfo, line
		if len(line) >= 3 && line[0] == '<' && line[2] == '>' && line[1] >= '0' && line[1] <= '7' {
			prio, msg = journal.Priority(line[1]-'0'), line[3:]
		}
		w.fields[0].Value, w.fields[1].Value = msg, priorities[prio]
		err := o.jw.Send(w.fields)
		w.fields[0].Value = nil
		if err == nil {
			return
		}
	}
	buf := logline.Append(make([]byte, 0, len(line)+len(w.label)+len(logline.Sep)+16), w.label, w.color, line)
	buf = append(buf, '\n')
	o.lines.put(w.tag, buf, true)
}

// CopyLines reads r line by line until EOF or an error (a read deadline
// set by the owner) and passes each line to o: what a worker wrote before
// it died is still in the pipe and is passed on, and so is a last line
// without a newline. Lines longer than maxLine are split. It closes r,
// and at the end reports the lines of t its budget suppressed.
func (o *Relay) CopyLines(t Tag, r io.ReadCloser) {
	defer r.Close()
	w := o.sink(t)
	defer w.budget.exited(t.PID)
	br := bufio.NewReaderSize(r, 64<<10)
	var long []byte // a line longer than br's buffer, so far
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long = append(long, line...)
			for len(long) >= maxLine {
				w.line(long[:maxLine])
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
			w.line(line[:maxLine])
			line = line[maxLine:]
		}
		if len(line) > 0 || err == nil {
			w.line(line)
		}
		if err != nil {
			return
		}
	}
}
