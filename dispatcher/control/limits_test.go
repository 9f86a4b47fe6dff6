package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helper is the test binary run as a peer of the control socket at
// $COHORT_CONTROL_TEST_SOCK (see TestMain):
//
//	hog    open $HOG_N connections, print "held K" (K answered a status
//	       request), then keep them busy with a status request a second
//	       until stdin closes
//	try    wait for the socket, try scale and status, print each result
//	spawn  run a "try" child, wait for it (a stand-in supervisor)
//	connector, holder  connect, pass the connection to a child and exit;
//	       the child sends scale on "go" from stdin and prints the reply
//	sleep  wait until stdin closes
func helper(role string) int {
	sock := os.Getenv("COHORT_CONTROL_TEST_SOCK")
	stdinClosed := make(chan struct{})
	if role == "hog" || role == "sleep" {
		go func() {
			io.Copy(io.Discard, os.Stdin)
			close(stdinClosed)
		}()
	}
	switch role {
	case "hog":
		n, _ := strconv.Atoi(os.Getenv("HOG_N"))
		var held []*bufio.ReadWriter
		for range n {
			c, err := net.Dial("unix", sock)
			if err != nil {
				continue
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			rw := bufio.NewReadWriter(bufio.NewReader(c), bufio.NewWriter(c))
			if hogStatus(rw) {
				held = append(held, rw)
			}
		}
		fmt.Printf("held %d\n", len(held))
		for {
			select {
			case <-stdinClosed:
				return 0
			case <-time.After(time.Second):
			}
			for _, rw := range held {
				hogStatus(rw)
			}
		}
	case "try":
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(sock); err == nil {
				break
			}
		}
		for _, req := range []Request{{Cmd: CmdScale, Workers: 2}, {Cmd: CmdStatus}} {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := Call(ctx, sock, req)
			cancel()
			fmt.Printf("%s: %v\n", req.Cmd, err)
		}
		return 0
	case "spawn":
		self, _ := os.Executable()
		cmd := exec.Command(self, "-test.run=^$")
		cmd.Env = append(os.Environ(), "COHORT_CONTROL_TEST_ROLE=try")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Println(err)
		}
		return 0
	case "connector":
		// Connect, hand the connection to a child, and exit: the child
		// talks on a connection whose connecting process is gone.
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Println(err)
			return 1
		}
		f, _ := c.(*net.UnixConn).File()
		self, _ := os.Executable()
		cmd := exec.Command(self, "-test.run=^$")
		cmd.Env = append(os.Environ(), "COHORT_CONTROL_TEST_ROLE=holder")
		cmd.Stdin, cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = os.Stdin, os.Stdout, os.Stderr, []*os.File{f}
		if err := cmd.Start(); err != nil {
			fmt.Println(err)
			return 1
		}
		fmt.Println("connected")
		return 0
	case "holder":
		c, err := net.FileConn(os.NewFile(3, "control"))
		if err != nil {
			fmt.Println(err)
			return 1
		}
		bufio.NewReader(os.Stdin).ReadString('\n') // "go"
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte(`{"cmd":"scale","workers":2}` + "\n"))
		line, err := bufio.NewReader(c).ReadString('\n')
		fmt.Printf("%s %v\n", strings.TrimSpace(line), err)
		return 0
	case "sleep":
		<-stdinClosed
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown role %q\n", role)
	return 2
}

// hogStatus sends one status request and reports whether it was answered.
func hogStatus(rw *bufio.ReadWriter) bool {
	rw.WriteString(`{"cmd":"status"}` + "\n")
	if rw.Flush() != nil {
		return false
	}
	line, err := rw.ReadString('\n')
	return err == nil && strings.Contains(line, `"ok":true`)
}

// peerProc is a helper process; stop ends it (by closing its stdin, then
// by its pid) and waits for it.
type peerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

func startHelper(t *testing.T, bin, role, sock string, attr *syscall.SysProcAttr, env ...string) *peerProc {
	t.Helper()
	if bin == "" {
		var err error
		if bin, err = os.Executable(); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, "COHORT_CONTROL_TEST_ROLE="+role, "COHORT_CONTROL_TEST_SOCK="+sock)...)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &peerProc{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(p.stop)
	return p
}

func (p *peerProc) stop() {
	if p.cmd.ProcessState != nil {
		return
	}
	p.stdin.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, p.out)
		p.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

// line reads one line of the helper's output, within 20s.
func (p *peerProc) line(t *testing.T) string {
	t.Helper()
	got := make(chan string, 1)
	go func() {
		l, _ := p.out.ReadString('\n')
		got <- l
	}()
	select {
	case l := <-got:
		return strings.TrimSpace(l)
	case <-time.After(20 * time.Second):
		t.Fatal("no line from the helper within 20s")
		return ""
	}
}

// TestHogDoesNotLockOutOperator (issue 14 item 6): a worker that opens
// and keeps busy far more connections than there are slots leaves the
// operator able to ask for status, scale and reload.
func TestHogDoesNotLockOutOperator(t *testing.T) {
	h := &fakeHandler{}
	s := serve(t, h)
	hog := startHelper(t, "", "hog", s.Path(), nil, "HOG_N=64")
	held := hog.line(t)
	t.Logf("the hog (a child of the dispatcher, i.e. a worker): %s of 64", held)
	for _, req := range []Request{{Cmd: CmdStatus}, {Cmd: CmdScale, Workers: 5}, {Cmd: CmdReload}} {
		if _, err := Call(ctx(t), s.Path(), req); err != nil {
			t.Errorf("operator's %s while a worker holds %s connections: %v", req.Cmd, held, err)
		}
	}
}

// TestIdleConnectionDropped (issue 14 item 6): a peer that connects and
// sends nothing, half a line, or a line one byte at a time, is hung up on
// after the idle bound instead of holding its slot forever.
func TestIdleConnectionDropped(t *testing.T) {
	s := serve(t, &fakeHandler{})
	for _, tt := range []struct {
		name  string
		sends func(c net.Conn)
	}{
		{"nothing", func(net.Conn) {}},
		{"half a line", func(c net.Conn) { c.Write([]byte(`{"cmd":`)) }},
		{"trickle", func(c net.Conn) {
			for range 40 {
				if _, err := c.Write([]byte(" ")); err != nil {
					return
				}
				time.Sleep(250 * time.Millisecond)
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := net.Dial("unix", s.Path())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			start := time.Now()
			go tt.sends(c)
			c.SetReadDeadline(start.Add(15 * time.Second))
			b, err := io.ReadAll(c)
			// Closing with the trickle's bytes unread resets the
			// connection: closed all the same.
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("still open after %s (%v); got %q", time.Since(start).Round(time.Millisecond), err, b)
			}
			t.Logf("closed after %s with %q", time.Since(start).Round(time.Millisecond), b)
		})
	}
}

// otherUIDBinary copies the test binary to a directory uid 65534 can
// reach (the test binary's own is private) and returns that directory and
// the copy.
func otherUIDBinary(t *testing.T) (dir, bin string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("this test runs a client as uid 65534 and needs root (make test runs as root in CI)")
	}
	dir, err := os.MkdirTemp("", "cohort-control-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin = filepath.Join(dir, "helper")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir, bin
}
