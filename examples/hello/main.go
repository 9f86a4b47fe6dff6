// Command cohort-hello is cohort's example worker: a tiny HTTP server that
// says which worker served the request.
//
// It uses cohort's activation library, so the same program runs unchanged
// under plain systemd socket activation, under cohort in shared mode (it
// accepts on the inherited socket) and in round-robin mode (the dispatcher
// hands it connections over the "cohort-rr" channel). It serves the socket
// named $HELLO_LISTEN, by default the first one it was handed; run alone,
// it listens on $HELLO_ADDR (default 127.0.0.1:8080). The first accept
// reports READY=1 to NOTIFY_SOCKET; SIGTERM stops it gracefully: requests
// in flight are answered first.
//
//	make run                       # bin/cohort run examples/hello.toml
//	curl http://127.0.0.1:8080/    # hello from worker 1 (pid 4242, gen 1)
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/cohort-dev/cohort/activation"
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

	log.Printf("worker %s (pid %d) serving on %s %s", worker, os.Getpid(), ln.Addr().Network(), ln.Addr())
	activation.Status("serving on " + ln.Addr().String())
	if err := activation.Serve(context.Background(), srv, ln, 25*time.Second); err != nil {
		log.Fatal(err)
	}
	log.Printf("worker %s (pid %d) stopped", worker, os.Getpid())
}

// listener returns the socket named $HELLO_LISTEN (default: the first one
// passed), or one of its own on $HELLO_ADDR when the program runs alone.
func listener() (net.Listener, error) {
	files, err := activation.Inherit()
	if err != nil {
		return nil, err
	}
	defer files.Close() // the sockets it does not serve
	name := os.Getenv("HELLO_LISTEN")
	if names := files.Names(); name == "" && len(names) > 0 {
		name = names[0]
	}
	addr := os.Getenv("HELLO_ADDR")
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	return files.Listen(name, addr)
}
