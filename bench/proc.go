package bench

import (
	"bytes"
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
	"time"
)

// proc is one process the harness started, in a process group of its own
// (Setpgid), so that stopping it also stops every worker it forked.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when Wait returned
	err  error         // Wait's error, valid after done
}

// procs tracks every process and extra cleanup of a run, so that one call
// stops all of them: at the end of a row, on failure and on Ctrl-C.
type procs struct {
	mu       sync.Mutex
	list     []*proc
	cleanups []func()
	extra    []int // roots the harness did not start (PM2's daemon)
	logDir   string
}

// addRoot tracks a process the harness did not start, for CPU accounting
// and for killing its descendants that outlive it.
func (ps *procs) addRoot(pid int) {
	ps.mu.Lock()
	ps.extra = append(ps.extra, pid)
	ps.mu.Unlock()
}

// roots are the harness itself and every process it tracks.
func (ps *procs) roots() []int {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := append([]int{os.Getpid()}, ps.extra...)
	for _, p := range ps.list {
		out = append(out, p.cmd.Process.Pid)
	}
	return out
}

// start runs argv with env added to the harness's environment, output to a
// log file named after name. The returned proc is stopped by stopAll.
func (ps *procs) start(name string, argv, env []string, dir string) (*proc, error) {
	if err := os.MkdirAll(ps.logDir, 0o755); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	logPath := filepath.Join(ps.logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer f.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", name, argv[0], err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { // owned by p: stop waits for done
		p.err = cmd.Wait()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

// onStop registers f to run in stopAll (after the processes were stopped),
// for processes the harness did not start itself, like PM2's daemon.
func (ps *procs) onStop(f func()) {
	ps.mu.Lock()
	ps.cleanups = append(ps.cleanups, f)
	ps.mu.Unlock()
}

// stopAll stops every tracked process group (SIGTERM, then SIGKILL after
// grace) and runs the cleanups, in reverse order of registration.
func (ps *procs) stopAll(grace time.Duration) {
	ps.mu.Lock()
	list, cleanups := ps.list, ps.cleanups
	ps.list, ps.cleanups, ps.extra = nil, nil, nil
	ps.mu.Unlock()
	for i := len(list) - 1; i >= 0; i-- {
		list[i].stop(grace)
	}
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
}

// stop signals p's process group with SIGTERM, waits up to grace for p to
// exit, then kills what is left of the group, and then every descendant
// of p seen before the stop that is still alive (a supervisor may put its
// workers in process groups of their own), each by its pid.
func (p *proc) stop(grace time.Duration) {
	pid := p.cmd.Process.Pid
	below := descendants(allProcs(), pid)
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	<-p.done
	killSurvivors(below, grace)
}

// killSurvivors waits up to grace for the processes of a snapshot to exit
// and kills the ones that did not, by pid, if the pid still names the same
// process (same start time).
func killSurvivors(snapshot map[int]pstat, grace time.Duration) {
	deadline := time.Now().Add(grace)
	for {
		alive := 0
		for pid, st := range snapshot {
			if now, ok := readProc(pid); ok && now.start == st.start {
				alive++
				if time.Now().After(deadline) {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		if alive == 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// exited reports whether p has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// tail returns the last non-empty lines of p's log, for error messages.
func (p *proc) tail(n int) string {
	return logTail(p.log, n)
}

func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	var lines []string
	for _, l := range strings.Split(string(bytes.TrimSpace(b)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}

// probe sends one GET with "Connection: close" and returns the body
// (trailing newline trimmed) of a 200 response.
func probe(addr string, timeout time.Duration) (string, error) {
	c := &client{load: &Load{Addr: addr, Timeout: timeout}}
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", addr, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return "", fmt.Errorf("probe %s: %w", addr, err)
	}
	c.conn = conn
	c.br = newReader(conn)
	status, _, err := c.readResponse()
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", addr, err)
	}
	if status != 200 {
		return "", fmt.Errorf("probe %s: status %d", addr, status)
	}
	return string(c.body), nil
}

// errExited is returned by waitReady when the process under test exited.
var errExited = errors.New("exited")

// waitReady waits until addr answers, failing early when alive reports an
// error, then for up to spreadWait until workers distinct workers have
// answered (not fatal: a shared accept queue may favour one worker). It
// returns the workers seen.
func waitReady(ctx context.Context, addr string, alive func() error, workers int, timeout, spreadWait time.Duration) (map[string]bool, error) {
	deadline := time.Now().Add(timeout)
	seen := map[string]bool{}
	var last error
	for {
		if err := alive(); err != nil {
			return nil, err
		}
		body, err := probe(addr, time.Second)
		if err == nil {
			seen[body] = true
			break
		}
		last = err
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("not ready after %v: %w", timeout, last)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	deadline = time.Now().Add(spreadWait)
	for len(seen) < workers && time.Now().Before(deadline) && ctx.Err() == nil {
		if body, err := probe(addr, time.Second); err == nil {
			seen[body] = true
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return seen, ctx.Err()
}
