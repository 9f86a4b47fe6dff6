// Command hello is the benchmark's Go hello app: one program for every Go
// row. Each response says which worker answered ("go worker <id> pid
// <pid>"), so the load generator can count requests per worker.
//
//	hello                 alone, on $BENCH_ADDR (default 127.0.0.1:8080)
//	hello -prefork N      N processes, each binding $BENCH_ADDR itself with
//	                      SO_REUSEPORT (the kernel spreads connections)
//	cohort run ... -- hello
//	                      under cohort: the socket-activated listener
//	                      (LISTEN_FDS), in shared, round-robin or
//	                      reuseport mode
//
// SIGTERM or SIGINT stops it gracefully (activation.Serve): it stops
// accepting and answers every connection it accepted before it exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/activation"
	"golang.org/x/sys/unix"
)

func main() {
	log.SetFlags(0)
	prefork := flag.Int("prefork", 0, "start `n` SO_REUSEPORT processes")
	flag.Parse()
	addr := os.Getenv("BENCH_ADDR")
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	if *prefork > 0 {
		if err := parent(*prefork); err != nil {
			log.Fatalf("hello: prefork: %v", err)
		}
		return
	}
	if err := serve(addr); err != nil {
		log.Fatalf("hello: %v", err)
	}
}

// parent starts n copies of this program, each binding the address with
// SO_REUSEPORT, forwards SIGTERM/SIGINT to them and waits for all of them.
// Children are in the parent's process group, so the harness stops the
// whole group at once if the parent dies.
func parent(n int) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	cmds := make([]*exec.Cmd, 0, n)
	done := make(chan error, n)
	for i := range n {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "BENCH_REUSEPORT=1", "BENCH_SLOT="+strconv.Itoa(i))
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			for _, c := range cmds {
				_ = c.Process.Kill()
			}
			return fmt.Errorf("start child %d: %w", i, err)
		}
		cmds = append(cmds, cmd)
		go func() { done <- cmd.Wait() }() // owned by parent: drained below
	}
	var first error
	for left := n; left > 0; {
		select {
		case s := <-sigs:
			for _, c := range cmds {
				_ = c.Process.Signal(s)
			}
		case err := <-done:
			left--
			if err != nil && first == nil {
				first = fmt.Errorf("child: %w", err)
			}
		}
	}
	return first
}

func serve(addr string) error {
	ln, err := listener(addr)
	if err != nil {
		return err
	}
	id := os.Getenv("COHORT_WORKER")
	if id == "" {
		id = os.Getenv("BENCH_SLOT")
	}
	if id == "" {
		id = "-"
	}
	body := []byte(fmt.Sprintf("go worker %s pid %d\n", id, os.Getpid()))
	length := strconv.Itoa(len(body))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			h["Content-Type"] = []string{"text/plain"}
			h["Content-Length"] = []string{length}
			_, _ = w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	log.Printf("go worker %s pid %d serving on %s", id, os.Getpid(), ln.Addr())
	// activation.Serve, not srv.Shutdown: on SIGTERM Shutdown closes,
	// unanswered, a connection accepted just before whose request it reads
	// after the shutdown began, which in a rolling reload under load (the
	// other workers keep serving) is a failed request that is the app's,
	// not the supervisor's. Serve stops accepting, answers what it
	// accepted, then shuts down. Every Go row runs this same code.
	if err := activation.Serve(context.Background(), srv, ln, 10*time.Second); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// listener returns the inherited socket when socket-activated (cohort,
// systemd), a SO_REUSEPORT socket of its own in a prefork child, or a plain
// one on addr.
func listener(addr string) (net.Listener, error) {
	if ln, ok, err := activated(); ok || err != nil {
		return ln, err
	}
	var lc net.ListenConfig
	if os.Getenv("BENCH_REUSEPORT") == "1" {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			})
			if err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("setsockopt SO_REUSEPORT: %w", serr)
			}
			return nil
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ln, nil
}
