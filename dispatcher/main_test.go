package dispatcher

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cohort "github.com/cohort-dev/cohort/activation"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// The test binary is also the trampoline and the helper processes the
// tests run (the os/exec helper-process pattern): argv[1] = TrampolineArg
// makes it the trampoline, COHORT_TEST_HELPER selects a helper.
//
// Most helpers stand for a program that knows nothing of cohort, so they
// take their sockets and speak sd_notify with go-systemd, as many Go
// services do, not with cohort's activation package (which cohort itself
// uses, and helperCohortWorker tests).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == TrampolineArg {
		os.Exit(Trampoline(os.Args[2:]))
	}
	switch os.Getenv("COHORT_TEST_HELPER") {
	case "worker":
		os.Exit(helperWorker())
	case "dispatcher":
		os.Exit(helperDispatcher())
	case "printer":
		os.Exit(helperPrinter())
	case "cohort-worker":
		os.Exit(helperCohortWorker())
	case "rr-hostile":
		os.Exit(helperRRHostile())
	case "steer":
		os.Exit(helperSteer()) // steer_test.go
	}
	code := m.Run()
	removeHello()
	os.Exit(code)
}

// helperWorker is a Go worker that serves HTTP on the socket-activated fd
// 3, as a user's program would. Knobs (environment):
//
//	HELPER_CTRL=file   exit 3 at once if the file says "exit"
//	HELPER_READY=1     send READY=1 (with a STATUS=) to NOTIFY_SOCKET
//	HELPER_WATCHDOG=1  send WATCHDOG=1 once, right after READY=1
//	HELPER_START_DELAY=D  sleep D before serving and READY=1 (a slow start)
//	HELPER_DIE_FILE=file  serve one connection at a time (helperSequential),
//	                      and SIGKILL itself once file exists
//	HELPER_SIGNAL_FILE=file  append "<pid> <signal>" to file on SIGUSR2 or SIGHUP
//	HELPER_GROW=N      hold N MiB more, touched, from the start
//
// "/grow?mb=N" makes it hold N MiB more (resident: every page touched).
// It answers "/" with its identity, "/slow?ms=N" after N ms (printing
// "slow-start" first), and stops gracefully on SIGTERM.
func helperWorker() int {
	if ctrl := os.Getenv("HELPER_CTRL"); ctrl != "" {
		if b, _ := os.ReadFile(ctrl); strings.TrimSpace(string(b)) == "exit" {
			return 3
		}
	}
	listenPID, fdNames := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDNAMES")
	ln, err := helperListener()
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper worker: no listeners (LISTEN_PID=%s pid=%d): %v\n", listenPID, os.Getpid(), err)
		return 4
	}
	if file := os.Getenv("HELPER_SIGNAL_FILE"); file != "" {
		sigs := make(chan os.Signal, 4)
		signal.Notify(sigs, syscall.SIGUSR2, syscall.SIGHUP)
		go func() { // ends with the helper process
			for sig := range sigs {
				f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
				if err == nil {
					fmt.Fprintf(f, "%d %s\n", os.Getpid(), unix.SignalName(sig.(syscall.Signal)))
					f.Close()
				}
			}
		}()
	}
	if d, err := time.ParseDuration(os.Getenv("HELPER_START_DELAY")); err == nil {
		time.Sleep(d)
	}
	var held [][]byte
	var heldMu sync.Mutex
	grow := func(mb int) {
		b := make([]byte, mb<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		heldMu.Lock()
		held = append(held, b)
		heldMu.Unlock()
	}
	if mb, err := strconv.Atoi(os.Getenv("HELPER_GROW")); err == nil && mb > 0 {
		grow(mb)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/grow", func(w http.ResponseWriter, r *http.Request) {
		mb, _ := strconv.Atoi(r.URL.Query().Get("mb"))
		grow(min(max(mb, 0), 1024))
		fmt.Fprintf(w, "grown pid=%d mb=%d\n", os.Getpid(), mb)
	})
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
	if os.Getenv("HELPER_READY") == "1" {
		daemon.SdNotify(false, "READY=1\nSTATUS=serving")
	}
	if os.Getenv("HELPER_WATCHDOG") == "1" {
		daemon.SdNotify(false, "WATCHDOG=1")
	}
	if die := os.Getenv("HELPER_DIE_FILE"); die != "" {
		return helperSequential(ln, die, listenPID, fdNames)
	}
	// cohort's own library: stops on SIGTERM without dropping a request.
	if err := cohort.Serve(context.Background(), srv, ln, 10*time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "helper worker:", err)
		return 1
	}
	return 0
}

// helperSequential serves HTTP one connection at a time: accept, read the
// request, answer, close. After closing a connection, if dieFile exists,
// it removes the file and SIGKILLs itself: a kill -9 at the one point
// where the worker holds no connection, so that every connection the
// kernel queued for it meanwhile must be served by its replacement.
func helperSequential(ln net.Listener, dieFile, listenPID, fdNames string) int {
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper worker: accept:", err)
			return 1
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil || line == "\r\n" {
				break
			}
		}
		body := fmt.Sprintf("worker=%s pid=%d gen=%s listen_pid=%s fdnames=%s\n",
			os.Getenv("COHORT_WORKER"), os.Getpid(), os.Getenv("COHORT_GENERATION"), listenPID, fdNames)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		c.Close()
		if os.Remove(dieFile) == nil {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
}

// helperListener returns the first socket passed (go-systemd, which sends
// no READY=1 of its own) or, in round-robin mode, the first round-robin
// listener of cohort's library (whose first Accept sends READY=1).
func helperListener() (net.Listener, error) {
	if !strings.Contains(os.Getenv("LISTEN_FDNAMES"), "cohort-rr") {
		ls, err := activation.Listeners()
		if err == nil && len(ls) == 0 {
			err = fmt.Errorf("no sockets")
		}
		if err != nil {
			return nil, err
		}
		return ls[0], nil
	}
	files, err := cohort.Inherit()
	if err != nil {
		return nil, err
	}
	defer files.Close()
	names := files.Names()
	if len(names) == 0 {
		return nil, fmt.Errorf("no round-robin listeners")
	}
	return files.Listen(names[0], "")
}

// helperDispatcher is `cohort dispatch` in miniature: the app comes as
// JSON in COHORT_TEST_APP, or from the file COHORT_TEST_APPFILE (which a
// reload re-reads), the listeners by socket activation.
func helperDispatcher() int {
	var app appfile.App
	if file := os.Getenv("COHORT_TEST_APPFILE"); file != "" {
		a, err := appfile.ParseFile(file)
		if err != nil {
			fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
			return 2
		}
		app = *a
	} else if err := json.Unmarshal([]byte(os.Getenv("COHORT_TEST_APP")), &app); err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 2
	}
	os.Unsetenv("COHORT_TEST_APP")
	os.Unsetenv("COHORT_TEST_HELPER")
	metrics, files := sockets.TakeMetrics(activation.Files(true))
	// This process owns all its children: it may be their subreaper.
	opt := Options{App: &app, HandleSignals: true, Subreaper: true, Metrics: metrics}
	var err error
	if app.Mode == appfile.ModeReusePort {
		opt.SlotListeners, err = sockets.MatchSlots(&app, files)
	} else {
		opt.Listeners, err = sockets.Match(&app, files)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 2
	}
	if err := Run(context.Background(), opt); err != nil {
		fmt.Fprintln(os.Stderr, "helper dispatcher:", err)
		return 1
	}
	return 0
}

// helperPrinter writes the lines of HELPER_LINES (separated by "|") to
// stdout (HELPER_REPEAT times), a line of HELPER_LONG bytes when set, and HELPER_TAIL without a
// newline; then it exits with HELPER_EXIT, or kills itself with SIGKILL
// when HELPER_EXIT is "kill" (output written just before a crash), or
// stays until killed when it is "hang".
func helperPrinter() int {
	w := bufio.NewWriter(os.Stdout)
	repeat, _ := strconv.Atoi(os.Getenv("HELPER_REPEAT"))
	for range max(repeat, 1) {
		for _, l := range strings.Split(os.Getenv("HELPER_LINES"), "|") {
			fmt.Fprintln(w, l)
		}
	}
	if n, _ := strconv.Atoi(os.Getenv("HELPER_LONG")); n > 0 {
		w.WriteString(strings.Repeat("x", n-1) + "y\n")
	}
	w.WriteString(os.Getenv("HELPER_TAIL"))
	w.Flush()
	switch os.Getenv("HELPER_EXIT") {
	case "kill":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	case "hang": // stay, until a signal ends it
		time.Sleep(time.Hour)
	}
	code, _ := strconv.Atoi(os.Getenv("HELPER_EXIT"))
	return code
}
