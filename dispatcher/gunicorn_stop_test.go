package dispatcher

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// TestKillModeGunicorn: Debian's gunicorn (20.1 on bookworm and trixie)
// under the real dispatcher, stopped by two reloads and a stop. With
// kill_mode = "group" its workers get SIGTERM from cohort and again from
// their master, and the master's one reaches some of them after Python
// restored the default handler while exiting: the master logs "Worker
// with pid N was terminated due to signal 15" (22.x: "Worker (pid:N) was
// sent SIGTERM!"). Which worker is a race, so there are 4 workers × 3
// stops and "group" needs one such line; "mixed" may have none: only the
// master gets SIGTERM, and it stops its workers once. Both stop
// gracefully: each master exits with status 0 after every worker said
// "Worker exiting".
func TestKillModeGunicorn(t *testing.T) {
	t.Parallel()
	py := testtool.NeedPython(t, "gunicorn")
	const gworkers, rounds = 4, 3
	warn := regexp.MustCompile(`Worker with pid \d+ was terminated due to signal 15|was sent SIGTERM`)
	for _, mode := range []string{appfile.KillModeGroup, appfile.KillModeMixed} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			app := appfile.New("gu")
			app.Command = []string{py, "-m", "gunicorn", "--workers", strconv.Itoa(gworkers),
				"--chdir", filepath.Join(repoRoot(t), "dispatcher", "testdata", "ready"), "wsgi:app"}
			app.Workers = appfile.Workers{N: 1}
			app.KillMode = mode
			app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
			app.StopTimeout = 30 * time.Second
			app.ReadyTimeout = 60 * time.Second
			l, addr := tcpListener(t, "http")
			out, logs := &testsync.Buffer{}, &testsync.Buffer{}
			rt := t.TempDir()
			rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}, Stdout: out, Stderr: logs, RuntimeDir: rt,
				Load: func() (*appfile.App, error) { return app, nil }})
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("gunicorn's output:\n%s", out)
				}
			})
			rec.waitNotify(t, 60*time.Second, "READY=1")
			for i := range rounds {
				if body, err := get("http://" + addr + "/"); err != nil || !strings.HasPrefix(body, "hello from gunicorn worker ") {
					t.Fatalf("answer %q, %v", body, err)
				}
				if i == rounds-1 {
					break
				}
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				_, err := control.Call(ctx, filepath.Join(rt, control.SocketName), control.Request{Cmd: control.CmdReload})
				cancel()
				if err != nil {
					t.Fatalf("reload %d: %v", i+1, err)
				}
			}
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			o, d := out.String(), logs.String()
			n := len(warn.FindAllString(o, -1))
			t.Logf("kill_mode = %s: %d of %d gunicorn workers were killed by the second SIGTERM", mode, n, gworkers*rounds)
			// In group mode the second SIGTERM lands on a gunicorn worker
			// only while it is already exiting: a race (4–9 of 12 here), so
			// it calibrates the pattern but is not asserted, lest the test
			// fail by chance. Mixed mode must never show it.
			if mode == appfile.KillModeMixed && n > 0 {
				t.Errorf("kill_mode = mixed: gunicorn logged %q", warn.FindString(o))
			}
			if got := strings.Count(o, "Worker exiting"); got != gworkers*rounds {
				t.Errorf("%d \"Worker exiting\" lines, want %d (every gunicorn worker stopping gracefully)", got, gworkers*rounds)
			}
			if got := strings.Count(o, "Shutting down: Master"); got != rounds {
				t.Errorf("%d \"Shutting down: Master\", want %d", got, rounds)
			}
			if got := strings.Count(d, "exited with status 0 (SIGTERM sent by cohort)"); got != rounds {
				t.Errorf("%d masters \"exited with status 0 (SIGTERM sent by cohort)\", want %d", got, rounds)
			}
		})
	}
}
