package dispatcher

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// serveExample runs the example worker command under the dispatcher in
// shared mode with two workers and checks that both answer with want.
func serveExample(t *testing.T, ready appfile.Readiness, want string, command ...string) {
	t.Helper()
	app := appfile.New("ex")
	app.Command = command
	app.Workers = appfile.Workers{N: 2}
	app.Ready = ready
	app.WorkingDirectory = repoRoot(t)
	app.Listen = []appfile.Listener{{Name: "http", Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	app.StopTimeout = 10 * time.Second
	l, addr := tcpListener(t, "http")
	rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{l}})
	rec.waitNotify(t, 30*time.Second, "READY=1")
	seen := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(seen) < 2 && time.Now().Before(deadline) {
		body, err := get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(body, want) {
			t.Fatalf("answer %q, want %q…", body, want)
		}
		seen[strings.Fields(strings.TrimPrefix(body, want))[0]] = true
	}
	if len(seen) < 2 {
		t.Errorf("only workers %v answered", seen)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	for _, e := range rec.events {
		if e.Kind == WorkerExited && (e.ExitCode != 0 || e.RestartIn != 0) {
			t.Errorf("worker %d (pid %d) ended with %+v, want a graceful exit 0 on stop", e.Worker, e.PID, e)
		}
	}
}

func TestPythonWorker(t *testing.T) {
	t.Parallel()
	py := testtool.Need(t, "python3")
	serveExample(t, appfile.Readiness{Kind: appfile.ReadyNotify}, "hello from python worker ",
		py, filepath.Join("examples", "python", "shared_worker.py"))
}

func TestNodeWorker(t *testing.T) {
	t.Parallel()
	node := testtool.Need(t, "node")
	serveExample(t, appfile.Readiness{Kind: appfile.ReadyExec}, "hello from node worker ",
		node, filepath.Join("examples", "node", "server.js"))
}

// TestGoExampleWorker serves examples/hello, built once per test binary.
func TestGoExampleWorker(t *testing.T) {
	t.Parallel()
	serveExample(t, appfile.Readiness{Kind: appfile.ReadyNotify}, "hello from worker ", helloBinary(t))
}

// hello is examples/hello built into a directory of this test binary's
// own, which TestMain removes.
var hello struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// helloBinary builds examples/hello once and returns its path; every
// caller waits for the one build, so nobody execs a file still being
// written. It skips the test with -short.
func helloBinary(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds examples/hello")
	}
	root := repoRoot(t)
	hello.once.Do(func() {
		if hello.dir, hello.err = os.MkdirTemp("", "cohort-dispatcher-test-"); hello.err != nil {
			return
		}
		bin := filepath.Join(hello.dir, "cohort-hello")
		cmd := exec.Command("go", "build", "-o", bin, "./examples/hello")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			hello.err = fmt.Errorf("go build ./examples/hello: %v\n%s", err, out)
			return
		}
		// go build has exited, so the file is complete and closed; check
		// what lookPath will check.
		fi, err := os.Stat(bin)
		if err == nil && fi.Mode()&0o111 == 0 {
			err = fmt.Errorf("mode %v, want an executable", fi.Mode())
		}
		if err != nil {
			hello.err = fmt.Errorf("go build ./examples/hello: %w", err)
			return
		}
		hello.bin = bin
	})
	if hello.err != nil {
		t.Fatal(hello.err)
	}
	return hello.bin
}

// removeHello removes what helloBinary built; TestMain calls it.
func removeHello() {
	if hello.dir != "" {
		os.RemoveAll(hello.dir)
	}
}
