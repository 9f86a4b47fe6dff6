package dispatcher

import (
	"io"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/logrelay"
	"github.com/cohort-dev/cohort/internal/journal"
)

// output is the dispatcher's end of its log relay (internal/logrelay):
// its own log lines and its workers' output go through it, never
// blocking the loop. It holds the journal sender the relay writes to,
// which the dispatcher closes after the relay.
type output struct {
	r  *logrelay.Relay
	jw *journal.Sender // nil unless in journal mode
}

// workerTag names the worker process a line comes from.
type workerTag = logrelay.Tag

// newOutput starts the relay toward stdout and stderr, and toward jw when
// it is set (journal mode); close ends it.
func newOutput(app string, stdout, stderr io.Writer, jw *journal.Sender, lim appfile.LogRateLimit, color bool) *output {
	return &output{
		r:  logrelay.New(logrelay.Config{App: app, Stdout: stdout, Stderr: stderr, Journal: jw, RateLimit: lim, Color: color}),
		jw: jw,
	}
}

func (o *output) infof(format string, args ...any)        { o.r.Infof(format, args...) }
func (o *output) warnf(format string, args ...any)        { o.r.Warnf(format, args...) }
func (o *output) copyLines(t workerTag, rd io.ReadCloser) { o.r.CopyLines(t, rd) }
func (o *output) close()                                  { o.r.Close() }
