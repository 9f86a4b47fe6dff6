package dispatcher

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/dispatcher/internal/openmetrics"
	"github.com/cohort-dev/cohort/dispatcher/internal/procfs"
	"github.com/cohort-dev/cohort/dispatcher/internal/sockdiag"
)

// The metrics listener ([metrics] listen, Options.Metrics): an HTTP
// server in a goroutine of Run with three paths.
//
//	/metrics  the app's figures in OpenMetrics or the Prometheus text format
//	/readyz   200 while Status.Serving (min_ready workers ready, not draining), else 503
//	/livez    200 while the supervision loop answers within loopTimeout and
//	          not every worker has missed its watchdog, else 503
//
// Every answer starts from the loop's status snapshot, the one `cohort
// status` gets (snapshot, control.go), asked for like a control request:
// the loop builds it and goes on, and never waits for the server. What
// takes time is done here, off the loop: one scan of /proc for the
// workers' trees (treeUsage, as status) and one sock_diag request per port
// for the listeners' queues. Scrapes take turns at that work (scrapeMu),
// so many scrapers cost what one does, not more.
//
// A scraper cannot hurt the dispatcher: at most metricsConns connections
// are served at once (the rest wait in the kernel's backlog), each must
// send its request headers (at most metricsHeaderBytes) within
// metricsReadTimeout and take its answer within metricsWriteTimeout, an
// answer is built whole before a byte is written, and an idle keep-alive
// connection is closed after metricsIdleTimeout.
const (
	metricsConns        = 8
	metricsHeaderBytes  = 8 << 10
	metricsReadTimeout  = 5 * time.Second
	metricsWriteTimeout = 10 * time.Second
	metricsIdleTimeout  = 30 * time.Second
	// metricsStopGrace is how long the dispatcher's end waits for the
	// answers of requests it has already accepted.
	metricsStopGrace = time.Second
	// loopTimeout is how long /livez (and every other path) waits for
	// the loop's snapshot: the loop answers in microseconds unless it is
	// stuck.
	loopTimeout = 2 * time.Second
	// scrapeTimeout bounds the /proc and sock_diag reading of one scrape.
	scrapeTimeout = 3 * time.Second
	// utilMinWindow is the shortest window utilisation is measured
	// over: scrapes closer together than this share the older sample.
	// utilMaxAge is the oldest sample still used: after a pause in
	// scraping the next scrape starts a new window instead of averaging
	// over the pause.
	utilMinWindow = time.Second
	utilMaxAge    = 10 * time.Minute
)

// listenerSock is one listening socket as status lists it.
type listenerSock struct {
	name   string // the [[listen]] name
	index  int    // its [[listen]] index
	worker int    // reuseport: the slot whose socket it is; -1 otherwise
	id     sockdiag.Socket
	known  bool // id could be read
}

// listenerSocks names opt's listening sockets for sock_diag, in status
// order: [[listen]] order, and in reuseport mode each listener's sockets
// by worker. A socket that cannot be named is logged and reports no
// queue.
func listenerSocks(app *appfile.App, opt Options, out *output) []listenerSock {
	var socks []listenerSock
	add := func(index, worker int, f *os.File) {
		l := listenerSock{name: app.Listen[index].Name, index: index, worker: worker}
		id, err := sockdiag.Identify(f)
		if err != nil {
			out.warnf("listener %s: %v; its accept queue will not be reported", l.name, err)
		} else {
			l.id, l.known = id, true
		}
		socks = append(socks, l)
	}
	if app.Mode == appfile.ModeReusePort {
		for i := range app.Listen {
			for slot, set := range opt.SlotListeners {
				if i < len(set) {
					add(i, slot, set[i])
				}
			}
		}
		return socks
	}
	for i, f := range opt.Listeners {
		if i < len(app.Listen) {
			add(i, -1, f)
		}
	}
	return socks
}

// queues fills in the accept queues of snap's listeners (left -1 when
// the kernel cannot tell).
func queues(ctx context.Context, snap *statusSnapshot) {
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	var (
		socks []sockdiag.Socket
		at    []int
	)
	for i, id := range snap.socks {
		if snap.known[i] {
			socks, at = append(socks, id), append(at, i)
		}
	}
	qs, _ := sockdiag.Queues(ctx, socks) // unknown ones stay -1: nothing to log per scrape
	for j, q := range qs {
		l := &snap.st.Listeners[at[j]]
		l.Queue, l.QueueLimit = q.Len, q.Limit
	}
}

// serveMetrics serves Options.Metrics until ctx is done. A listener that
// cannot be served is logged, not fatal: the workers serve without it.
func (d *dispatcher) serveMetrics(ctx context.Context) {
	f := d.opt.Metrics
	if f == nil {
		return
	}
	ln, err := net.FileListener(f) // a duplicate: the caller's stays open
	if err != nil {
		d.out.warnf("metrics listener %s: %v; /metrics, /readyz and /livez will not answer", f.Name(), err)
		return
	}
	m := &metricsServer{
		ctl:  &ctlHandler{reqs: d.ctl.reqs, supervisor: os.Getpid()},
		last: map[workerKey]uint64{},
	}
	srv := &http.Server{
		Handler:           m,
		ReadHeaderTimeout: metricsReadTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    metricsHeaderBytes,
		ErrorLog:          log.New(io.Discard, "", 0), // a scraper's broken request is its own business
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	lim := &limitListener{Listener: ln, slots: make(chan struct{}, metricsConns)}
	d.wg.Go(func() {
		if err := srv.Serve(lim); err != nil && !errors.Is(err, http.ErrServerClosed) && ctx.Err() == nil {
			d.out.warnf("metrics listener: %v", err)
		}
	})
	d.wg.Go(func() {
		<-ctx.Done()
		lim.Close() // new probes wait in the socket, which systemd keeps, for the next dispatcher
		srv.SetKeepAlivesEnabled(false)
		// A probe already accepted gets its answer, for at most
		// metricsStopGrace: not http.Server.Shutdown, which drops a
		// request it reads once it has begun, nor Close, which cuts off
		// every connection at once (a /readyz probe failed during a
		// restart in CI).
		deadline := time.Now().Add(metricsStopGrace)
		for len(lim.slots) > 0 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		srv.Close() // closes every connection left
	})
}

// limitListener serves at most cap(slots) connections at once; Accept
// waits for a slot, so further connections wait in the kernel's backlog
// (golang.org/x/net/netutil.LimitListener does the same; cohort does not
// otherwise depend on x/net).
type limitListener struct {
	net.Listener
	slots chan struct{}
}

func (l *limitListener) Accept() (net.Conn, error) {
	l.slots <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	return &limitConn{Conn: c, release: sync.OnceFunc(func() { <-l.slots })}, nil
}

type limitConn struct {
	net.Conn
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

// metricsServer answers the metrics listener's requests.
type metricsServer struct {
	ctl *ctlHandler

	scrapeMu sync.Mutex           // one scrape reads /proc and sock_diag at a time
	last     map[workerKey]uint64 // under scrapeMu: CPU ticks of each worker at lastAt
	lastAt   time.Time
	util     float64 // under scrapeMu: the last window's utilisation, when haveUtil
	haveUtil bool
}

func (m *metricsServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	switch r.URL.Path {
	case "/metrics":
		m.metrics(w, r)
	case "/readyz":
		m.readyz(w, r)
	case "/livez":
		m.livez(w, r)
	default:
		http.Error(w, "not found: this is cohort's metrics listener (/metrics, /readyz, /livez)", http.StatusNotFound)
	}
}

// snapshot asks the loop for its status snapshot, waiting at most
// loopTimeout.
func (m *metricsServer) snapshot(ctx context.Context) (*statusSnapshot, error) {
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, loopTimeout)
	defer cancel()
	rep, err := m.ctl.ask(ctx, control.CmdStatus, 0)
	if err != nil {
		if parent.Err() != nil {
			return nil, errors.New("the dispatcher is ending")
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("the supervision loop did not answer within %s", loopTimeout)
		}
		return nil, err
	}
	return rep.status, nil
}

func plain(w http.ResponseWriter, code int, format string, args ...any) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintf(w, format+"\n", args...)
}

func (m *metricsServer) readyz(w http.ResponseWriter, r *http.Request) {
	snap, err := m.snapshot(r.Context())
	if err != nil {
		plain(w, http.StatusServiceUnavailable, "not ready: %v", err)
		return
	}
	st := &snap.st
	switch {
	case st.Serving:
		plain(w, http.StatusOK, "ready: %d workers ready, min_ready %d", st.ReadyWorkers, st.MinReady)
	case st.State == "draining" || st.State == "stopping":
		plain(w, http.StatusServiceUnavailable, "not ready: %s", st.State)
	default:
		plain(w, http.StatusServiceUnavailable, "not ready: %d workers ready, min_ready %d", st.ReadyWorkers, st.MinReady)
	}
}

func (m *metricsServer) livez(w http.ResponseWriter, r *http.Request) {
	snap, err := m.snapshot(r.Context())
	if err != nil {
		plain(w, http.StatusServiceUnavailable, "not live: %v", err)
		return
	}
	if !snap.st.Live {
		plain(w, http.StatusServiceUnavailable, "not live: every worker missed its watchdog")
		return
	}
	plain(w, http.StatusOK, "live")
}

func (m *metricsServer) metrics(w http.ResponseWriter, r *http.Request) {
	snap, err := m.snapshot(r.Context())
	if err != nil {
		plain(w, http.StatusServiceUnavailable, "%v", err)
		return
	}
	now := time.Now()
	util, haveUtil := m.measure(r.Context(), snap)
	ow := openmetrics.NewWriter(openmetrics.WantsOpenMetrics(r.Header.Get("Accept")))
	writeMetrics(ow, &snap.st, util, haveUtil, now)
	body := ow.Bytes()
	w.Header().Set("Content-Type", ow.ContentType())
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		w.Write(body)
	}
}

// measure fills in what snap's workers use (one /proc scan, no CPU
// window: Prometheus takes rates of cpu_seconds_total itself) and its
// listeners' queues, and returns the utilisation since the previous
// scrape (ok false when there is no usable previous sample).
//
// Utilisation is the CPU time all workers' trees used in the window,
// over the CPU time the service may use in it (the window times
// cpus.count: the affinity mask, cpuset and ⌊CPU quota⌋ that workers =
// "auto" counts). It measures how busy the app is because a worker
// spends CPU exactly while it handles work and none while it waits in
// accept or epoll, whatever the mode and the language, and cpus.count
// is what the app could spend at most: 1 means every CPU it may have is
// busy, and an autoscaler aiming at, say, 0.7 keeps a third of headroom.
// It does not see time spent waiting on a database (an I/O-bound app is
// busier than its CPU says); round-robin's open connections per worker
// (cohort_worker_connections_open) show that side.
func (m *metricsServer) measure(ctx context.Context, snap *statusSnapshot) (float64, bool) {
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	m.scrapeMu.Lock()
	defer m.scrapeMu.Unlock()
	queues(ctx, snap)
	us, err := treeUsage(ctx, m.ctl.supervisor, snap.procs) // recycle.go: what status and [recycle] memory read
	at := time.Now()
	if err != nil {
		return 0, false
	}
	ticks := map[workerKey]uint64{}
	var used uint64 // ticks in the window
	for i, u := range us {
		w := &snap.st.Workers[i]
		if snap.procs[i] == 0 || u.Procs == 0 {
			continue
		}
		w.RSS, w.CPUSeconds = u.RSS, float64(u.Ticks)/procfs.ClockTick
		k := workerKey{snap.procs[i], w.Started}
		ticks[k] = u.Ticks
		if prev, seen := m.last[k]; seen {
			used += u.Ticks - min(prev, u.Ticks)
		} else if w.Started.After(m.lastAt) {
			used += u.Ticks // started within the window: all of it counts
		}
	}
	window := at.Sub(m.lastAt)
	fresh := !m.lastAt.IsZero() && window <= utilMaxAge
	if fresh && window < utilMinWindow {
		// Too short to measure: the last window's figure again (a
		// series that came and went with scrape jitter would read as
		// stale), and the next scrape measures from the older sample.
		return m.util, m.haveUtil
	}
	m.last, m.lastAt = ticks, at
	cpus := snap.st.CPUs.Count
	m.haveUtil = fresh && cpus > 0
	m.util = 0
	if m.haveUtil {
		m.util = float64(used) / procfs.ClockTick / (window.Seconds() * float64(cpus))
	}
	return m.util, m.haveUtil
}

// Worker and app states as status names them, each a series of the
// state families (1 for the current one).
var (
	workerStates  = []string{"starting", "ready", "draining", "unhealthy", "exited", "backoff"}
	appStates     = []string{"starting", "ready", "reloading", "draining", "stopping"}
	restartCauses = []string{causeExited, causeCrashed, causeOOMKilled, causeWatchdog, causeReadyTimeout, causeUnhealthy, causeSpawnFailed}
)

// causeRecycled is the cause label of status's Recycles: the slot's
// workers replaced by a [recycle] policy, which status counts apart
// from its restarts.
const causeRecycled = "recycled"

// writeMetrics writes st's figures. Per-worker series carry app, worker
// (the slot index) and generation; during a restart-worker the old and
// the new process of a slot share both, and only the slot's current one
// (status lists it first) is written. Restarts are the slot's, whatever
// the generation: they carry app, worker and cause, so that a reload does
// not start them over as new series.
func writeMetrics(w *openmetrics.Writer, st *control.Status, util float64, haveUtil bool, now time.Time) {
	type L = openmetrics.Label
	lb := func(name, value string) L { return L{Name: name, Value: value} }
	app := lb("app", st.App)
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}

	w.Gauge("cohort_info", "The app's mode; always 1.")
	w.Sample(1, app, lb("mode", st.Mode))
	w.Gauge("cohort_state", "1 for the dispatcher's current state.")
	for _, s := range appStates {
		w.Sample(b(st.State == s), app, lb("state", s))
	}
	w.Gauge("cohort_start_time_seconds", "When the dispatcher started, in seconds since the epoch.")
	w.Sample(float64(st.Since.UnixMilli())/1000, app)
	w.Gauge("cohort_generation", "The generation new workers start with (1, +1 per reload that began).")
	w.Sample(float64(st.Generation), app)
	w.Gauge("cohort_serving", "What /readyz says: 1 while at least min_ready workers are ready and the dispatcher neither drains nor stops.")
	w.Sample(b(st.Serving), app)
	w.Gauge("cohort_live", "What /livez says of the workers: 0 while every worker missed its watchdog.")
	w.Sample(b(st.Live), app)
	slots := map[int]bool{}
	for _, wk := range st.Workers {
		slots[wk.Index] = true
	}
	w.Gauge("cohort_workers", "Worker slots.")
	w.Sample(float64(len(slots)), app)
	w.Gauge("cohort_workers_ready", "Worker slots whose current worker is ready.")
	w.Sample(float64(st.ReadyWorkers), app)
	w.Gauge("cohort_min_ready", "Ready workers /readyz needs.")
	w.Sample(float64(st.MinReady), app)
	w.Gauge("cohort_cpus", "CPUs the app may use (affinity, cpuset, floor of the CPU quota): what workers = auto and COHORT_CPUS count.")
	w.Sample(float64(st.CPUs.Count), app)
	if haveUtil {
		w.Gauge("cohort_utilisation", "CPU time all workers used since the previous scrape over the CPU time cohort_cpus allow in it (1: every CPU busy).")
		w.Sample(util, app)
	}
	w.Counter("cohort_reloads", "Rolling reloads by result.")
	w.Sample(float64(st.Reloads.OK), app, lb("result", "ok"))
	w.Sample(float64(st.Reloads.Failed), app, lb("result", "failed"))
	if st.Reloads.LastResult != "" {
		w.Gauge("cohort_reload_last_duration_seconds", "How long the last finished reload took.")
		w.Sample(st.Reloads.LastSeconds, app)
		w.Gauge("cohort_reload_last_success", "1 when the last finished reload succeeded.")
		w.Sample(b(st.Reloads.LastResult == "ok"), app)
	}

	// One row per (slot, generation): status lists the slot's current
	// worker first.
	type key struct{ index, gen int }
	seen := map[key]bool{}
	var rows []control.Worker
	for _, wk := range st.Workers {
		k := key{wk.Index, wk.Generation}
		if !seen[k] {
			seen[k] = true
			rows = append(rows, wk)
		}
	}
	wl := func(wk control.Worker) []L {
		return []L{app, lb("worker", strconv.Itoa(wk.Index)), lb("generation", strconv.Itoa(wk.Generation))}
	}
	with := func(ls []L, more ...L) []L { return append(slices.Clip(ls), more...) }
	w.Gauge("cohort_worker_up", "1 while the worker has a process.")
	for _, wk := range rows {
		w.Sample(b(wk.PID != 0), wl(wk)...)
	}
	w.Gauge("cohort_worker_ready", "1 while the worker is ready.")
	for _, wk := range rows {
		w.Sample(b(wk.State == "ready"), wl(wk)...)
	}
	w.Gauge("cohort_worker_state", "1 for the worker's current state.")
	for _, wk := range rows {
		for _, s := range workerStates {
			w.Sample(b(wk.State == s), with(wl(wk), lb("state", s))...)
		}
	}
	live := func(yield func(control.Worker) bool) {
		for _, wk := range rows {
			if wk.PID != 0 && !yield(wk) {
				return
			}
		}
	}
	w.Gauge("cohort_worker_start_time_seconds", "When the worker's process started, in seconds since the epoch.")
	for wk := range live {
		w.Sample(float64(wk.Started.UnixMilli())/1000, wl(wk)...)
	}
	w.Gauge("cohort_worker_uptime_seconds", "How long the worker's process has run.")
	for wk := range live {
		w.Sample(max(now.Sub(wk.Started).Seconds(), 0), wl(wk)...)
	}
	w.Gauge("cohort_worker_resident_memory_bytes", "Resident memory of the worker's process tree, summed over its processes.")
	for wk := range live {
		w.Sample(float64(wk.RSS), wl(wk)...)
	}
	w.Counter("cohort_worker_cpu_seconds", "CPU time (user and system) of the worker's process tree.")
	for wk := range live {
		w.Sample(wk.CPUSeconds, wl(wk)...)
	}
	if st.Mode == string(appfile.ModeRoundRobin) {
		w.Counter("cohort_worker_connections_handed", "Connections the dispatcher handed to the worker (round-robin).")
		for wk := range live {
			w.Sample(float64(wk.Handed), wl(wk)...)
		}
		w.Gauge("cohort_worker_connections_open", "Connections handed to the worker and not yet closed by it (round-robin).")
		for wk := range live {
			w.Sample(float64(wk.Active), wl(wk)...)
		}
	}
	w.Counter("cohort_worker_restarts", "Replacements of the worker slot's process by cause: exited, crashed, watchdog, ready_timeout, unhealthy, spawn_failed (status's restarts), and recycled (a [recycle] policy; status's recycles).")
	done := map[int]bool{}
	for _, wk := range rows {
		if done[wk.Index] {
			continue
		}
		done[wk.Index] = true
		causes := slices.Clone(restartCauses)
		for c := range wk.RestartCauses {
			if !slices.Contains(causes, c) {
				causes = append(causes, c)
			}
		}
		slices.SortFunc(causes[len(restartCauses):], cmp.Compare)
		for _, c := range causes {
			w.Sample(float64(wk.RestartCauses[c]), app, lb("worker", strconv.Itoa(wk.Index)), lb("cause", c))
		}
		w.Sample(float64(wk.Recycles), app, lb("worker", strconv.Itoa(wk.Index)), lb("cause", causeRecycled))
	}

	ll := func(l control.Listener) []L {
		ls := []L{app, lb("listener", l.Name)}
		if l.Worker >= 0 {
			ls = append(ls, lb("worker", strconv.Itoa(l.Worker)))
		}
		return ls
	}
	w.Gauge("cohort_listener_queue_length", "Connections waiting in the listening socket's accept queue, as the kernel reports it (ss -lt Recv-Q); reuseport: each worker's socket.")
	for _, l := range st.Listeners {
		if l.Queue >= 0 {
			w.Sample(float64(l.Queue), ll(l)...)
		}
	}
	w.Gauge("cohort_listener_queue_limit", "The listening socket's backlog, the most connections its accept queue holds (ss -lt Send-Q).")
	for _, l := range st.Listeners {
		if l.QueueLimit >= 0 {
			w.Sample(float64(l.QueueLimit), ll(l)...)
		}
	}
	if st.Mode == string(appfile.ModeRoundRobin) {
		w.Counter("cohort_listener_connections_accepted", "Connections the dispatcher accepted on the listener (round-robin).")
		for _, l := range st.Listeners {
			w.Sample(float64(l.Accepted), ll(l)...)
		}
	}
}
