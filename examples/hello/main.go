// Command cohort-hello is cohort's example worker: a tiny HTTP server that
// says which worker served the request.
//
// Under cohort (or systemd socket activation) it serves the first socket
// it was handed (fd 3, LISTEN_FDS) and reports READY=1 to NOTIFY_SOCKET;
// run alone, it listens on $HELLO_ADDR (default 127.0.0.1:8080). SIGTERM
// stops it gracefully: requests in flight are answered first.
//
//	make run                       # bin/cohort run examples/hello.toml
//	curl http://127.0.0.1:8080/    # hello from worker 1 (pid 4242, gen 1)
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	cohort "github.com/cohort-dev/cohort/activation"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	log.SetFlags(0)
	ln, err := listener()
	if err != nil {
		log.Fatal(err)
	}
	worker, gen := os.Getenv("COHORT_WORKER"), os.Getenv("COHORT_GENERATION")
	if worker == "" {
		worker, gen = "-", "-"
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from worker %s (pid %d, gen %s)\n", worker, os.Getpid(), gen)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		d, _ := time.ParseDuration(r.URL.Query().Get("d"))
		time.Sleep(min(d, time.Minute))
		fmt.Fprintf(w, "slow hello from worker %s (pid %d, gen %s) after %s\n", worker, os.Getpid(), gen, d)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	log.Printf("worker %s (pid %d) serving on %s", worker, os.Getpid(), ln.Addr())
	daemon.SdNotify(false, "READY=1\nSTATUS=serving on "+ln.Addr().String())
	// Serve stops on SIGTERM without dropping a request: it stops
	// accepting first and answers what it accepted.
	if err := cohort.Serve(context.Background(), srv, ln, 25*time.Second); err != nil {
		log.Fatal(err)
	}
	log.Printf("worker %s (pid %d) stopped", worker, os.Getpid())
}

// listener returns the socket-activated listener, or one of its own when
// the program runs alone.
func listener() (net.Listener, error) {
	if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n > 0 {
		ls, err := activation.Listeners()
		if err != nil {
			return nil, fmt.Errorf("socket activation: %w", err)
		}
		if len(ls) == 0 || ls[0] == nil {
			return nil, errors.New("socket activation: fd 3 is not a listening socket (is LISTEN_PID this process?)")
		}
		return ls[0], nil
	}
	addr := os.Getenv("HELLO_ADDR")
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	return net.Listen("tcp", addr)
}
