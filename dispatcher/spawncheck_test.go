package dispatcher

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// TestSpawnErrorsThatCannotHeal: a working directory that does not exist
// and a NUL in an environment file made every fork fail, and the slots
// retried "fork /proc/self/exe" forever (issue 14, item 8). Run now fails
// at once, naming the problem, without forking a worker.
func TestSpawnErrorsThatCannotHeal(t *testing.T) {
	t.Parallel()
	envFile := filepath.Join(t.TempDir(), "env")
	writeFile(t, envFile, "A=1\x00B=2\n")
	tests := []struct {
		name string
		edit func(*appfile.App)
		want string
	}{
		{"missing working directory", func(a *appfile.App) { a.WorkingDirectory = "/nonexistent/cohort-test" },
			`working_directory "/nonexistent/cohort-test" does not exist on this host`},
		{"NUL from an environment file", func(a *appfile.App) { a.EnvironmentFiles = []string{envFile} },
			`environment variable "A" holds a NUL byte`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			app := testApp(t, 2, nil)
			tt.edit(app)
			l, _ := tcpListener(t, "http")
			rec := newRecorder()
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			start := time.Now()
			err := Run(ctx, Options{App: app, Listeners: []*os.File{l}, RuntimeDir: t.TempDir(), Stderr: &testsync.Buffer{}, Observe: rec.observe})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Run = %v, want an error containing %q", err, tt.want)
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("Run took %v to fail", took)
			}
			if n := rec.count(WorkerStarted) + rec.count(WorkerSpawnFailed); n > 0 {
				t.Errorf("%d worker forks were tried", n)
			}
		})
	}
}

// TestReloadToMissingWorkingDirectory: a reload to a working directory
// that does not exist fails with the message, and the old workers serve on.
func TestReloadToMissingWorkingDirectory(t *testing.T) {
	t.Parallel()
	a := appFile{workers: 2}
	f := startFromFile(t, a)
	a.addr = f.addr
	writeFile(t, f.file, "working_directory = \"/nonexistent/cohort-test\"\n"+a.toml(t))
	_, err := f.call(t, 30*time.Second, control.Request{Cmd: control.CmdReload})
	if err == nil || !strings.Contains(err.Error(), `t.toml:1:1: working_directory "/nonexistent/cohort-test" does not exist on this host`) {
		t.Fatalf("reload = %v, want the working_directory error", err)
	}
	st := f.status(t)
	if st.Generation != 1 || len(st.Workers) != 2 {
		t.Fatalf("status after the failed reload: %+v", st)
	}
	for _, w := range st.Workers {
		if w.State != "ready" || w.Generation != 1 {
			t.Errorf("worker after the failed reload: %+v", w)
		}
	}
}

// TestNotifyNameFitsAppNameBound: appfile.MaxAppName is derived from the
// longest notify socket name; the dispatcher must not make a longer one.
func TestNotifyNameFitsAppNameBound(t *testing.T) {
	if n := len(notifyName(4194304, 0xffffffff)); n != appfile.MaxRuntimeSocketName {
		t.Errorf("longest notify socket name is %d bytes, appfile.MaxRuntimeSocketName is %d", n, appfile.MaxRuntimeSocketName)
	}
	if len(control.SocketName) > appfile.MaxRuntimeSocketName {
		t.Errorf("control socket name %q is longer than appfile.MaxRuntimeSocketName", control.SocketName)
	}
}
