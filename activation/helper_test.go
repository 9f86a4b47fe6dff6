package activation_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/activation/rr"
)

// The test binary re-executes itself as a child process: COHORT_TEST_HELPER
// selects what the child does.
//
//	shim    activation.Exec(argv...) with COHORT_TEST_HELPER=$COHORT_TEST_NEXT,
//	        as a dispatcher's exec shim would (sets LISTEN_PID)
//	serve   Inherit, Listen("http") and serve with activation.Serve
//	report  Inherit and print what it found
//	take    Inherit, Listen("http"), then TakeAll twice and print what each gave
func TestMain(m *testing.M) {
	switch os.Getenv("COHORT_TEST_HELPER") {
	case "":
		// The tests (and the children they start) must not talk to
		// whatever started go test: an inherited NOTIFY_SOCKET whose
		// reader is busy made the first Accept block.
		for _, k := range []string{"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", rr.ListenersEnv} {
			os.Unsetenv(k)
		}
		os.Exit(m.Run())
	case "shim":
		env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "COHORT_TEST_HELPER=") })
		env = append(env, "COHORT_TEST_HELPER="+os.Getenv("COHORT_TEST_NEXT"))
		path, err := exec.LookPath(os.Args[1])
		if err == nil {
			err = activation.Exec(path, os.Args[1:], env)
		}
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	case "serve":
		os.Exit(helperServe())
	case "report":
		files, err := activation.Inherit()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Printf("activated=%v names=%v env=%q\n", files.Activated(), files.Names(), leftoverEnv())
		os.Exit(0)
	case "take":
		files, err := activation.Inherit()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if _, err := files.Listen("http", ""); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		for range 2 {
			var got []string
			for _, f := range files.TakeAll() {
				got = append(got, fmt.Sprintf("%s@%d", f.Name(), f.Fd()))
			}
			fmt.Printf("%v names=%v\n", got, files.Names())
		}
		os.Exit(0)
	}
	os.Exit(2)
}

func leftoverEnv() string {
	var left []string
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "COHORT_RR_LISTENERS"} {
		if v, ok := os.LookupEnv(k); ok {
			left = append(left, k+"="+v)
		}
	}
	return strings.Join(left, " ")
}

// helperServe answers every request with what the worker sees.
func helperServe() int {
	files, err := activation.Inherit()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ln, err := files.Listen("http", "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	files.Close()
	env := leftoverEnv()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		fmt.Fprintf(w, "pid=%d addr=%s local=%s env=%q", os.Getpid(), ln.Addr(), local, env)
	})}
	err = activation.Serve(context.Background(), srv, ln, 5*time.Second)
	switch {
	case errors.Is(err, net.ErrClosed):
		fmt.Println("dispatcher gone")
		return 3
	case err != nil:
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// child is a started helper process; t.Cleanup kills it by pid.
type child struct {
	cmd    *exec.Cmd
	out    *strings.Builder
	done   chan struct{}
	exited error
}

// startChild starts argv through the exec shim (so that LISTEN_PID is the
// child's pid), with files at fds 3.. and env added.
func startChild(t *testing.T, next string, argv []string, files []*os.File, env ...string) *child {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if argv == nil {
		argv = []string{self}
	}
	cmd := exec.Command(self, argv...)
	cmd.Env = append(os.Environ(), "COHORT_TEST_HELPER=shim", "COHORT_TEST_NEXT="+next, "GORACE=atexit_sleep_ms=0")
	cmd.Env = append(cmd.Env, env...)
	cmd.ExtraFiles = files
	c := &child{cmd: cmd, out: new(strings.Builder), done: make(chan struct{})}
	cmd.Stdout = &lockedWriter{w: c.out}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { // ends when the child exits
		c.exited = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-c.done:
		case <-time.After(childWait):
			// Wait also waits for the child's stdout to reach end of
			// file: a process the child started may still hold it.
			t.Errorf("child %d (%s) killed, but Wait did not return within %v", cmd.Process.Pid, next, childWait)
		}
	})
	return c
}

// childWait bounds every wait for a child process or for what it sends;
// generous, since starting one (python3 through a pyenv shim, say) takes
// seconds on a loaded machine.
const childWait = 30 * time.Second

// wait waits for the child to exit, at most d.
func (c *child) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case <-c.done:
		return c.exited
	case <-time.After(d):
		t.Fatalf("child %d did not exit within %v", c.cmd.Process.Pid, d)
		return nil
	}
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// notifySocket makes a NOTIFY_SOCKET and returns its address and a
// function that waits (at most childWait) for the next datagram.
func notifySocket(t *testing.T) (string, func() string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return path, func() string {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(childWait))
		b := make([]byte, 4096)
		n, err := c.Read(b)
		if err != nil {
			t.Fatalf("no sd_notify message: %v", err)
		}
		return string(b[:n])
	}
}

func get(t *testing.T, addr string) string {
	t.Helper()
	client := &http.Client{Timeout: childWait, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func listenerFile(t *testing.T) (*os.File, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, ln.Addr().String()
}
