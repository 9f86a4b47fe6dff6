package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/logline"
)

// `cohort logs` reads the journal through `journalctl -o json` rather
// than the journal's C API (sd_journal, go-systemd's sdjournal): cohort is
// built with CGO_ENABLED=0 and sd_journal needs cgo and libsystemd at
// run time; journalctl is on every host that has a journal, implements
// the matches, --since, -n and -f (with journal rotation, vacuuming and
// file access rules) exactly as the user knows them from journalctl
// itself, and its JSON export is a documented, stable format
// (systemd.journal-fields(7), "JSON" in journalctl(1)). cohort never
// reads journal files itself.

const logsArgs = `[APP] [-f] [-n N|all] [--worker N] [--since TIME] [--json]`

const logsAbout = `Print the journal's lines of APP (default: every app on this host), each
as "app.N | line" for worker N's output, "app.cohort | …" for the
dispatcher's and "app.systemd | …" for what systemd says about the app's
units; on a terminal each worker in its colour. Read with journalctl, so
the same users may read them (root, the adm and systemd-journal groups).`

// maxEntry bounds one JSON entry read from journalctl: a worker line is
// at most 1 MiB (the relay splits longer ones), which JSON escaping can
// make up to six times longer.
const maxEntry = 8 << 20

func cmdLogs(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "logs", logsArgs, logsAbout)
	follow := fs.Bool("f", false, "follow: print new lines as they come, until interrupted")
	lines := fs.String("n", "20", "print the last `N` lines (\"all\": every line)")
	worker := fs.Int("worker", -1, "worker `N`'s lines only")
	since := fs.String("since", "", "lines from `TIME` on, as journalctl --since takes it (\"10 min ago\", \"today\", \"2026-12-02 10:00\")")
	asJSON := fs.Bool("json", false, "one JSON object per line, for scripts")
	pos, code, done := parseLeading(fs, args)
	if done {
		return code
	}
	if len(pos) > 1 {
		fs.Usage()
		return 2
	}
	var apps []string
	if len(pos) == 1 {
		if err := appfile.CheckAppName(pos[0]); err != nil {
			fmt.Fprintf(env.stderr, "cohort logs: %v\n", err)
			return 2
		}
		apps = []string{pos[0]}
	} else {
		for _, a := range env.knownApps() {
			if a.Source == "unit" {
				apps = append(apps, a.Name)
			}
		}
		if len(apps) == 0 {
			fmt.Fprintln(env.stderr, "cohort logs: no apps on this host (no app files on the search path; 'cohort run' prints its lines itself)")
			return 1
		}
	}
	jargs := []string{"--output=json", "--all", "--no-pager"}
	switch n, err := strconv.Atoi(*lines); {
	case *lines == "all":
	case err != nil || n < 0:
		fmt.Fprintf(env.stderr, "cohort logs: -n wants a number of lines or \"all\", got %q\n", *lines)
		return 2
	default:
		jargs = append(jargs, "--lines="+strconv.Itoa(n))
	}
	if *follow {
		jargs = append(jargs, "--follow")
	}
	if *since != "" {
		jargs = append(jargs, "--since="+*since) // one argument: never an option of its own
	}
	units := map[string]string{} // unit name → app
	for _, a := range apps {
		for _, u := range []string{a + ".service", a + ".socket"} {
			units[u] = a
			jargs = append(jargs, "--unit="+u)
		}
	}
	if *worker >= 0 {
		jargs = append(jargs, "COHORT_WORKER="+strconv.Itoa(*worker))
	}
	pr := &logPrinter{units: units, json: *asJSON, color: !*asJSON && colorTerminal(env.stdout)}
	return env.runJournalctl(ctx, jargs, pr)
}

// runJournalctl runs journalctl with args and prints each entry it
// writes through pr, until journalctl ends or ctx is done (a follow ends
// only so).
func (env *environment) runJournalctl(ctx context.Context, args []string, pr *logPrinter) int {
	bin := env.journalctl
	if bin == "" {
		bin = "journalctl"
	}
	// journalctl's warnings ("not seeing messages from other users") are
	// the user's; they share stderr with ours, written from exec's copying
	// goroutine unless stderr is a file, hence the lock.
	stderr := &syncWriter{w: env.stderr}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stderr = stderr
	if f, ok := env.stderr.(*os.File); ok {
		cmd.Stderr = f
	}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintf(stderr, "cohort logs: %v\n", err)
		return 1
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "cohort logs: %v (cohort logs reads the journal with journalctl)\n", err)
		return 1
	}
	w := bufio.NewWriterSize(env.stdout, 64<<10)
	rd := bufio.NewReaderSize(out, 64<<10)
	for {
		line, tooLong, err := readEntry(rd)
		if tooLong {
			fmt.Fprintf(stderr, "cohort logs: skipped a journal entry longer than %d bytes\n", maxEntry)
		} else if len(line) > 0 {
			if perr := pr.print(w, line); perr != nil {
				fmt.Fprintf(stderr, "cohort logs: %v\n", perr)
			}
		}
		// Flush at every entry journalctl has sent so far: a follow
		// shows each line as it comes, a full dump writes in blocks.
		if rd.Buffered() == 0 {
			if w.Flush() != nil {
				break // our reader went away (cohort logs | head)
			}
		}
		if err != nil {
			break
		}
	}
	w.Flush()
	out.Close()
	err = cmd.Wait()
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return 0 // interrupted: how a follow ends
	case errors.As(err, &exit):
		return 1 // journalctl said why on stderr
	case err != nil:
		fmt.Fprintf(stderr, "cohort logs: journalctl: %v\n", err)
		return 1
	}
	return 0
}

// syncWriter serializes writes to w.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// readEntry reads one line of at most maxEntry bytes; a longer one is
// read to its end and dropped (tooLong).
func readEntry(rd *bufio.Reader) (line []byte, tooLong bool, err error) {
	for {
		chunk, err := rd.ReadSlice('\n')
		if len(line)+len(chunk) > maxEntry {
			tooLong = true
		}
		if !tooLong {
			line = append(line, chunk...)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return bytes.TrimSuffix(line, []byte{'\n'}), tooLong, err
	}
}

// logPrinter turns journalctl's JSON entries into lines.
type logPrinter struct {
	units map[string]string // the units asked for → their app
	json  bool
	color bool
}

// logEntry is one line of `cohort logs --json`.
type logEntry struct {
	Time time.Time `json:"time"`
	App  string    `json:"app"`
	// Source is "worker", "cohort" (the dispatcher) or "systemd".
	Source     string `json:"source"`
	Worker     *int   `json:"worker,omitempty"`
	PID        int    `json:"pid,omitempty"`
	Generation int    `json:"generation,omitempty"`
	Priority   int    `json:"priority"`
	Message    string `json:"message"`
}

// entry decodes one journalctl JSON entry. Every field is distrusted: a
// value may be a string, an array of byte values (not UTF-8, or binary),
// an array of those (a field sent more than once), or null.
func (p *logPrinter) entry(line []byte) (logEntry, []byte, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(line, &raw); err != nil {
		return logEntry{}, nil, fmt.Errorf("malformed entry from journalctl: %v", err)
	}
	f := func(k string) []byte { return fieldValue(raw[k]) }
	e := logEntry{Priority: 6}
	msg := f("MESSAGE")
	if us, err := strconv.ParseInt(string(f("__REALTIME_TIMESTAMP")), 10, 64); err == nil {
		e.Time = time.UnixMicro(us)
	}
	if n, err := strconv.Atoi(string(f("PRIORITY"))); err == nil && n >= 0 && n <= 7 {
		e.Priority = n
	}
	unit := string(f("_SYSTEMD_UNIT"))
	if _, ok := p.units[unit]; !ok {
		unit = string(f("UNIT")) // systemd's own lines about the unit
	}
	e.App = p.units[unit]
	pid, _ := strconv.Atoi(string(f("_PID")))
	w, werr := strconv.Atoi(string(f("COHORT_WORKER")))
	app := string(f("COHORT_APP"))
	switch {
	case werr == nil && w >= 0 && appfile.CheckAppName(app) == nil:
		e.Source, e.App, e.Worker = "worker", app, &w
		e.PID, _ = strconv.Atoi(string(f("COHORT_PID")))
		e.Generation, _ = strconv.Atoi(string(f("COHORT_GENERATION")))
	case pid == 1:
		e.Source = "systemd"
	default:
		e.Source, e.PID = "cohort", pid
	}
	if e.App == "" {
		e.App = "?"
	}
	return e, msg, nil
}

func (p *logPrinter) print(w io.Writer, line []byte) error {
	e, msg, err := p.entry(line)
	if err != nil {
		return err
	}
	if p.json {
		e.Message = string(bytes.ToValidUTF8(msg, []byte("\uFFFD")))
		b, err := json.Marshal(e)
		if err != nil {
			return err
		}
		_, err = w.Write(append(b, '\n'))
		return err
	}
	var label string
	c := logline.Bold
	switch e.Source {
	case "worker":
		label, c = logline.Worker(e.App, *e.Worker), logline.WorkerColor(*e.Worker)
	case "systemd":
		label = logline.Systemd(e.App)
	default:
		label = logline.Dispatcher(e.App)
	}
	if !p.color {
		c = logline.NoColor
	}
	// A message of several lines (a stack trace sent as one entry) gets
	// its label on each line.
	var out []byte
	for l := range bytes.SplitSeq(msg, []byte{'\n'}) {
		out = logline.Append(out, label, c, l)
		out = append(out, '\n')
	}
	_, err = w.Write(out)
	return err
}

// fieldValue is a journal field's value from journalctl's JSON: a string
// as it is, an array of numbers as those bytes, the first of several
// values; nil for null or anything else.
func fieldValue(raw json.RawMessage) []byte {
	if len(raw) == 0 {
		return nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []byte(s)
	}
	var bs []int
	if json.Unmarshal(raw, &bs) == nil {
		out := make([]byte, 0, len(bs))
		for _, b := range bs {
			if b < 0 || b > 255 {
				return nil
			}
			out = append(out, byte(b))
		}
		return out
	}
	var many []json.RawMessage
	if json.Unmarshal(raw, &many) == nil && len(many) > 0 && !bytes.HasPrefix(bytes.TrimSpace(many[0]), []byte{'['}) {
		return fieldValue(many[0])
	}
	return nil
}

// colorTerminal reports whether w is a terminal that takes colours: a
// tty, TERM not "dumb", NO_COLOR (no-color.org) not set.
func colorTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" || os.Getenv("TERM") == "dumb" {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
