package dispatcher

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/sockets"
	"github.com/cohort-dev/cohort/internal/testtool"
)

// metricsApp is testApp with a metrics listener; it returns the options
// for Run and the metrics base URL.
func metricsApp(t *testing.T, workers int, env map[string]string) (*appfile.App, Options, string) {
	t.Helper()
	app := testApp(t, workers, env)
	app.Metrics.Listen = appfile.Listener{Name: appfile.MetricsFDName, Address: "127.0.0.1:0", Kind: appfile.ListenTCP}
	ln, _ := tcpListener(t, "http")
	mf, maddr := tcpListener(t, appfile.MetricsFDName)
	return app, Options{App: app, Listeners: []*os.File{ln}, Metrics: mf, RuntimeDir: t.TempDir()}, "http://" + maddr
}

// scrape GETs url with accept and returns the status code, content type
// and body.
func scrape(t *testing.T, url, accept string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
}

// samples parses an exposition into "name{labels}" → value, labels as
// written.
func samples(t *testing.T, body string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// TestMetricsMatchStatus: /metrics of a shared-mode app with three ready
// workers says what the control socket's status says, in both formats;
// promtool finds nothing wrong with the text format; a killed worker's
// restart is counted as "crashed".
func TestMetricsMatchStatus(t *testing.T) {
	t.Parallel()
	_, opt, base := metricsApp(t, 3, nil)
	rec, _ := startRun(t, opt)
	from := 0
	for range 3 {
		rec.wait(t, &from, 20*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	}
	sock := opt.RuntimeDir + "/" + control.SocketName

	code, ctype, body := scrape(t, base+"/metrics", "")
	if code != 200 || !strings.HasPrefix(ctype, "text/plain; version=0.0.4") {
		t.Fatalf("/metrics: %d %q\n%s", code, ctype, body)
	}
	st := callStatus(t, sock)
	s := samples(t, body)
	want := map[string]float64{
		`cohort_workers{app="t"}`:                   3,
		`cohort_workers_ready{app="t"}`:             float64(st.ReadyWorkers),
		`cohort_min_ready{app="t"}`:                 2,
		`cohort_serving{app="t"}`:                   1,
		`cohort_live{app="t"}`:                      1,
		`cohort_generation{app="t"}`:                1,
		`cohort_state{app="t",state="ready"}`:       1,
		`cohort_cpus{app="t"}`:                      float64(st.CPUs.Count),
		`cohort_reloads_total{app="t",result="ok"}`: 0,
	}
	for _, w := range st.Workers {
		l := fmt.Sprintf(`{app="t",worker="%d",generation="%d"}`, w.Index, w.Generation)
		want["cohort_worker_up"+l] = 1
		want["cohort_worker_ready"+l] = 1
		want[fmt.Sprintf(`cohort_worker_state{app="t",worker="%d",generation="%d",state="ready"}`, w.Index, w.Generation)] = 1
		want["cohort_worker_start_time_seconds"+l] = float64(w.Started.UnixMilli()) / 1000
		want[fmt.Sprintf(`cohort_worker_restarts_total{app="t",worker="%d",cause="crashed"}`, w.Index)] = 0
		if s["cohort_worker_resident_memory_bytes"+l] <= 0 {
			t.Errorf("worker %d: no resident memory in\n%s", w.Index, body)
		}
	}
	if l := st.Listeners; len(l) != 1 || l[0].QueueLimit <= 0 || l[0].Queue != 0 {
		t.Errorf("status listeners %+v, want one with a queue limit and nothing queued", l)
	} else {
		want[`cohort_listener_queue_limit{app="t",listener="http"}`] = float64(l[0].QueueLimit)
		want[`cohort_listener_queue_length{app="t",listener="http"}`] = 0
	}
	for k, v := range want {
		if got, ok := s[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	if _, ok := s[`cohort_utilisation{app="t"}`]; ok {
		t.Errorf("utilisation on the first scrape, with no window to measure over")
	}

	_, ctype, om := scrape(t, base+"/metrics", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
	if !strings.HasPrefix(ctype, "application/openmetrics-text; version=1.0.0") || !strings.HasSuffix(om, "# EOF\n") ||
		!strings.Contains(om, "# TYPE cohort_worker_restarts counter\n") {
		t.Errorf("OpenMetrics: %q\n%s", ctype, om)
	}

	if promtool := testtool.Need(t, "promtool"); promtool != "" {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("promtool check metrics: %v\n%s\n%s", err, out, body)
		}
	}

	// A worker killed by a signal cohort did not send restarts as
	// "crashed"; utilisation appears once a window has passed.
	victim := st.Workers[1]
	syscall.Kill(victim.PID, syscall.SIGKILL)
	rec.wait(t, &from, 20*time.Second, "worker 1 restarted and ready", func(e Event) bool { return e.Kind == WorkerReady && e.Worker == 1 })
	time.Sleep(utilMinWindow)
	_, _, body = scrape(t, base+"/metrics", "")
	s = samples(t, body)
	if got := s[`cohort_worker_restarts_total{app="t",worker="1",cause="crashed"}`]; got != 1 {
		t.Errorf("restarts of worker 1 by crash = %v, want 1\n%s", got, body)
	}
	if st := callStatus(t, sock); st.Workers[1].RestartCauses["crashed"] != 1 || st.Workers[1].Restarts != 1 {
		t.Errorf("status worker 1: restarts %d, causes %v; want 1 crashed", st.Workers[1].Restarts, st.Workers[1].RestartCauses)
	}
	if u, ok := s[`cohort_utilisation{app="t"}`]; !ok || u < 0 || u > 1.5 {
		t.Errorf("utilisation %v (present %v), want a fraction", u, ok)
	}
	// A scrape right after (scrape jitter, a second scraper) repeats the
	// figure: the series must not come and go.
	_, _, body = scrape(t, base+"/metrics", "")
	if u, ok := samples(t, body)[`cohort_utilisation{app="t"}`]; !ok || u != s[`cohort_utilisation{app="t"}`] {
		t.Errorf("utilisation of a scrape less than %s after the last: %v (present %v), want %v again", utilMinWindow, u, ok, s[`cohort_utilisation{app="t"}`])
	}
}

// TestReadyzDrain: on a stop with drain_delay, /readyz turns 503 at once
// while the workers go on answering on the app's listener; they are told
// to stop only when the delay is over.
func TestReadyzDrain(t *testing.T) {
	t.Parallel()
	app := testApp(t, 2, nil)
	app.Metrics = appfile.Metrics{Listen: appfile.Listener{Name: appfile.MetricsFDName, Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	app.DrainDelay = 1500 * time.Millisecond
	ln, addr := tcpListener(t, "http")
	mf, maddr := tcpListener(t, appfile.MetricsFDName)
	rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{ln}, Metrics: mf})
	from := 0
	for range 2 {
		rec.wait(t, &from, 20*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	}
	if code, _, body := scrape(t, "http://"+maddr+"/readyz", ""); code != 200 {
		t.Fatalf("/readyz before the stop: %d %s", code, body)
	}
	if code, _, body := scrape(t, "http://"+maddr+"/livez", ""); code != 200 {
		t.Fatalf("/livez: %d %s", code, body)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	e := rec.wait(t, &from, 10*time.Second, "draining", func(e Event) bool { return e.Kind == Draining })
	if code, _, body := scrape(t, "http://"+maddr+"/readyz", ""); code != 503 || !strings.Contains(body, "draining") {
		t.Errorf("/readyz while draining: %d %s, want 503", code, body)
	}
	// Still served: both workers answer through the drain.
	for time.Since(e.Time) < time.Second {
		if body, err := get("http://" + addr + "/"); err != nil || !strings.HasPrefix(body, "worker=") {
			t.Fatalf("request during the drain: %q %v", body, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	s := rec.wait(t, &from, 10*time.Second, "stopping", func(e Event) bool { return e.Kind == Stopping })
	if d := s.Time.Sub(e.Time); d < app.DrainDelay {
		t.Errorf("workers told to stop %s after the drain began, before drain_delay %s", d, app.DrainDelay)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestMetricsStopAnswersAccepted: a probe the metrics listener accepted
// before the dispatcher's end still gets its answer (it closed every
// connection at once: a /readyz probe failed during a restart in CI).
func TestMetricsStopAnswersAccepted(t *testing.T) {
	t.Parallel()
	app := testApp(t, 1, nil)
	app.Metrics = appfile.Metrics{Listen: appfile.Listener{Name: appfile.MetricsFDName, Address: "127.0.0.1:0", Kind: appfile.ListenTCP}}
	ln, _ := tcpListener(t, "http")
	mf, maddr := tcpListener(t, appfile.MetricsFDName)
	rec, stop := startRun(t, Options{App: app, Listeners: []*os.File{ln}, Metrics: mf})
	from := 0
	rec.wait(t, &from, 20*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	c, err := net.DialTimeout("tcp", maddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	// Half a request: the server has accepted the connection and waits
	// for the rest of its headers when the stop comes.
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.1\r\nHost: cohort\r\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	rec.wait(t, &from, 10*time.Second, "stopping", func(e Event) bool { return e.Kind == Stopping })
	rec.wait(t, &from, 10*time.Second, "the worker's exit", func(e Event) bool { return e.Kind == WorkerExited })
	time.Sleep(300 * time.Millisecond) // the dispatcher's end has begun
	if _, err := io.WriteString(c, "\r\n"); err != nil {
		t.Fatalf("the rest of the request after the stop: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("a probe accepted before the stop got no answer: %v", err)
	}
	resp.Body.Close()
	t.Logf("answered %s", resp.Status)
	if err := <-stopped; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestLivezWatchdog: /livez answers 503 while the only worker has missed
// its watchdog (it pings once, then never again), and /readyz follows
// its readiness.
func TestLivezWatchdog(t *testing.T) {
	t.Parallel()
	app, opt, base := metricsApp(t, 1, map[string]string{"HELPER_READY": "1", "HELPER_WATCHDOG": "1"})
	app.Ready = appfile.Readiness{Kind: appfile.ReadyNotify}
	app.Watchdog = 300 * time.Millisecond
	app.Restart = appfile.Restart{Initial: 2 * time.Second, Max: 2 * time.Second, MinUptime: time.Minute}
	rec, _ := startRun(t, opt)
	from := 0
	rec.wait(t, &from, 20*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	rec.wait(t, &from, 20*time.Second, "watchdog", func(e Event) bool { return e.Kind == WorkerWatchdog })
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _, body := scrape(t, base+"/livez", "")
		if code == 503 && strings.Contains(body, "watchdog") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/livez still %d %q after every worker missed its watchdog", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, _, _ := scrape(t, base+"/readyz", ""); code != 503 {
		t.Errorf("/readyz %d with no worker ready, want 503", code)
	}
}

// TestMetricsStuckLoop: a loop that does not answer makes /livez (and
// /readyz) 503 within loopTimeout, instead of hanging the probe.
func TestMetricsStuckLoop(t *testing.T) {
	t.Parallel()
	m := &metricsServer{ctl: &ctlHandler{reqs: make(chan ctlRequest)}, last: map[workerKey]uint64{}} // nobody reads reqs
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: m}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	for _, path := range []string{"/livez", "/readyz", "/metrics"} {
		start := time.Now()
		code, _, body := scrape(t, "http://"+ln.Addr().String()+path, "")
		if took := time.Since(start); code != 503 || !strings.Contains(body, "did not answer") || took > loopTimeout+time.Second {
			t.Errorf("%s with a stuck loop: %d %q after %s; want 503 within %s", path, code, body, took, loopTimeout)
		}
	}
}

// TestMetricsHostile: connections that never send a request take at
// most metricsConns slots and are cut after metricsReadTimeout; meanwhile
// the dispatcher's control socket answers at once, oversized headers
// are refused, methods other than GET and HEAD too.
func TestMetricsHostile(t *testing.T) {
	t.Parallel()
	_, opt, base := metricsApp(t, 1, nil)
	rec, _ := startRun(t, opt)
	from := 0
	rec.wait(t, &from, 20*time.Second, "worker ready", func(e Event) bool { return e.Kind == WorkerReady })
	host := strings.TrimPrefix(base, "http://")
	var idle []net.Conn
	for range metricsConns {
		c, err := net.Dial("tcp", host)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
		t.Cleanup(func() { c.Close() })
	}
	start := time.Now()
	callStatus(t, opt.RuntimeDir+"/"+control.SocketName)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("control status took %s while the metrics listener was flooded", took)
	}
	// The idle ones are cut; then a scrape is served.
	code, _, _ := scrape(t, base+"/readyz", "")
	if took := time.Since(start); code != 200 || took > metricsReadTimeout+5*time.Second {
		t.Errorf("/readyz after idle connections: %d after %s", code, took)
	}
	for _, c := range idle[:1] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("an idle connection got an answer")
		}
	}
	req, _ := http.NewRequest(http.MethodGet, base+"/metrics", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 2*metricsHeaderBytes))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("oversized headers: %d, want 431", resp.StatusCode)
		}
	}
	resp, err := http.Post(base+"/metrics", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d, want 405", resp.StatusCode)
	}
	if code, _, _ := scrape(t, base+"/nothing", ""); code != 404 {
		t.Errorf("unknown path: %d, want 404", code)
	}
}

// TestMetricsReloadsAndReusePort: reloads are counted by result with the
// last one's duration, and in reuseport mode each worker's own socket
// has its queue series, labelled with its worker.
func TestMetricsReloadsAndReusePort(t *testing.T) {
	t.Parallel()
	app := testApp(t, 2, nil)
	app.Mode = appfile.ModeReusePort
	app.Metrics.Listen = appfile.Listener{Name: appfile.MetricsFDName, Address: "127.0.0.1:0", Kind: appfile.ListenTCP}
	slots, err := sockets.BindSlots(app, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, s := range slots {
			for _, f := range s {
				f.Close()
			}
		}
	})
	mf, maddr := tcpListener(t, appfile.MetricsFDName)
	fail := false
	var next *appfile.App
	var mu sync.Mutex
	load := func() (*appfile.App, error) {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			return nil, errors.New("broken on purpose")
		}
		if next != nil {
			return next, nil
		}
		return app, nil
	}
	rt := t.TempDir()
	rec, _ := startRun(t, Options{App: app, SlotListeners: slots, Metrics: mf, RuntimeDir: rt, Load: load})
	from := 0
	rec.wait(t, &from, 20*time.Second, "ready", func(e Event) bool { return e.Kind == Ready })
	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		rep, err := control.Call(ctx, rt+"/"+control.SocketName, control.Request{Cmd: control.CmdReload})
		if err == nil && !rep.OK {
			err = errors.New(rep.Error)
		}
		return err
	}
	if err := call(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	mu.Lock()
	fail = true
	mu.Unlock()
	if err := call(); err == nil {
		t.Fatalf("a reload whose app does not load succeeded")
	}
	moved := *app
	moved.Metrics.Listen.Address = "127.0.0.1:1"
	mu.Lock()
	fail, next = false, &moved
	mu.Unlock()
	if err := call(); err == nil || !strings.Contains(err.Error(), "[metrics] listen changed") {
		t.Fatalf("a reload that moves the metrics listener: %v, want a refusal", err)
	}
	_, _, body := scrape(t, "http://"+maddr+"/metrics", "")
	s := samples(t, body)
	for k, v := range map[string]float64{
		`cohort_reloads_total{app="t",result="ok"}`:     1,
		`cohort_reloads_total{app="t",result="failed"}`: 2,
		`cohort_reload_last_success{app="t"}`:           0,
		`cohort_generation{app="t"}`:                    2,
	} {
		if s[k] != v {
			t.Errorf("%s = %v, want %v", k, s[k], v)
		}
	}
	if d, ok := s[`cohort_reload_last_duration_seconds{app="t"}`]; !ok || d <= 0 || d > 30 {
		t.Errorf("last reload duration %v (present %v)", d, ok)
	}
	for _, w := range []string{"0", "1"} {
		k := `cohort_listener_queue_limit{app="t",listener="http",worker="` + w + `"}`
		if v, ok := s[k]; !ok || v <= 0 {
			t.Errorf("%s = %v (present %v)\n%s", k, v, ok, body)
		}
	}
}
