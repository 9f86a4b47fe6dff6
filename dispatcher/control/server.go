package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Connection bounds. Workers share the service's uid, so the limits are by
// process: a peer in a worker's process tree draws from a small pool of
// its own, so workers together cannot take the operator's slots; any one
// process (or worker tree) holds at most maxPerPeer; and root has a few
// slots that others cannot take. In all, at most maxOperatorConns +
// rootReserve + maxWorkerConns connections are served at once.
const (
	maxOperatorConns = 16 // peers outside the worker trees, together
	rootReserve      = 4  // on top of those, for root only
	maxWorkerConns   = 4  // every worker tree together
	maxPerPeer       = 4  // one process; for workers, one worker's tree
)

// DefaultIdle is how long a connection may sit without sending a complete
// request (after connecting, or after its last reply) before the server
// hangs up, and how long a reply may take to be read.
const DefaultIdle = 5 * time.Second

// Config says who may use a Server and how. The zero value (or a nil
// *Config) admits root and this process's uid, treats this process's
// descendants as workers, and uses DefaultIdle.
type Config struct {
	// Allowed decides which peer uids may connect at all; nil admits root
	// and this process's own uid.
	Allowed func(uid uint32) bool
	// Supervisor is the pid whose descendants are workers (0: this
	// process). A peer in its process tree may run read-only commands
	// (status) only.
	Supervisor int
	// Idle replaces DefaultIdle when positive.
	Idle time.Duration
	// Logf, when set, is told about refused and dropped peers (a few
	// lines, not one per connection of a flood).
	Logf func(format string, args ...any)
}

// Server is a listening control socket.
type Server struct {
	ln         *net.UnixListener
	path       string
	allowed    func(uid uint32) bool
	supervisor int
	self       uint32
	idle       time.Duration
	logf       func(format string, args ...any)
	refused    atomic.Int64 // wrong uid
	denied     atomic.Int64 // state-changing command from a worker tree
	dropped    atomic.Int64 // idle, or no slot free

	mu    sync.Mutex
	conns struct{ operators, workers int }
	per   map[peerKey]int
}

type peerKey struct {
	worker bool
	id     int
}

// Listen creates the control socket at path with mode 0600, replacing a
// stale socket file left by an earlier dispatcher. cfg may be nil (see
// Config). The caller closes the Server, which removes the socket file.
func Listen(path string, cfg *Config) (*Server, error) {
	if cfg == nil {
		cfg = &Config{}
	}
	s := &Server{path: path, allowed: cfg.Allowed, supervisor: cfg.Supervisor, self: uint32(os.Getuid()),
		idle: cfg.Idle, logf: cfg.Logf, per: map[peerKey]int{}}
	if s.allowed == nil {
		self := s.self
		s.allowed = func(uid uint32) bool { return uid == 0 || uid == self }
	}
	if s.supervisor == 0 {
		s.supervisor = os.Getpid()
	}
	if s.idle <= 0 {
		s.idle = DefaultIdle
	}
	if s.logf == nil {
		s.logf = func(string, ...any) {}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale control socket: %w", err)
	}
	// Not umask: it is per process, and every child forked and every file
	// created by another goroutine meanwhile would get 0177 too. Until the
	// chmod the mode is what the umask allows (others need write access to
	// connect), and Serve refuses peers that are not allowed anyway.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on control socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod control socket: %w", err)
	}
	s.ln = ln
	return s, nil
}

// Path is the socket file's path.
func (s *Server) Path() string { return s.path }

// Refused counts connections refused for their peer's uid.
func (s *Server) Refused() int64 { return s.refused.Load() }

// Denied counts state-changing requests refused because they came from a
// worker's process tree.
func (s *Server) Denied() int64 { return s.denied.Load() }

// Dropped counts connections closed because they were idle or because
// their peer had no connection slot left.
func (s *Server) Dropped() int64 { return s.dropped.Load() }

// Close stops listening and removes the socket file. Serve returns soon
// after.
func (s *Server) Close() error { return s.ln.Close() }

// Serve answers connections until ctx is done or the server is closed, then
// waits for the connections it is serving to end (ctx cancels a handler's
// long request, such as a reload). It returns nil on a clean stop.
//
// Who the peer is gets settled once, on accept, from the kernel's record
// of the process that connected (see identify); a connection passed on to
// another process keeps its connector's rights.
func (s *Server) Serve(ctx context.Context, h Handler) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		<-ctx.Done()
		s.ln.Close()
	}()
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
				// Out of fds: wait for some to close instead of spinning.
				select {
				case <-time.After(100 * time.Millisecond):
				case <-ctx.Done():
				}
				continue
			}
			return fmt.Errorf("accept on control socket: %w", err)
		}
		p, err := identify(conn, s.supervisor, s.self)
		if err != nil || !s.allowed(p.uid) {
			n := s.refused.Add(1)
			s.note(n, "control socket: refused pid %d, uid %d (%d so far)", p.pid, p.uid, n)
			s.hangUp(conn, "permission denied: the control socket is for root and the service's user")
			continue
		}
		if full := s.acquire(p); full != "" {
			n := s.dropped.Add(1)
			s.note(n, "control socket: no connection slot for pid %d: %s (%d dropped so far)", p.pid, full, n)
			s.hangUp(conn, "too many control connections: "+full)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.release(p)
			s.serveConn(ctx, conn, p, h)
		}()
	}
}

// note logs the 1st, 2nd, 4th, 8th… occurrence of something a flood may
// repeat.
func (s *Server) note(n int64, format string, args ...any) {
	if n&(n-1) == 0 {
		s.logf(format, args...)
	}
}

// hangUp answers a connection it will not serve and closes it, without
// letting a peer that does not read hold up the accept loop.
func (s *Server) hangUp(conn *net.UnixConn, msg string) {
	conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	reply(conn, Reply{Error: msg})
	conn.Close()
}

// acquire takes a connection slot for p, or says which bound p would
// exceed.
func (s *Server) acquire(p peer) (full string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := peerKey{p.worker, p.key}
	if s.per[k] >= maxPerPeer {
		if p.worker && p.key != p.pid {
			return fmt.Sprintf("the process tree of worker pid %d holds %d", p.key, maxPerPeer)
		}
		return fmt.Sprintf("pid %d holds %d", p.pid, maxPerPeer)
	}
	switch {
	case p.worker:
		if s.conns.workers >= maxWorkerConns {
			return fmt.Sprintf("the workers' processes hold %d, all they may (pid %d is one: %s)", maxWorkerConns, p.pid, p.why)
		}
		s.conns.workers++
	default:
		if s.conns.operators >= maxOperatorConns && !(p.uid == 0 && s.conns.operators < maxOperatorConns+rootReserve) {
			return fmt.Sprintf("%d are open", s.conns.operators)
		}
		s.conns.operators++
	}
	s.per[k]++
	return ""
}

func (s *Server) release(p peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := peerKey{p.worker, p.key}
	if s.per[k]--; s.per[k] <= 0 {
		delete(s.per, k)
	}
	if p.worker {
		s.conns.workers--
	} else {
		s.conns.operators--
	}
}

func (s *Server) serveConn(ctx context.Context, conn *net.UnixConn, p peer, h Handler) {
	defer conn.Close()
	// A handler may run long (a reload): close the connection when the
	// server stops so a blocked read returns.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	r := bufio.NewReaderSize(conn, MaxRequest)
	for {
		// The deadline covers waiting for the whole line, so a peer that
		// trickles a byte at a time is dropped too. It does not run while
		// a request is being carried out: a reload takes what it takes.
		conn.SetReadDeadline(time.Now().Add(s.idle))
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.send(conn, Reply{Error: fmt.Sprintf("request longer than %d bytes", MaxRequest)})
			return // the rest of the line cannot be told from a next request
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			n := s.dropped.Add(1)
			s.note(n, "control socket: pid %d sent no complete request within %s; closed (%d dropped so far)", p.pid, s.idle, n)
			s.send(conn, Reply{Error: fmt.Sprintf("no complete request within %s; closing", s.idle)})
			return
		}
		if err != nil {
			return // EOF or closed: the client is done
		}
		req, err := ParseRequest(line[:len(line)-1])
		if err != nil {
			if !s.send(conn, Reply{Error: err.Error()}) {
				return
			}
			continue
		}
		var rep Reply
		if p.worker && req.ChangesState() {
			n := s.denied.Add(1)
			s.note(n, "control socket: refused %q from pid %d: %s (%d refused so far)", req.Cmd, p.pid, p.why, n)
			rep = Reply{Error: fmt.Sprintf("permission denied: %q changes the dispatcher's state; pid %d may only ask for status (%s)", req.Cmd, p.pid, p.why)}
		} else {
			rep = handle(ctx, h, req)
		}
		if !s.send(conn, rep) {
			return
		}
	}
}

// send writes a reply within the idle bound: a peer that does not read its
// replies loses its connection rather than holding a slot.
func (s *Server) send(conn *net.UnixConn, rep Reply) bool {
	conn.SetWriteDeadline(time.Now().Add(s.idle))
	return reply(conn, rep)
}

func handle(ctx context.Context, h Handler, req Request) Reply {
	var err error
	var st *Status
	var pids []int
	switch req.Cmd {
	case CmdStatus:
		st, err = h.Status(ctx)
	case CmdReload:
		err = h.Reload(ctx)
	case CmdScale:
		err = h.Scale(ctx, req.Workers)
	case CmdRestartWorker:
		err = h.RestartWorker(ctx, *req.Worker)
	case CmdSignal:
		sig, _ := SignalByName(req.Signal) // ParseRequest checked it
		pids, err = h.Signal(ctx, sig, req.Worker)
	}
	if err != nil {
		return Reply{Error: err.Error()}
	}
	return Reply{OK: true, Status: st, PIDs: pids}
}

// reply writes one reply line and reports whether that worked.
func reply(conn net.Conn, rep Reply) bool {
	b, err := json.Marshal(rep)
	if err != nil {
		b = []byte(`{"ok":false,"error":"internal error encoding the reply"}`)
	}
	_, err = conn.Write(append(b, '\n'))
	return err == nil
}
