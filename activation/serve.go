package activation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/signal"
	"syscall"
	"time"
)

// Serve runs srv on ln until ctx is done or the process receives SIGTERM
// or SIGINT (the signals cohort and systemd stop a worker with). It then
// sends STOPPING=1 and calls srv.Shutdown, which closes ln and waits for
// active requests; after timeout it closes the remaining connections with
// srv.Close. Serve listens for the signals only while it runs.
//
// It returns nil after a graceful shutdown (also when another goroutine
// shut srv down), the error of srv.Serve if serving failed, and an error
// wrapping context.DeadlineExceeded if the shutdown took longer than
// timeout. srv.Serve owns ln: it is closed in every case.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
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
	err := srv.Shutdown(sctx)
	if err != nil {
		srv.Close()
		err = fmt.Errorf("shutdown of server on %s after %v: %w", ln.Addr(), timeout, err)
	}
	<-served // Serve returns as soon as Shutdown has closed ln
	return err
}
