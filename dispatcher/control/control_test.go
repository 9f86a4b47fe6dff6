package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain doubles as the helper process that talks to a control socket
// under another uid (the os/exec test pattern).
func TestMain(m *testing.M) {
	if role := os.Getenv("COHORT_CONTROL_TEST_ROLE"); role != "" {
		os.Exit(helper(role)) // limits_test.go
	}
	if path := os.Getenv("COHORT_CONTROL_TEST_DIAL"); path != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := Call(ctx, path, Request{Cmd: CmdStatus})
		fmt.Println(err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type fakeHandler struct {
	mu      sync.Mutex
	scaled  int
	restart int
	reload  func(ctx context.Context) error
}

func (f *fakeHandler) Status(ctx context.Context) (*Status, error) {
	return &Status{App: "web", Generation: 3, Workers: []Worker{{Index: 0, PID: 42, State: "ready"}}}, nil
}
func (f *fakeHandler) Reload(ctx context.Context) error {
	if f.reload != nil {
		return f.reload(ctx)
	}
	return nil
}
func (f *fakeHandler) Scale(ctx context.Context, n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.scaled = n
	return nil
}

// scaledTo is the last scale request carried out.
func (f *fakeHandler) scaledTo() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.scaled
}

func (f *fakeHandler) RestartWorker(ctx context.Context, i int) error {
	if i > 3 {
		return fmt.Errorf("no worker %d (there are 4)", i)
	}
	f.restart = i
	return nil
}

// serve starts a server on a fresh socket and stops it when the test ends.
func serve(t *testing.T, h Handler) *Server {
	t.Helper()
	s, err := Listen(filepath.Join(t.TempDir(), SocketName), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, h) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestRequests(t *testing.T) {
	h := &fakeHandler{}
	s := serve(t, h)
	st, err := os.Stat(s.Path())
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode = %v, %v; want 0600", st.Mode(), err)
	}
	rep, err := Call(ctx(t), s.Path(), Request{Cmd: CmdStatus})
	if err != nil || rep.Status == nil || rep.Status.Generation != 3 || rep.Status.Workers[0].PID != 42 {
		t.Fatalf("status = %+v, %v", rep, err)
	}
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdScale, Workers: 8}); err != nil || h.scaled != 8 {
		t.Errorf("scale: %v, scaled %d", err, h.scaled)
	}
	two, nine := 2, 9
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdRestartWorker, Worker: &two}); err != nil || h.restart != 2 {
		t.Errorf("restart-worker: %v", err)
	}
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdRestartWorker, Worker: &nine}); err == nil || err.Error() != "no worker 9 (there are 4)" {
		t.Errorf("restart-worker 9: %v", err)
	}
	h.reload = func(ctx context.Context) error {
		return errors.New("worker 1 of generation 2 exited with status 1 before it was ready")
	}
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdReload}); err == nil || !strings.Contains(err.Error(), "before it was ready") {
		t.Errorf("failed reload reported as %v", err)
	}
}

// TestGarbage sends what a broken or hostile client might: every line gets
// an error reply, the connection stays usable where it can, and the server
// keeps serving.
func TestGarbage(t *testing.T) {
	s := serve(t, &fakeHandler{})
	conn, err := net.Dial("unix", s.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	for _, tt := range []struct{ send, want string }{
		{"not json\n", "malformed request"},
		{"{}\n", `request has no`},
		{`{"cmd":"explode"}` + "\n", `unknown command`},
		{`{"cmd":"scale","workers":0}` + "\n", "scale: workers must be 1..1024"},
		{`{"cmd":"restart-worker"}` + "\n", "restart-worker: needs"},
		{`{"cmd":"status","workers":"x"}` + "\n", "malformed request"},
		{"\x00\xff\xfe\n", "malformed request"},
		{`{"cmd":"status"}` + "\n", `"ok":true`},
	} {
		if _, err := conn.Write([]byte(tt.send)); err != nil {
			t.Fatal(err)
		}
		line, err := r.ReadString('\n')
		if err != nil || !strings.Contains(line, tt.want) {
			t.Errorf("sent %q: got %q, %v; want %q", tt.send, line, err, tt.want)
		}
	}
	// An oversized line: an error reply, then the server hangs up.
	if _, err := conn.Write([]byte(strings.Repeat("x", 2*MaxRequest) + "\n")); err != nil {
		t.Fatal(err)
	}
	if line, _ := r.ReadString('\n'); !strings.Contains(line, "request longer than") {
		t.Errorf("oversized request: got %q", line)
	}
	// The server still answers others.
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdStatus}); err != nil {
		t.Errorf("after garbage: %v", err)
	}
}

// TestWrongUID connects as another user to a socket whose file mode would
// let it in: the peer-credential check must still refuse it.
func TestWrongUID(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("this test runs a client as uid 65534 and needs root (make test runs as root in CI)")
	}
	// t.TempDir's parent is private; uid 65534 must reach this one.
	dir, err := os.MkdirTemp("", "cohort-control-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := Listen(filepath.Join(dir, SocketName), nil)
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(c, &fakeHandler{}) }()
	defer func() { cancel(); <-done }()
	if err := os.Chmod(s.Path(), 0o666); err != nil {
		t.Fatal(err)
	}
	// The test binary's own directory is private: run a copy from dir.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(dir, "helper")
	if err := os.WriteFile(helper, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(helper, "-test.run=^$")
	cmd.Env = append(os.Environ(), "COHORT_CONTROL_TEST_DIAL="+s.Path())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "permission denied: the control socket is for root") {
		t.Errorf("uid 65534 got: %s", out)
	}
	if s.Refused() != 1 {
		t.Errorf("refused = %d, want 1", s.Refused())
	}
	if _, err := Call(ctx(t), s.Path(), Request{Cmd: CmdStatus}); err != nil {
		t.Errorf("root refused: %v", err)
	}
}

// TestStopDuringReload: stopping the server ends a long request instead of
// waiting for it.
func TestStopDuringReload(t *testing.T) {
	started := make(chan struct{})
	h := &fakeHandler{reload: func(ctx context.Context) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}}
	s, err := Listen(filepath.Join(t.TempDir(), SocketName), nil)
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(c, h) }()
	callErr := make(chan error, 1)
	go func() {
		_, err := Call(ctx(t), s.Path(), Request{Cmd: CmdReload})
		callErr <- err
	}()
	<-started
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if err := <-callErr; err == nil {
		t.Error("the interrupted reload reported success")
	}
	if _, err := os.Stat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file left behind: %v", err)
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{`{"cmd":"status"}`, `{"cmd":"scale","workers":4}`, `{"cmd":"restart-worker","worker":1}`, `{`, `[]`, `{"cmd":"reload","x":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := ParseRequest(line)
		if err != nil {
			return
		}
		if req.ChangesState() != (req.Cmd != CmdStatus) {
			t.Fatalf("%q: ChangesState = %v", req.Cmd, req.ChangesState())
		}
		switch req.Cmd {
		case CmdStatus, CmdReload:
		case CmdScale:
			if req.Workers < 1 || req.Workers > 1024 {
				t.Fatalf("accepted scale %d", req.Workers)
			}
		case CmdRestartWorker:
			if req.Worker == nil || *req.Worker < 0 {
				t.Fatalf("accepted restart-worker %v", req.Worker)
			}
		default:
			t.Fatalf("accepted command %q", req.Cmd)
		}
	})
}

func (f *fakeHandler) Signal(ctx context.Context, sig syscall.Signal, worker *int) ([]int, error) {
	return []int{42}, nil
}
