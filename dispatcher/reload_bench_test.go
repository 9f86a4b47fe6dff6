package dispatcher

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
)

// BenchmarkReload measures a rolling reload of 4 Go workers (ready =
// notify, reload_batch 1), and reports it against the cold start of the
// same 4 workers (fork to READY=1 of the dispatcher) in the same run.
func BenchmarkReload(b *testing.B) {
	start := time.Now()
	f := startFromFile(b, appFile{workers: 4})
	cold := time.Since(start)
	b.ResetTimer()
	for range b.N {
		if _, err := f.call(b, 60*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	per := b.Elapsed() / time.Duration(b.N)
	b.ReportMetric(float64(per.Microseconds())/1000, "ms/reload")
	b.Logf("reload of 4 workers: %s; cold start of 4 workers: %s; ratio %.2fx", per.Round(time.Microsecond), cold.Round(time.Microsecond), float64(per)/float64(cold))
}

// countWriter counts the lines written to it.
type countWriter struct{ lines atomic.Int64 }

func (c *countWriter) Write(p []byte) (int, error) {
	c.lines.Add(int64(strings.Count(string(p), "\n")))
	return len(p), nil
}

// BenchmarkLogRelay: one worker writes 100-byte lines as fast as it can;
// lines/s relayed by the dispatcher (terminal mode, "app.0 | " label, to
// a discarding writer; and journal mode, native protocol to a socket
// that only counts), against the same program writing to /dev/null
// directly, in the same run.
func BenchmarkLogRelay(b *testing.B) {
	const lines = 200000
	line := strings.Repeat("l", 99)
	env := map[string]string{"COHORT_TEST_HELPER": "printer", "HELPER_LINES": line, "HELPER_REPEAT": strconv.Itoa(lines), "HELPER_EXIT": "0"}
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}

	direct := func() time.Duration {
		devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			b.Fatal(err)
		}
		defer devnull.Close()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "COHORT_TEST_HELPER=printer", "HELPER_LINES="+line, "HELPER_REPEAT="+strconv.Itoa(lines), "HELPER_EXIT=0")
		cmd.Stdout = devnull
		start := time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	relay := func(journal bool) time.Duration {
		app := testApp(b, 1, env)
		app.Restart = appfile.Restart{Initial: time.Hour, Max: time.Hour, MinUptime: time.Hour}
		l, _ := tcpListener(b, "http")
		count := &countWriter{}
		opt := Options{App: app, Listeners: []*os.File{l}, Stdout: count}
		if journal {
			path := filepath.Join(b.TempDir(), "journal.sock")
			conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					if _, err := conn.Read(buf); err != nil {
						return
					}
					count.lines.Add(1)
				}
			}()
			opt.Journal, opt.JournalSocket = true, path
		}
		start := time.Now()
		_, stop := startRun(b, opt)
		deadline := time.Now().Add(60 * time.Second)
		for count.lines.Load() < lines {
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d lines relayed after 60s", count.lines.Load(), lines)
			}
			time.Sleep(time.Millisecond)
		}
		took := time.Since(start)
		stop()
		return took
	}
	var tDirect, tTerm, tJournal time.Duration
	for range b.N {
		tDirect += direct()
		tTerm += relay(false)
		tJournal += relay(true)
	}
	rate := func(d time.Duration) float64 { return float64(lines) * float64(b.N) / d.Seconds() }
	b.ReportMetric(rate(tTerm), "lines/s-terminal")
	b.ReportMetric(rate(tJournal), "lines/s-journal")
	b.ReportMetric(rate(tDirect), "lines/s-devnull")
	b.Logf("one worker, %d lines of 100 bytes: /dev/null directly %.0f lines/s; relayed to a terminal writer %.0f lines/s (%.2fx); to the journal socket %.0f lines/s (%.2fx)",
		lines, rate(tDirect), rate(tTerm), rate(tTerm)/rate(tDirect), rate(tJournal), rate(tJournal)/rate(tDirect))
}
