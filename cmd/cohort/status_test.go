package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// statusEnv runs a subcommand in-process with its own search path,
// runtime root and systemd answers.
func statusEnv(t *testing.T, searchPath []string, root string, units func(context.Context, string) (unitState, unitState, error), args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := &environment{stdout: &out, stderr: &errOut, searchPath: searchPath, runtimeRoot: root, units: units}
	code := runMain(context.Background(), env, args)
	return code, out.String(), errOut.String()
}

// serveStub serves stub on a real control socket at dir/NAME/control.sock.
func serveStub(t *testing.T, path string, stub control.Handler) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	srv, err := control.Listen(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, stub) }()
	t.Cleanup(func() { cancel(); <-done })
}

func noUnits(t *testing.T) func(context.Context, string) (unitState, unitState, error) {
	return func(context.Context, string) (unitState, unitState, error) {
		t.Error("systemd asked, but the hint does not depend on it")
		return unitState{}, unitState{}, errors.New("no systemd here")
	}
}

// TestStatusUnknownApp: a name that is no app file, no service's runtime
// directory and no `cohort run` says so and lists the apps there are.
func TestStatusUnknownApp(t *testing.T) {
	etc, root := t.TempDir(), filepath.Join(t.TempDir(), "cohort")
	writeApp(t, etc, "web.toml", goodApp)
	writeApp(t, etc, "api.toml", goodApp)
	code, _, errOut := statusEnv(t, []string{etc}, root, noUnits(t), "status", "wbe")
	if want := "cohort status wbe: no app \"wbe\"; known apps: api, web\n"; code != 1 || errOut != want {
		t.Errorf("status wbe: %d %q, want %q", code, errOut, want)
	}
	code, _, errOut = statusEnv(t, []string{t.TempDir()}, root, noUnits(t), "status", "wbe")
	if want := "cohort status wbe: no app \"wbe\"; known apps: none\n"; code != 1 || errOut != want {
		t.Errorf("status wbe without apps: %d %q, want %q", code, errOut, want)
	}
}

// TestStatusSocketActiveHint: an app whose socket unit is active and
// whose service has not started yet is waiting for its first
// connection, and status says so; other unit states get their own words.
func TestStatusSocketActiveHint(t *testing.T) {
	etc, root := t.TempDir(), filepath.Join(t.TempDir(), "cohort")
	writeApp(t, etc, "web.toml", goodApp)
	for _, tc := range []struct {
		svc, sock string
		want      string
	}{
		{"inactive", "active", "cohort status web: socket active, no worker started yet (socket activation: the first connection starts it; `systemctl start web` starts it now)\n"},
		{"failed", "failed", "cohort status web: web.service failed: 'systemctl status web', 'journalctl -u web'\n"},
		{"inactive", "inactive", "cohort status web: not running (web.service is inactive, web.socket is inactive: 'systemctl start web')\n"},
	} {
		units := func(_ context.Context, app string) (unitState, unitState, error) {
			if app != "web" {
				t.Errorf("asked systemd about %q", app)
			}
			return unitState{Active: tc.svc, Sub: "dead"}, unitState{Active: tc.sock, Sub: "listening"}, nil
		}
		code, _, errOut := statusEnv(t, []string{etc}, root, units, "status", "web")
		if code != 1 || errOut != tc.want {
			t.Errorf("service %s, socket %s: %d %q, want %q", tc.svc, tc.sock, code, errOut, tc.want)
		}
	}
}

// TestStatusNeedsRoot: a user who is neither root nor the app's user
// cannot open the control socket (mode 0600, root's); status says to
// run it as root instead of "permission denied (is the app running?)".
// The client really runs as nobody.
func TestStatusNeedsRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		testtool.Missing(t, "root is needed to switch to nobody (make test runs as root in CI)")
	}
	// Not t.TempDir: its parent is 0700, and nobody must reach the binary.
	base, err := os.MkdirTemp("", "cohort-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(base, "cohort")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(root, "web", control.SocketName)
	serveStub(t, sock, &stubDispatcher{})
	os.Chmod(filepath.Dir(sock), 0o755) // others may look, not connect
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(base, "cohort-bin")
	copyFile(t, self, bin, 0o755)
	for _, args := range [][]string{{"status", "web"}, {"scale", "web", "2"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = []string{"COHORT_TEST_MAIN=1", "COHORT_TEST_RUNTIME_ROOT=" + root, "PATH=/usr/bin:/bin"}
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		cancel()
		want := "cohort " + args[0] + " web: the control socket is readable by root and the app's user only: run as root (sudo cohort status web)\n"
		if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 || string(out) != want {
			t.Errorf("%v as nobody: %v\n%s\nwant %s", args, err, out, want)
		}
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestStatusAll: without APP, status lists every app: generated services
// (app files) and `cohort run` instances, a line per app and per worker,
// and why an app has no status; --json gives the same as a list.
func TestStatusAll(t *testing.T) {
	etc, root := t.TempDir(), filepath.Join(t.TempDir(), "cohort")
	writeApp(t, etc, "web.toml", goodApp)
	writeApp(t, etc, "db.toml", goodApp)
	serveStub(t, filepath.Join(root, "web", control.SocketName), &stubDispatcher{})
	runSock := filepath.Join(root, "api", control.SocketName)
	serveStub(t, runSock, &stubDispatcher{})
	writeApp(t, filepath.Join(root, "api"), runLock, "")
	units := func(_ context.Context, app string) (unitState, unitState, error) {
		if app != "db" {
			t.Errorf("asked systemd about %q", app)
		}
		return unitState{Active: "inactive"}, unitState{Active: "active"}, nil
	}
	code, out, errOut := statusEnv(t, []string{etc}, root, units, "status")
	if code != 0 || errOut != "" {
		t.Fatalf("status: %d %s\n%s", code, errOut, out)
	}
	for _, re := range []string{
		`(?m)^APP\s+PID\s+GEN\s+STATE\s+UPTIME\s+RESTARTS\s+CONNS\s+RSS\s+CPU%$`,
		`(?m)^api\s+4242\s+2\s+ready 1/2\s+1h1m30s\s+4\s+3/500\s+30\.0M\s+12\.5$`,
		`(?m)^  api\.0\s+101\s+2\s+ready\s+1m30s\s+4\s+3/500\s+30\.0M\s+12\.5$`,
		`(?m)^api\.0: restarted 4 times: crashed 2, oom_killed 1, unhealthy 1$`,
		`(?m)^  api\.1\s+-\s+2\s+backoff\s+-\s+0\s+0/0\s+-\s+0\.0$`,
		`(?m)^db\s+-\s+-\s+waiting\s+-\s+-\s+-\s+-\s+-$`,
		`(?m)^web\s+\d+\s+2\s+ready 1/2`,
		`(?m)^  web\.1\s+-\s+2\s+backoff`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("status lacks %s:\n%s", re, out)
		}
	}
	if want := "\ndb: socket active, no worker started yet (socket activation: the first connection starts it; `systemctl start db` starts it now)\n"; !strings.HasSuffix(out, want) {
		t.Errorf("status does not end with %q:\n%s", want, out)
	}
	code, out, errOut = statusEnv(t, []string{etc}, root, units, "status", "--json")
	var all []struct {
		App     string          `json:"app"`
		Source  string          `json:"source"`
		Socket  string          `json:"socket"`
		File    string          `json:"file"`
		Status  *control.Status `json:"status"`
		State   string          `json:"state"`
		Problem string          `json:"problem"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &all) != nil || len(all) != 3 {
		t.Fatalf("status --json: %d %s\n%s", code, errOut, out)
	}
	api, db, web := all[0], all[1], all[2]
	if api.App != "api" || api.Source != "run" || api.Socket != runSock || api.Status == nil || len(api.Status.Workers) != 2 || api.Status.Workers[0].Handed != 500 {
		t.Errorf("api: %+v", api)
	}
	if db.App != "db" || db.Source != "unit" || db.Status != nil || db.State != "waiting" || !strings.HasPrefix(db.Problem, "socket active, no worker started yet") || db.File != filepath.Join(etc, "db.toml") {
		t.Errorf("db: %+v", db)
	}
	if web.App != "web" || web.Source != "unit" || web.Status == nil || web.Status.App != "web" {
		t.Errorf("web: %+v", web)
	}
	// status APP finds a `cohort run` without --socket.
	if code, out, errOut := statusEnv(t, []string{etc}, root, noUnits(t), "status", "api"); code != 0 || !strings.HasPrefix(out, "web: 2/2 workers ready") {
		t.Errorf("status api: %d %s\n%s", code, errOut, out)
	}
}

// TestDefaultName: the app name of `cohort run -- COMMAND` without --name.
func TestDefaultName(t *testing.T) {
	for _, tc := range []struct {
		cmd  []string
		want string
	}{
		{[]string{"node", "server.js"}, "server"},
		{[]string{"/usr/bin/node", "--max-old-space-size=512", "dist/main.mjs"}, "main"},
		{[]string{"python3", "app.py"}, "app"},
		{[]string{"python3.11", "-u", "/srv/x/worker.py"}, "worker"},
		{[]string{"python3", "-m", "http.server", "8000"}, "http.server"},
		{[]string{"python3", "-c", "print(1)"}, "python3"},
		{[]string{"./bin/api"}, "api"},
		{[]string{"gunicorn", "app:app"}, "gunicorn"},
		{[]string{"deno", "run", "--allow-net", "main.ts"}, "main"},
		{[]string{"sh", "-c", "exec foo"}, "sh"},
		{[]string{"bash", "start.sh"}, "start"},
		{[]string{"ruby", "my app.rb"}, "my-app"},
		{[]string{"node", ".hidden.js"}, "hidden"},
		{[]string{"node", "ünï.js"}, "n--"},
		{[]string{"./" + strings.Repeat("x", 100)}, strings.Repeat("x", 66)},
	} {
		if got := defaultName(tc.cmd); got != tc.want {
			t.Errorf("defaultName(%q) = %q, want %q", tc.cmd, got, tc.want)
		}
	}
}

// TestRunSocketPlace: `cohort run` keeps its control socket at
// ROOT/NAME/control.sock, NAME being the script's base name by default;
// `cohort status NAME` finds it without --socket, a second run of that
// name is refused while the first runs, and the directory goes at exit.
func TestRunSocketPlace(t *testing.T) {
	py := testtool.Need(t, "python3")
	root := filepath.Join(t.TempDir(), "cohort")
	script := filepath.Join("..", "..", "examples", "python", "shared_worker.py")
	args := []string{"--listen", "http=127.0.0.1:0", "--workers", "1", "--ready", "notify", "--", py, script}
	_, stderr, stop := startCohortRunIn(t, root, args...)
	waitListening(t, stderr, "all 1 workers ready")
	dir := filepath.Join(root, "shared_worker")
	if want := "shared_worker.cohort | control socket: " + filepath.Join(dir, control.SocketName) + " (cohort status shared_worker)"; !strings.Contains(stderr.String(), want) {
		t.Errorf("cohort run did not say %q:\n%s", want, stderr)
	}
	code, out, errOut := statusEnv(t, []string{t.TempDir()}, root, noUnits(t), "status", "shared_worker")
	if code != 0 || !strings.HasPrefix(out, "shared_worker: 1/1 workers ready") {
		t.Errorf("status shared_worker: %d %s\n%s", code, errOut, out)
	}
	code, out, _ = statusEnv(t, []string{t.TempDir()}, root, noUnits(t), "status")
	if code != 0 || !regexp.MustCompile(`(?m)^shared_worker\s+\d+\s+1\s+ready 1/1\s`).MatchString(out) {
		t.Errorf("status: %d\n%s", code, out)
	}
	var o, e bytes.Buffer
	code = runMain(context.Background(), &environment{stdout: &o, stderr: &e, runtimeRoot: root}, append([]string{"run"}, args...))
	if want := `cohort run: an app named "shared_worker" is running already`; code != 1 || !strings.HasPrefix(e.String(), want) {
		t.Errorf("second run: %d %q, want %q…", code, e.String(), want)
	}
	if code := stop(); code != 0 {
		t.Errorf("cohort run exited %d", code)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left behind: %v", dir, err)
	}
	// A directory planted by someone else, or open to others, is refused.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	e.Reset()
	code = runMain(context.Background(), &environment{stdout: &o, stderr: &e, runtimeRoot: root}, append([]string{"run"}, args...))
	if want := "has mode 0755; it must be 0700"; code != 1 || !strings.Contains(e.String(), want) {
		t.Errorf("run under a 0755 root: %d %q, want %q", code, e.String(), want)
	}
}
