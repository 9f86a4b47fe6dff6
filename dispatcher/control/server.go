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

	"golang.org/x/sys/unix"
)

// maxConns bounds concurrent control connections, so a client that opens
// many cannot make the dispatcher spend memory without end.
const maxConns = 16

// Server is a listening control socket.
type Server struct {
	ln      *net.UnixListener
	path    string
	allowed func(uid uint32) bool
	refused atomic.Int64
}

// Listen creates the control socket at path with mode 0600, replacing a
// stale socket file left by an earlier dispatcher. allowed decides which
// peer uids may talk to it; nil means root and this process's own uid. The
// caller closes the Server, which removes the socket file.
func Listen(path string, allowed func(uid uint32) bool) (*Server, error) {
	if allowed == nil {
		self := uint32(os.Getuid())
		allowed = func(uid uint32) bool { return uid == 0 || uid == self }
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale control socket: %w", err)
	}
	// Not umask: it is per process, and every child forked and every file
	// created by another goroutine meanwhile would get 0177 too. Until the
	// chmod the mode is what the umask allows (others need write access to
	// connect), and serveConn refuses peers that are not allowed anyway.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on control socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod control socket: %w", err)
	}
	return &Server{ln: ln, path: path, allowed: allowed}, nil
}

// Path is the socket file's path.
func (s *Server) Path() string { return s.path }

// Refused counts connections refused for their peer's uid.
func (s *Server) Refused() int64 { return s.refused.Load() }

// Close stops listening and removes the socket file. Serve returns soon
// after.
func (s *Server) Close() error { return s.ln.Close() }

// Serve answers connections until ctx is done or the server is closed, then
// waits for the connections it is serving to end (ctx cancels a handler's
// long request, such as a reload). It returns nil on a clean stop.
func (s *Server) Serve(ctx context.Context, h Handler) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		<-ctx.Done()
		s.ln.Close()
	}()
	slots := make(chan struct{}, maxConns)
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept on control socket: %w", err)
		}
		select {
		case slots <- struct{}{}:
		default:
			reply(conn, Reply{Error: "too many control connections"})
			conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			s.serveConn(ctx, conn, h)
		}()
	}
}

func (s *Server) serveConn(ctx context.Context, conn *net.UnixConn, h Handler) {
	defer conn.Close()
	// A handler may run long (a reload): close the connection when the
	// server stops so a blocked read returns.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	uid, err := peerUID(conn)
	if err != nil || !s.allowed(uid) {
		s.refused.Add(1)
		reply(conn, Reply{Error: "permission denied: the control socket is for root and the service's user"})
		return
	}
	r := bufio.NewReaderSize(conn, MaxRequest)
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			reply(conn, Reply{Error: fmt.Sprintf("request longer than %d bytes", MaxRequest)})
			return // the rest of the line cannot be told from a next request
		}
		if err != nil {
			return // EOF or closed: the client is done
		}
		req, err := ParseRequest(line[:len(line)-1])
		if err != nil {
			if !reply(conn, Reply{Error: err.Error()}) {
				return
			}
			continue
		}
		if !reply(conn, handle(ctx, h, req)) {
			return
		}
	}
}

func handle(ctx context.Context, h Handler, req Request) Reply {
	var err error
	var st *Status
	switch req.Cmd {
	case CmdStatus:
		st, err = h.Status(ctx)
	case CmdReload:
		err = h.Reload(ctx)
	case CmdScale:
		err = h.Scale(ctx, req.Workers)
	case CmdRestartWorker:
		err = h.RestartWorker(ctx, *req.Worker)
	}
	if err != nil {
		return Reply{Error: err.Error()}
	}
	return Reply{OK: true, Status: st}
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

// peerUID reads the connecting process's uid from the kernel.
func peerUID(conn *net.UnixConn) (uint32, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return cred.Uid, nil
}
