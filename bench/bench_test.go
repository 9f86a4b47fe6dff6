package bench

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// TestSmoke runs the harness for real on two Node rows (the app alone and
// Node's cluster) for a second each and checks the table and the chart.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts node processes and loads them for a few seconds")
	}
	testtool.Need(t, "node")
	out := t.TempDir()
	var log bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	rep, err := Run(ctx, Config{
		Root:      "..",
		Work:      t.TempDir(),
		Out:       out,
		Workers:   2,
		Conns:     8,
		Warmup:    200 * time.Millisecond,
		Duration:  time.Second,
		BasePort:  18700,
		QuietWait: -1,
		Only:      []string{"node-alone", "node-cluster-rr"},
		Log:       &log,
	})
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, log.String())
	}
	if len(rep.Rows) != 2 {
		t.Fatalf("got %d rows, want 2", len(rep.Rows))
	}
	for _, r := range rep.Rows {
		if r.NA != "" {
			t.Fatalf("%s: %s\n%s", r.ID, r.NA, log.String())
		}
		for _, m := range []*Measurement{r.KeepAlive, r.Close} {
			if !m.ok() || m.RPS <= 0 || m.Requests == 0 {
				t.Errorf("%s: no requests measured: %+v", r.ID, m)
			}
		}
	}
	if w := len(rep.Rows[1].KeepAlive.PerWorker); w != 2 {
		t.Errorf("cluster row: %d workers answered, want 2: %v", w, rep.Rows[1].KeepAlive.PerWorker)
	}

	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"Node alone (1 process)", "Node cluster SCHED_RR"} {
		line := tableLine(string(md), name)
		if line == "" {
			t.Fatalf("results.md has no row %q:\n%s", name, md)
		}
		cells := strings.Split(line, "|")
		if len(cells) < 8 || strings.TrimSpace(cells[2]) == "0" || strings.TrimSpace(cells[7]) == "0" {
			t.Errorf("row %q has no req/s: %s", name, line)
		}
	}
	svg, err := os.ReadFile(filepath.Join(out, "results.svg"))
	if err != nil {
		t.Fatal(err)
	}
	if root, err := parseXML(svg); err != nil || root != "svg" {
		t.Errorf("results.svg: root %q, err %v", root, err)
	}
}

func tableLine(md, name string) string {
	for _, l := range strings.Split(md, "\n") {
		if strings.HasPrefix(l, "| "+name+" |") {
			return l
		}
	}
	return ""
}

// parseXML checks that b is well-formed XML and returns its root element.
func parseXML(b []byte) (string, error) {
	d := xml.NewDecoder(bytes.NewReader(b))
	root := ""
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			return root, nil
		}
		if err != nil {
			return root, err
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
}

// serveHello serves "worker <i>" bodies from n servers sharing one
// listener, closing a keep-alive connection after every closeEvery
// responses if closeEvery > 0 (without telling the client).
func serveHello(t *testing.T, n int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		body := fmt.Sprintf("worker %d\n", i)
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			io.WriteString(w, body)
		})}
		go srv.Serve(ln) // stopped by the cleanup below
		t.Cleanup(func() { srv.Close() })
	}
	return ln.Addr().String()
}

func TestApply(t *testing.T) {
	addr := serveHello(t, 2)
	for _, keep := range []bool{true, false} {
		res, err := Apply(context.Background(), Load{Addr: addr, Conns: 4, KeepAlive: keep, Warmup: 50 * time.Millisecond, Duration: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if res.Requests == 0 || res.Errors.Total() != 0 || res.P50 <= 0 || res.P99 < res.P50 {
			t.Fatalf("keep-alive %v: %+v", keep, res)
		}
		var sum int64
		for k, n := range res.PerWorker {
			if !strings.HasPrefix(k, "worker ") {
				t.Errorf("worker key %q", k)
			}
			sum += n
		}
		if sum != res.Requests {
			t.Errorf("per-worker counts add up to %d, want %d", sum, res.Requests)
		}
	}
}

func TestApplyOnlyLoopback(t *testing.T) {
	for _, addr := range []string{"10.0.0.1:80", "localhost:80", "[::1]:80", "127.0.0.1:x", "example.com:80"} {
		if _, err := Apply(context.Background(), Load{Addr: addr, Conns: 1, Duration: time.Millisecond}); err == nil {
			t.Errorf("Apply(%q) did not refuse", addr)
		}
	}
}

// TestApplyRetriesClosedKeepAlive: a server that closes idle keep-alive
// connections without "Connection: close" costs retries, not errors.
func TestApplyRetriesClosedKeepAlive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var served atomic.Int64
	go func() { // stopped by ln.Close
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // ends with the connection
				defer c.Close()
				buf := make([]byte, 4096)
				for range 3 { // three responses, then a silent close
					if _, err := c.Read(buf); err != nil {
						return
					}
					served.Add(1)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
		}
	}()
	res, err := Apply(context.Background(), Load{Addr: ln.Addr().String(), Conns: 2, KeepAlive: true, Duration: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests == 0 || res.Errors.Retried == 0 || res.Errors.Total() != 0 {
		t.Fatalf("got %+v, want requests, retries and no errors", res)
	}
}

func TestSpread(t *testing.T) {
	r := Result{PerWorker: map[string]int64{"a": 110, "b": 100}}
	if s := r.Spread(2); math.Abs(s-1.1) > 1e-9 {
		t.Errorf("spread %v, want 1.1", s)
	}
	if s := r.Spread(3); !math.IsInf(s, 1) {
		t.Errorf("spread with an idle worker %v, want +Inf", s)
	}
}

func TestTargets(t *testing.T) {
	m := func(rps float64) *Measurement {
		return &Measurement{Result: Result{RPS: rps}, Spread: 1.05}
	}
	rows := []Row{
		{ID: "node-cluster-none", KeepAlive: m(100), Close: m(100)},
		{ID: "node-cluster-rr", KeepAlive: m(90), Close: m(50)},
		{ID: "pm2", KeepAlive: m(80), Close: m(40)},
		{ID: "cohort-shared-node", KeepAlive: m(99), Close: m(120)},
		{ID: "cohort-shared-go", KeepAlive: m(100), Close: m(100)},
		{ID: "cohort-rr-go", NA: "not available in this build: no"},
		{ID: "cohort-reuseport-go", KeepAlive: m(80), Close: m(97)},
		{ID: "reload-cohort", Reload: true, KeepAlive: m(1), Close: m(1)},
		{ID: "reload-cohort-reuseport-node", Name: "rp node", Reload: true, KeepAlive: m(1), Close: m(1)},
		{ID: "reload-cohort-reuseport-go", Name: "rp go", Reload: true, KeepAlive: m(1), Close: m(1)},
	}
	rows[len(rows)-1].Close.Errors.Connect = 3
	got, why := map[string]string{}, map[string]string{}
	for _, tg := range targets(rows) {
		got[tg.Name], why[tg.Name] = tg.Result(), tg.Why
	}
	reuseportReload := "cohort reload, reuseport: 0 errors under load (Node and Go, both workloads)"
	for name, want := range map[string]string{
		"cohort round-robin ≥ 90 % of shared (Go, new-conn; issue 19)": "n/a",
		"cohort shared (Node) ≥ Node SCHED_NONE, keep-alive":           "MISS",
		"cohort shared (Node) ≥ Node SCHED_NONE, new-conn":             "PASS",
		"cohort shared (Node) ≥ PM2, keep-alive":                       "PASS",
		"cohort reload: 0 errors under load (both workloads)":          "PASS",
		"cohort reuseport spread max/min ≤ 1.2 (Go, new-conn)":         "PASS",
		"cohort reuseport ≥ 95 % of shared (Go, new-conn)":             "PASS",
		"cohort reuseport ≥ 95 % of shared (Go, keep-alive)":           "MISS",
		reuseportReload: "MISS",
	} {
		if got[name] != want {
			t.Errorf("%s: %s, want %s (all: %v)", name, got[name], want, got)
		}
	}
	if w := why[reuseportReload]; !strings.Contains(w, "rp go, new-conn: 3 connect") || strings.Contains(w, "rp node") {
		t.Errorf("reuseport reload MISS says %q, want only the Go row's new-conn errors", w)
	}

	// Without the Go reuseport reload row the target is not measured, not
	// passed on the Node row alone.
	for _, tg := range targets(rows[:len(rows)-1]) {
		if tg.Name == reuseportReload && !tg.NA {
			t.Errorf("reuseport reload without the Go row: %s, want n/a", tg.Result())
		}
	}
}

// TestModesMarkdown: the modes table puts shared, round-robin and reuseport
// of one app side by side with ratios to shared, and leaves out an app
// with its shared row only or without it.
func TestModesMarkdown(t *testing.T) {
	m := func(rps, spread float64) *Measurement {
		return &Measurement{Result: Result{RPS: rps}, Spread: spread}
	}
	rep := &Report{Rows: []Row{
		{ID: "cohort-shared-node", Name: "cohort shared (Node)", Workers: 2, KeepAlive: m(100, 1), Close: m(100, 1)},
		{ID: "cohort-shared-go", Name: "cohort shared (Go)", Workers: 2, KeepAlive: m(200, 3), Close: m(100, 1.5)},
		{ID: "cohort-rr-go", Name: "cohort round-robin (Go)", Workers: 2, NA: "not available in this build: x"},
		{ID: "cohort-reuseport-go", Name: "cohort reuseport (Go)", Workers: 2, KeepAlive: m(190, 1.3), Close: m(98, 1.01)},
	}}
	md := rep.modesMarkdown()
	for _, want := range []string{
		"| cohort shared (Go) | 100 | 1.00 | 1.50 | 200 | 1.00 | 3.00 |",
		"| cohort round-robin (Go) | not available in this build: x |",
		"| cohort reuseport (Go) | 98 | 0.98 | 1.01 | 190 | 0.95 | 1.30 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("modes table lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "Node") {
		t.Errorf("modes table has a Node table without a second Node mode:\n%s", md)
	}
	// Without the shared row (-only) there is no baseline: no table.
	rep = &Report{Rows: []Row{{ID: "cohort-reuseport-node", Name: "cohort reuseport (Node)", Workers: 2, KeepAlive: m(1, 1), Close: m(1, 1)}}}
	if md := rep.modesMarkdown(); md != "" {
		t.Errorf("modes table without shared rows:\n%s", md)
	}
}

// TestCPUMeterCountsReapedChildren: a child of the harness that burns CPU
// and exits inside the window is the harness's time, not other processes'
// (a reload replaces every worker in the middle of its window).
func TestCPUMeterCountsReapedChildren(t *testing.T) {
	if os.Getenv("BENCH_BURN_CPU") == "1" {
		burn(300 * time.Millisecond)
		return
	}
	m := cpuMeter{roots: func() []int { return []int{os.Getpid()} }}
	m.start()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCPUMeterCountsReapedChildren$")
	cmd.Env = append(os.Environ(), "BENCH_BURN_CPU=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("burner: %v\n%s", err, out)
	}
	child := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	// /proc counts in USER_HZ ticks, 100 a second on Linux.
	ours := time.Duration(m.ourCPU()-m.ours) * 10 * time.Millisecond
	if ours < child*8/10 {
		t.Errorf("the harness's tree used %v in the window, its reaped child alone %v", ours, child)
	}
}

// burn spins until the process has used d of CPU time.
func burn(d time.Duration) {
	for x := 0; ; x++ {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		if time.Duration(ru.Utime.Nano()+ru.Stime.Nano()) >= d {
			return
		}
		for i := range 1 << 16 {
			x ^= i
		}
	}
}
