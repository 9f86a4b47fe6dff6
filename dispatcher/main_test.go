package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/generator/config"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// The test binary is also the trampoline and the helper processes the
// tests run (the os/exec helper-process pattern): argv[1] = TrampolineArg
// makes it the trampoline, COHORT_TEST_HELPER selects a helper.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == TrampolineArg {
		os.Exit(Trampoline(os.Args[2:]))
	}
	switch os.Getenv("COHORT_TEST_HELPER") {
	case "worker":
		os.Exit(helperWorker())
	case "dispatcher":
		os.Exit(helperDispatcher())
	}
	os.Exit(m.Run())
}

// helperWorker is a Go worker that serves HTTP on the socket-activated fd
// 3, as a user's program would. Knobs (environment):
//
//	HELPER_CTRL=file   exit 3 at once if the file says "exit"
//	HELPER_READY=1     send READY=1 (with a STATUS=) to NOTIFY_SOCKET
//	HELPER_WATCHDOG=1  send WATCHDOG=1 once, right after READY=1
//
// It answers "/" with its identity, "/slow?ms=N" after N ms (printing
// "slow-start" first), and stops gracefully on SIGTERM.
func helperWorker() int {
	if ctrl := os.Getenv("HELPER_CTRL"); ctrl != "" {
		if b, _ := os.ReadFile(ctrl); strings.TrimSpace(string(b)) == "exit" {
			return 3
		}
	}
	listenPID, fdNames := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDNAMES")
	ls, err := activation.Listeners()
	if err != nil || len(ls) == 0 {
		fmt.Fprintf(os.Stderr, "helper worker: no listeners (LISTEN_PID=%s pid=%d): %v\n", os.Getenv("LISTEN_PID"), os.Getpid(), err)
		return 4
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "worker=%s pid=%d gen=%s listen_pid=%s notify=%s watchdog_usec=%s fdnames=%s\n",
			os.Getenv("COHORT_WORKER"), os.Getpid(), os.Getenv("COHORT_GENERATION"), listenPID,
			os.Getenv("NOTIFY_SOCKET"), os.Getenv("WATCHDOG_USEC"), fdNames)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		fmt.Println("slow-start")
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "slow done by pid %d\n", os.Getpid())
	})
	srv := &http.Server{Handler: mux}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go srv.Serve(ls[0])
	if os.Getenv("HELPER_READY") == "1" {
		daemon.SdNotify(false, "READY=1\nSTATUS=serving")
	}
	if os.Getenv("HELPER_WATCHDOG") == "1" {
		daemon.SdNotify(false, "WATCHDOG=1")
	}
	<-term
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	return 0
}

// helperDispatcher is `cohort dispatch` in miniature: the app comes as
// JSON in COHORT_TEST_APP, the listeners by socket activation.
func helperDispatcher() int {
	var app config.App
	if err := json.Unmarshal([]byte(os.Getenv("COHORT_TEST_APP")), &app); err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 2
	}
	os.Unsetenv("COHORT_TEST_APP")
	os.Unsetenv("COHORT_TEST_HELPER")
	files := activation.Files(true)
	listeners, err := MatchListeners(&app, files)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 2
	}
	if err := Run(context.Background(), Options{App: &app, Listeners: listeners, HandleSignals: true}); err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 1
	}
	return 0
}
