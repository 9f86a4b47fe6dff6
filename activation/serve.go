package activation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// Serve runs srv on ln until ctx is done or the process receives SIGTERM
// or SIGINT (the signals cohort and systemd stop a worker with). It then
// sends STOPPING=1 and stops without dropping a request: it closes ln and
// turns keep-alives off, waits until every connection already accepted
// has been answered and closed, and then calls srv.Shutdown; after timeout
// it closes the remaining connections with srv.Close. (srv.Shutdown alone
// closes, unanswered, a connection accepted just before whose request it
// reads after the shutdown began; in a rolling restart, where the other
// workers keep accepting on the same socket, that is a failed request.)
// Serve listens for the signals only while it runs, and sets
// srv.ConnState, calling the hook that was there.
//
// It returns nil after a graceful shutdown (also when another goroutine
// shut srv down), the error of srv.Serve if serving failed, and an error
// wrapping context.DeadlineExceeded if the shutdown took longer than
// timeout. srv.Serve owns ln: it is closed in every case.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	conns := &connSet{m: map[net.Conn]struct{}{}, empty: make(chan struct{})}
	hook := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		conns.update(c, st)
		if hook != nil {
			hook(c, st)
		}
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	_ = Stopping()
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Stop accepting; Serve returns once its Accept fails, and every
	// connection it accepted is in conns by then.
	srv.SetKeepAlivesEnabled(false)
	ln.Close()
	<-served
	select {
	case <-conns.drained():
	case <-sctx.Done():
	}
	err := srv.Shutdown(sctx)
	if err != nil {
		srv.Close()
		err = fmt.Errorf("shutdown of server on %s after %v: %w", ln.Addr(), timeout, err)
	}
	return err
}

// connSet tracks a server's open connections through ConnState.
type connSet struct {
	mu    sync.Mutex
	m     map[net.Conn]struct{}
	empty chan struct{} // closed when m empties after drained was called
	wait  bool
}

func (s *connSet) update(c net.Conn, st http.ConnState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch st {
	case http.StateNew:
		s.m[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(s.m, c)
		if s.wait && len(s.m) == 0 {
			s.wait = false
			close(s.empty)
		}
	}
}

// drained returns a channel closed once no connection is open.
func (s *connSet) drained() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.m) == 0 {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	s.wait = true
	return s.empty
}
