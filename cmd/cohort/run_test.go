package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testsync"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// startCohortRun runs `cohort run ARGS…` in-process (its workers go
// through this test binary's trampoline) and returns its streams and a
// stop function that cancels it like Ctrl-C and returns the exit code.
func startCohortRun(t *testing.T, args ...string) (stdout, stderr *testsync.Buffer, stop func() int) {
	t.Helper()
	return startCohortRunIn(t, filepath.Join(t.TempDir(), "cohort"), args...) // created 0700 by cohort run
}

// startCohortRunIn is startCohortRun with its runtime directories under
// root.
func startCohortRunIn(t *testing.T, root string, args ...string) (stdout, stderr *testsync.Buffer, stop func() int) {
	t.Helper()
	stdout, stderr = &testsync.Buffer{}, &testsync.Buffer{}
	ctx, cancel := context.WithCancel(context.Background())
	code := make(chan int, 1)
	go func() {
		code <- runMain(ctx, &environment{stdout: stdout, stderr: stderr, runtimeRoot: root}, append([]string{"run"}, args...))
	}()
	var once sync.Once
	var rc int
	stop = func() int {
		once.Do(func() {
			cancel()
			select {
			case rc = <-code:
			case <-time.After(30 * time.Second):
				t.Error("cohort run did not return")
				rc = -1
			}
		})
		return rc
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
		}
	})
	return stdout, stderr, stop
}

var listeningRE = regexp.MustCompile(`listening on (\S+)`)

func waitListening(t *testing.T, stderr *testsync.Buffer, ready string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		s := stderr.String()
		if m := listeningRE.FindStringSubmatch(s); m != nil && strings.Contains(s, ready) {
			return m[1]
		}
		if strings.Contains(s, "cohort run:") {
			t.Fatalf("cohort run failed:\n%s", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("cohort run not ready:\n%s", stderr)
	return ""
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestRunRoundRobin: `cohort run --mode round-robin` serves from every
// worker, each connection handed over by the dispatcher (the Python
// example speaks the round-robin protocol), and stops with status 0.
func TestRunRoundRobin(t *testing.T) {
	py := testtool.Need(t, "python3")
	script := filepath.Join("..", "..", "examples", "python", "rr_worker.py")
	_, stderr, stop := startCohortRun(t, "--listen", "http=127.0.0.1:0", "--workers", "2", "--mode", "round-robin", "--ready", "notify", "--name", "py", "--", py, script)
	addr := waitListening(t, stderr, "all 2 workers ready")
	counts := map[string]int{}
	for range 10 {
		body := httpGet(t, "http://"+addr+"/")
		if !strings.HasPrefix(body, "hello from worker ") {
			t.Fatalf("answer %q", body)
		}
		counts[strings.Fields(body)[3]]++
	}
	if counts["0"] != 5 || counts["1"] != 5 {
		t.Errorf("answers per worker %v, want 5 each in turn", counts)
	}
	if !strings.Contains(stderr.String(), "round-robin mode") {
		t.Errorf("log does not name the mode:\n%s", stderr)
	}
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
}

// TestRunListenCommand: `cohort run --listen … --workers 2 -- CMD` binds
// the socket, serves from both workers, prefixes their output and stops
// with exit status 0.
func TestRunListenCommand(t *testing.T) {
	py := testtool.Need(t, "python3")
	script := filepath.Join("..", "..", "examples", "python", "shared_worker.py")
	stdout, stderr, stop := startCohortRun(t, "--listen", "http=127.0.0.1:0", "--workers", "2", "--ready", "notify", "--name", "py", "--", py, script)
	addr := waitListening(t, stderr, "all 2 workers ready")
	seen := map[string]bool{}
	for i := 0; i < 200 && len(seen) < 2; i++ {
		body := httpGet(t, "http://"+addr+"/")
		if !strings.HasPrefix(body, "hello from python worker ") {
			t.Fatalf("answer %q", body)
		}
		seen[strings.Fields(body)[4]] = true
	}
	if len(seen) != 2 {
		t.Errorf("workers answering: %v", seen)
	}
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
	for _, want := range []string{"py.0 | python worker 0", "py.1 | python worker 1"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("stdout lacks %q:\n%s", want, stdout)
		}
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("the socket is still open after cohort run returned")
	}
}

// TestRunReusePort: `cohort run --mode reuseport` binds one SO_REUSEPORT
// socket per worker on the same port (port 0: the one the first got), an
// unmodified socket-activated worker accepts on its own, and the kernel
// spreads connections over them; all of them are closed at the end.
func TestRunReusePort(t *testing.T) {
	py := testtool.Need(t, "python3")
	script := filepath.Join("..", "..", "examples", "python", "shared_worker.py")
	_, stderr, stop := startCohortRun(t, "--listen", "http=127.0.0.1:0", "--workers", "2", "--mode", "reuseport", "--ready", "notify", "--name", "py", "--", py, script)
	addr := waitListening(t, stderr, "all 2 workers ready")
	if !strings.Contains(stderr.String(), "listening on "+addr+" (http, 2 reuseport sockets)") {
		t.Errorf("log does not say how many sockets:\n%s", stderr)
	}
	seen := map[string]int{}
	for range 100 {
		body := httpGet(t, "http://"+addr+"/")
		if !strings.HasPrefix(body, "hello from python worker ") {
			t.Fatalf("answer %q", body)
		}
		seen[strings.Fields(body)[4]]++
	}
	// Kernel hashing of 100 source ports: both sockets get some.
	if len(seen) != 2 {
		t.Errorf("answers per worker %v; want both workers", seen)
	}
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("a socket is still open after cohort run returned")
	}
}

// TestRunFile: `cohort run FILE.toml` with the Node example when node is
// installed (else a shell worker), on a free port.
func TestRunFile(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	node := testtool.Need(t, "node")
	server, _ := filepath.Abs(filepath.Join("..", "..", "examples", "node", "server.js"))
	app := writeApp(t, t.TempDir(), "nodeapp.toml", fmt.Sprintf(
		"command = [%q, %q]\nworkers = 2\nready = \"exec\"\n[[listen]]\nname = \"http\"\naddress = %q\n", node, server, addr))
	_, stderr, stop := startCohortRun(t, "--workers", "1", app)
	waitListening(t, stderr, "all 1 workers ready")
	body := httpGet(t, "http://"+addr+"/")
	if !strings.HasPrefix(body, "hello from node worker 0 ") {
		t.Errorf("answer %q", body)
	}
	if code := stop(); code != 0 {
		t.Errorf("exit status %d", code)
	}
}

func TestRunUsage(t *testing.T) {
	for _, args := range [][]string{{"run"}, {"run", "--listen", "127.0.0.1:1"}, {"run", "--listen", "nope:x", "--", "true"}, {"run", "--workers", "0", "x.toml"}, {"run", "--mode", "reuse", "--listen", "127.0.0.1:1", "--", "true"}} {
		code, _, errOut := runCohort(t, nil, args...)
		if code != 2 || !strings.HasPrefix(errOut, "cohort run: ") || strings.Count(errOut, "\n") != 1 {
			t.Errorf("%q: code %d, stderr %q; want 2 and one line", args, code, errOut)
		}
	}
}
