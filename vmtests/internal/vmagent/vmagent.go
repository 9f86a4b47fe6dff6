// Package vmagent is how the vmtests harness runs commands inside a QEMU
// guest: a small server (the agent, started by a unit in the guest) and
// its client on the host, one TCP connection per command.
//
// The protocol is one JSON request from the client (a shared token, the
// argv and the environment), then one JSON response from the agent (exit
// status, stdout, stderr). While the command runs, the agent watches the
// connection: when the client closes it (its context ended), the agent
// kills the command's process group, so a host-side timeout ends the
// command in the guest too. Everything read is bounded: the request's
// size, the time to send it, the output kept, the number of commands at
// once and how long one may run.
//
// The agent is reached through QEMU's user-mode network forward on the
// host's 127.0.0.1 only; the token (a random file only root can read on
// the host, passed to the guest through the read-only share) keeps other
// local users from running commands in the guest.
package vmagent

import (
	"bufio"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Limits of the protocol.
const (
	MaxRequest   = 1 << 20  // bytes of one request
	MaxOutput    = 16 << 20 // bytes kept of stdout and of stderr each
	maxResponse  = 3*MaxOutput + 1<<20
	MaxArgs      = 4096 // argv and env entries each
	RequestTime  = 10 * time.Second
	MaxRunTime   = 15 * time.Minute // a command still running then is killed
	MaxParallel  = 32               // commands at once; more connections wait
	killWaitTime = 5 * time.Second  // after the kill, for pipes a grandchild holds
)

// Request is what the client sends: the token and what to run.
type Request struct {
	Token string   `json:"token"`
	Args  []string `json:"args"`
	Env   []string `json:"env"`
}

// Response is what the agent answers.
type Response struct {
	Code      int    `json:"code"`   // exit status; -1 when killed by a signal
	Stdout    []byte `json:"stdout"` // at most MaxOutput bytes
	Stderr    []byte `json:"stderr"`
	Truncated bool   `json:"truncated,omitempty"` // output beyond MaxOutput was dropped
	Error     string `json:"error,omitempty"`     // why the command did not run to its end
}

// ErrAgent wraps what the agent says when the command did not run to its
// end on its own: a refused request (bad token, malformed), a command
// that could not start, or one the agent killed (MaxRunTime).
var ErrAgent = errors.New("agent")

// validate checks a request's shape before anything runs.
func (r *Request) validate(token string) error {
	if token == "" || subtle.ConstantTimeCompare([]byte(r.Token), []byte(token)) != 1 {
		return errors.New("bad token")
	}
	if len(r.Args) == 0 || r.Args[0] == "" {
		return errors.New("no command")
	}
	if len(r.Args) > MaxArgs || len(r.Env) > MaxArgs {
		return fmt.Errorf("more than %d arguments or environment entries", MaxArgs)
	}
	for _, s := range append(append([]string(nil), r.Args...), r.Env...) {
		for i := 0; i < len(s); i++ {
			if s[i] == 0 {
				return errors.New("NUL byte in an argument or environment entry")
			}
		}
	}
	return nil
}

// readRequest reads one bounded request from r.
func readRequest(r io.Reader) (Request, error) {
	var req Request
	lr := &io.LimitedReader{R: r, N: MaxRequest + 1}
	dec := json.NewDecoder(lr)
	if err := dec.Decode(&req); err != nil {
		if lr.N <= 0 {
			return Request{}, fmt.Errorf("request larger than %d bytes", MaxRequest)
		}
		return Request{}, fmt.Errorf("read request: %w", err)
	}
	return req, nil
}

// Server is the agent: it runs the commands of clients that know Token.
type Server struct {
	Token string
	Logf  func(format string, args ...any) // nil: no log
	// RequestTime bounds how long a client may take to send its request;
	// 0 means RequestTime.
	RequestTime time.Duration
}

// Serve accepts connections on l until ctx is done or l fails, each
// served in a goroutine of its own that ends with its command; it
// returns after all of them have ended.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	slots := make(chan struct{}, MaxParallel)
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			conn.Close()
			return nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			defer conn.Close()
			s.serveConn(ctx, conn)
		}()
	}
}

func (s *Server) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

// serveConn runs the one command conn asks for and answers.
func (s *Server) serveConn(ctx context.Context, conn net.Conn) {
	limit := s.RequestTime
	if limit <= 0 {
		limit = RequestTime
	}
	_ = conn.SetReadDeadline(time.Now().Add(limit))
	br := bufio.NewReader(conn)
	req, err := readRequest(br)
	if err == nil {
		err = req.validate(s.Token)
	}
	if err != nil {
		s.logf("refused %v: %v", conn.RemoteAddr(), err)
		s.answer(conn, Response{Code: -1, Error: err.Error()})
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	ctx, cancel := context.WithTimeout(ctx, MaxRunTime)
	defer cancel()
	// The client sends nothing more: any read that returns means it
	// closed the connection (or sent garbage), and the command ends.
	go func() {
		_, _ = br.ReadByte()
		cancel()
	}()
	s.answer(conn, run(ctx, req))
}

func (s *Server) answer(conn net.Conn, resp Response) {
	_ = conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := json.NewEncoder(conn).Encode(resp); err != nil {
		s.logf("answer %v: %v", conn.RemoteAddr(), err)
	}
}

// run runs req in a process group of its own, killed whole when ctx ends.
func run(ctx context.Context, req Request) Response {
	cmd := exec.CommandContext(ctx, req.Args[0], req.Args[1:]...)
	cmd.Env = req.Env
	var stdout, stderr capped
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = killWaitTime
	err := cmd.Run()
	resp := Response{Stdout: stdout.buf, Stderr: stderr.buf, Truncated: stdout.dropped || stderr.dropped}
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		resp.Code = -1
		resp.Error = fmt.Sprintf("command ended: %v", ctx.Err())
	case errors.As(err, &exit):
		resp.Code = exit.ExitCode()
	case err != nil:
		resp.Code = -1
		resp.Error = err.Error()
	}
	return resp
}

// capped keeps the first MaxOutput bytes written to it.
type capped struct {
	buf     []byte
	dropped bool
}

func (c *capped) Write(p []byte) (int, error) {
	room := MaxOutput - len(c.buf)
	if len(p) > room {
		c.dropped = true
		c.buf = append(c.buf, p[:max(room, 0)]...)
		return len(p), nil
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// Call runs req through the agent at addr and returns its answer. A
// refused, unrunnable or killed request is an error wrapping ErrAgent; a command
// that ran and failed is not an error (see Response.Code). When ctx ends,
// the connection is closed, which kills the command in the guest.
func Call(ctx context.Context, addr string, req Request) (Response, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return Response{}, fmt.Errorf("connect to agent: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return Response{}, fmt.Errorf("encode request: %w", err)
	}
	if len(b) > MaxRequest {
		return Response{}, fmt.Errorf("request of %d bytes is larger than %d", len(b), MaxRequest)
	}
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return Response{}, ctxErr(ctx, fmt.Errorf("send request: %w", err))
	}
	var resp Response
	lr := &io.LimitedReader{R: conn, N: maxResponse}
	if err := json.NewDecoder(lr).Decode(&resp); err != nil {
		if lr.N <= 0 {
			return Response{}, fmt.Errorf("agent answer larger than %d bytes", maxResponse)
		}
		return Response{}, ctxErr(ctx, fmt.Errorf("read answer: %w", err))
	}
	if resp.Error != "" {
		return resp, fmt.Errorf("%w: %s", ErrAgent, resp.Error)
	}
	return resp, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return err
}

// ReadToken reads the token file the host wrote, bounded.
func ReadToken(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read token: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4097))
	if err != nil {
		return "", fmt.Errorf("read token: %w", err)
	}
	if len(b) < 16 || len(b) > 4096 {
		return "", fmt.Errorf("read token %s: %d bytes, want 16 to 4096", path, len(b))
	}
	return string(b), nil
}
