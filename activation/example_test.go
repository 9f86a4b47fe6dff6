package activation_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/cohort-dev/cohort/activation"
)

// A worker's whole life: inherit, listen by name (here on the fallback
// address, since this example is not socket-activated), serve until told
// to stop, shut down gracefully.
func Example() {
	files, err := activation.Inherit()
	if err != nil {
		log.Fatal(err)
	}
	ln, err := files.Listen("http", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	files.Close()

	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from worker %q\n", os.Getenv("COHORT_WORKER"))
	})}
	// A real worker passes context.Background() and stops on SIGTERM;
	// here the example stops itself after one request.
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- activation.Serve(ctx, srv, ln, 5*time.Second) }()

	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Print(string(body))

	stop()
	fmt.Println("serve:", <-served)
	// Output:
	// hello from worker ""
	// serve: <nil>
}
