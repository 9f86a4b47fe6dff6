package bench

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// PM2Version is the PM2 release the harness installs from npm.
const PM2Version = "7.0.4"

// Config is one harness run.
type Config struct {
	// Root is the repository root (bench/hello is under it).
	Root string
	// Work holds builds, the private PM2 install and PM2_HOME, and logs
	// (default Root/.cache/bench).
	Work string
	// Out receives results.md, results.svg and results.json; empty: none.
	Out string
	// Cohort is the cohort binary; empty: built from Root/cmd/cohort.
	Cohort string
	// Workers per cluster (N); 0: the number of CPUs.
	Workers int
	// Conns is the number of concurrent connections of the load (64).
	Conns int
	// Warmup and Duration of every row; Reload is the measured window of
	// a reload row (the reload starts one second into it).
	Warmup, Duration, Reload time.Duration
	// Repeat runs every throughput row this many times, in interleaved
	// rounds, and reports the median (default 1).
	Repeat int
	// LoadProcs is GOMAXPROCS while the load runs (0: half the CPUs, at
	// least 1), so the generator leaves CPU to the servers.
	LoadProcs int
	// QuietWait is how long each row waits, before it starts, for the
	// machine to be quiet (other processes using under 10 % of the CPUs
	// over one second); the row runs anyway afterwards. 0: 60 s; negative:
	// do not wait.
	QuietWait time.Duration
	// BasePort is the first port; every row gets its own.
	BasePort int
	// Only limits the run to these setup IDs (see Setups); empty: all.
	Only []string
	// Log receives progress lines (nil: discarded).
	Log io.Writer
}

func (c *Config) defaults() error {
	if c.Root == "" {
		return errors.New("config: Root is required")
	}
	root, err := filepath.Abs(c.Root)
	if err != nil {
		return fmt.Errorf("config: root: %w", err)
	}
	c.Root = root
	if c.Work == "" {
		c.Work = filepath.Join(c.Root, ".cache", "bench")
	}
	if c.Workers <= 0 {
		c.Workers = runtime.NumCPU()
	}
	if c.Conns <= 0 {
		c.Conns = 64
	}
	if c.Duration <= 0 {
		c.Duration = 5 * time.Second
	}
	if c.Warmup < 0 {
		c.Warmup = 0
	}
	if c.Reload <= 0 {
		c.Reload = max(c.Duration, 6*time.Second)
	}
	if c.QuietWait == 0 {
		c.QuietWait = time.Minute
	}
	if c.Repeat <= 0 {
		c.Repeat = 1
	}
	if c.LoadProcs <= 0 {
		c.LoadProcs = max(1, runtime.NumCPU()/2)
	}
	if c.BasePort <= 0 {
		c.BasePort = 18300
	}
	if c.Log == nil {
		c.Log = io.Discard
	}
	for _, id := range c.Only {
		if !slices.ContainsFunc(setups, func(s setup) bool { return s.id == id }) {
			return fmt.Errorf("config: unknown setup %q", id)
		}
	}
	return nil
}

// Setups lists the IDs and names of every row, in table order.
func Setups() [][2]string {
	var out [][2]string
	for _, s := range setups {
		out = append(out, [2]string{s.id, s.name})
	}
	return out
}

// setup is one row: how to start the hello app under one supervisor.
type setup struct {
	id, name string
	app      string // "node" or "go"
	single   bool   // one process, not N workers
	reload   bool   // a reload row
	cohort   bool   // failures to start mean "not available in this build"
	start    func(r *runner, addr string) (*instance, error)
}

// instance is a started setup.
type instance struct {
	alive  func() error                              // non-nil error once it died
	reload func(ctx context.Context) (string, error) // nil: not a reload row
}

var setups = []setup{
	{id: "node-alone", name: "Node alone (1 process)", app: "node", single: true, start: (*runner).nodeAlone},
	{id: "node-cluster-none", name: "Node cluster SCHED_NONE", app: "node", start: nodeCluster("none")},
	{id: "node-cluster-rr", name: "Node cluster SCHED_RR", app: "node", start: nodeCluster("rr")},
	{id: "pm2", name: "PM2 cluster -i N", app: "node", start: (*runner).pm2},
	{id: "cohort-shared-node", name: "cohort shared (Node)", app: "node", cohort: true, start: cohortRun("shared", "node")},
	{id: "cohort-reuseport-node", name: "cohort reuseport (Node)", app: "node", cohort: true, start: cohortRun("reuseport", "node")},
	{id: "go-alone", name: "Go alone (1 process)", app: "go", single: true, start: (*runner).goAlone},
	{id: "go-reuseport", name: "Go prefork SO_REUSEPORT", app: "go", start: (*runner).goReuseport},
	{id: "cohort-shared-go", name: "cohort shared (Go)", app: "go", cohort: true, start: cohortRun("shared", "go")},
	{id: "cohort-rr-go", name: "cohort round-robin (Go)", app: "go", cohort: true, start: cohortRun("round-robin", "go")},
	{id: "cohort-rr-go-1ms", name: "cohort round-robin, accept_interval 1ms (Go)", app: "go", cohort: true, start: cohortRunApp("round-robin", "go", `accept_interval = "1ms"`)},
	{id: "cohort-reuseport-go", name: "cohort reuseport (Go)", app: "go", cohort: true, start: cohortRun("reuseport", "go")},
	{id: "reload-node", name: "Node rolling restart (SIGHUP)", app: "node", reload: true, start: nodeCluster("rr")},
	{id: "reload-pm2", name: "pm2 reload", app: "node", reload: true, start: (*runner).pm2},
	{id: "reload-cohort", name: "cohort reload, shared (Node)", app: "node", reload: true, cohort: true, start: cohortRun("shared", "node")},
	{id: "reload-cohort-reuseport-node", name: "cohort reload, reuseport (Node)", app: "node", reload: true, cohort: true, start: cohortRun("reuseport", "node")},
	{id: "reload-cohort-reuseport-go", name: "cohort reload, reuseport (Go)", app: "go", reload: true, cohort: true, start: cohortRun("reuseport", "go")},
}

// runner carries one Run's state.
type runner struct {
	cfg    Config
	procs  *procs
	node   string
	hello  string // the Go hello binary
	js     string // hello.js
	pm2Bin string // the pm2 binary, once installed
	port   int
	// versions found while preparing, for the report.
	versions map[string]string
}

// Run runs every selected row and returns the report; with cfg.Out set it
// also writes results.md, results.svg and results.json there. Every
// process it starts is stopped before it returns, also when ctx is
// cancelled (Ctrl-C) or a row fails.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	r := &runner{
		cfg:      cfg,
		procs:    &procs{logDir: filepath.Join(cfg.Work, "logs")},
		js:       filepath.Join(cfg.Root, "bench", "hello", "hello.js"),
		port:     cfg.BasePort,
		versions: map[string]string{},
	}
	defer r.procs.stopAll(3 * time.Second)
	if err := r.prepare(ctx); err != nil {
		return nil, err
	}
	rep := &Report{
		Date:     time.Now(),
		LoadAvg:  loadavg(),
		Machine:  machine(cfg.Root, r.versions),
		Workers:  cfg.Workers,
		Conns:    cfg.Conns,
		Warmup:   cfg.Warmup,
		Duration: cfg.Duration,
		Reload:   cfg.Reload,
		Procs:    cfg.LoadProcs,
		Repeat:   cfg.Repeat,
	}
	// Throughput rows run Repeat times in interleaved rounds, so that a
	// slow spell of the machine hits every setup alike; each workload
	// keeps its median run. Reload rows run once, at the end.
	runs := map[string][]Row{}
	for round := range cfg.Repeat {
		r.logf("round %d/%d", round+1, cfg.Repeat)
		for _, s := range setups {
			if !r.selected(s) || s.reload {
				continue
			}
			runs[s.id] = append(runs[s.id], r.row(ctx, s))
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("benchmark interrupted at %s: %w", s.id, err)
			}
		}
	}
	for _, s := range setups {
		if !r.selected(s) {
			continue
		}
		if !s.reload {
			rep.Rows = append(rep.Rows, medianRow(runs[s.id]))
			continue
		}
		rep.Rows = append(rep.Rows, r.row(ctx, s))
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("benchmark interrupted at %s: %w", s.id, err)
		}
	}
	rep.Targets = targets(rep.Rows)
	if cfg.Out != "" {
		if err := rep.Write(cfg.Out); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

func (r *runner) logf(format string, args ...any) {
	fmt.Fprintf(r.cfg.Log, format+"\n", args...)
}

// prepare builds the Go hello app and cohort and finds node; PM2 is
// installed when its row first needs it.
func (r *runner) prepare(ctx context.Context) error {
	bin := filepath.Join(r.cfg.Work, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	node, err := exec.LookPath("node")
	if err != nil {
		return fmt.Errorf("prepare: node is needed for the Node rows: %w", err)
	}
	r.node = node
	r.versions["node"] = output(ctx, r.cfg.Root, node, "--version")
	r.versions["go"] = runtime.Version()
	if r.needs("go") {
		r.hello = filepath.Join(bin, "hello")
		if err := goBuild(ctx, r.cfg.Root, r.hello, "./bench/hello"); err != nil {
			return err
		}
	}
	if r.needsCohort() && r.cfg.Cohort == "" {
		r.cfg.Cohort = filepath.Join(bin, "cohort")
		if err := goBuild(ctx, r.cfg.Root, r.cfg.Cohort, "./cmd/cohort"); err != nil {
			return err
		}
	}
	if r.cfg.Cohort != "" {
		abs, err := filepath.Abs(r.cfg.Cohort)
		if err != nil {
			return fmt.Errorf("prepare: cohort binary: %w", err)
		}
		r.cfg.Cohort = abs
		r.versions["cohort"] = output(ctx, r.cfg.Root, "git", "describe", "--tags", "--always", "--dirty")
	}
	return nil
}

func (r *runner) selected(s setup) bool {
	return len(r.cfg.Only) == 0 || slices.Contains(r.cfg.Only, s.id)
}

func (r *runner) needs(app string) bool {
	return slices.ContainsFunc(setups, func(s setup) bool { return r.selected(s) && s.app == app })
}

func (r *runner) needsCohort() bool {
	return slices.ContainsFunc(setups, func(s setup) bool { return r.selected(s) && s.cohort })
}

func goBuild(ctx context.Context, root, out, pkg string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// output runs a command for a version string; "?" when it fails.
func output(ctx context.Context, dir, name string, args ...string) string {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	b, err := cmd.Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// nextAddr gives every started setup its own port, so TIME_WAIT sockets
// and slow exits of one row never touch the next.
// A port that is taken (another run, another program) is skipped.
func (r *runner) nextAddr() string {
	for range 100 {
		r.port++
		addr := "127.0.0.1:" + strconv.Itoa(r.port)
		if ln, err := net.Listen("tcp", addr); err == nil {
			ln.Close()
			return addr
		}
	}
	return "127.0.0.1:" + strconv.Itoa(r.port)
}

// row starts s, measures both workloads (or the reload) and stops it.
func (r *runner) row(ctx context.Context, s setup) Row {
	row := Row{ID: s.id, Name: s.name, App: s.app, Workers: r.cfg.Workers, Reload: s.reload}
	if s.single {
		row.Workers = 1
	}
	defer r.procs.stopAll(5 * time.Second)
	r.waitQuiet(ctx, s.id)
	addr := r.nextAddr()
	r.logf("%-20s starting on %s", s.id, addr)
	inst, err := s.start(r, addr)
	var seen map[string]bool
	if err == nil {
		seen, err = waitReady(ctx, addr, inst.alive, row.Workers, 20*time.Second, 3*time.Second)
	}
	if err != nil {
		row.NA = notAvailable(s, err)
		r.logf("%-20s %s", s.id, row.NA)
		return row
	}
	for _, keep := range []bool{true, false} {
		if ctx.Err() != nil {
			break
		}
		var m *Measurement
		if s.reload {
			m = r.measureReload(ctx, addr, inst, keep, seen)
		} else {
			m = r.measure(ctx, addr, keep, row.Workers)
		}
		if err := inst.alive(); err != nil && m.NA == "" {
			m.Note = strings.TrimSpace(m.Note + " " + err.Error())
		}
		if keep {
			row.KeepAlive = m
		} else {
			row.Close = m
		}
		r.logf("%-20s %s", s.id, m.summary(keep, row.Workers))
		if s.reload && strings.HasPrefix(m.NA, "not available") {
			row.NA, row.KeepAlive, row.Close = m.NA, nil, nil
			break
		}
	}
	return row
}

// medianRow merges the runs of one setup: per workload the run with the
// median req/s, with every run's req/s in Runs. A setup is not available
// only if no run worked.
func medianRow(runs []Row) Row {
	var out Row
	for _, r := range runs {
		if out.ID == "" || (out.NA != "" && r.NA == "") {
			out = r
		}
	}
	if out.NA != "" {
		return out
	}
	for _, keep := range []bool{true, false} {
		var ms []*Measurement
		for _, r := range runs {
			if m := r.get(keep); r.NA == "" && m.ok() {
				ms = append(ms, m)
			}
		}
		if len(ms) == 0 {
			continue
		}
		slices.SortFunc(ms, func(a, b *Measurement) int { return cmp.Compare(a.RPS, b.RPS) })
		med := *ms[(len(ms)-1)/2]
		med.Runs = nil
		for _, m := range ms {
			med.Runs = append(med.Runs, m.RPS)
		}
		if keep {
			out.KeepAlive = &med
		} else {
			out.Close = &med
		}
	}
	return out
}

// waitQuiet waits up to cfg.QuietWait until other processes use less than
// 10 % of the CPUs over a second, so that other work on the machine does
// not land in the figures; each row also reports what it saw (Other).
func (r *runner) waitQuiet(ctx context.Context, id string) {
	if r.cfg.QuietWait < 0 {
		return
	}
	deadline := time.Now().Add(r.cfg.QuietWait)
	for waited := false; ctx.Err() == nil; waited = true {
		cpu := cpuMeter{roots: r.procs.roots}
		cpu.start()
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
		o := cpu.other()
		if o < 0.10 {
			return
		}
		if time.Now().After(deadline) {
			r.logf("%-20s the machine is busy (other processes use %.0f %% of the CPUs): measuring anyway", id, 100*o)
			return
		}
		if !waited {
			r.logf("%-20s waiting up to %v for the machine to be quiet (other processes use %.0f %% of the CPUs)", id, r.cfg.QuietWait, 100*o)
		}
	}
}

// notAvailable phrases a setup's failure to start.
func notAvailable(s setup, err error) string {
	if s.cohort {
		return "not available in this build: " + err.Error()
	}
	return "failed: " + err.Error()
}

// load runs one Load with GOMAXPROCS lowered for the generator.
func (r *runner) load(ctx context.Context, l Load) (Result, error) {
	prev := runtime.GOMAXPROCS(r.cfg.LoadProcs)
	defer runtime.GOMAXPROCS(prev)
	return Apply(ctx, l)
}

func (r *runner) measure(ctx context.Context, addr string, keep bool, workers int) *Measurement {
	cpu := cpuMeter{roots: r.procs.roots}
	cpu.start()
	res, err := r.load(ctx, Load{Addr: addr, Conns: r.cfg.Conns, KeepAlive: keep, Warmup: r.cfg.Warmup, Duration: r.cfg.Duration})
	if err != nil {
		return &Measurement{NA: "failed: " + err.Error()}
	}
	return &Measurement{Result: res, Spread: res.Spread(workers), Other: cpu.other()}
}

// measureReload loads addr for cfg.Reload and reloads the instance one
// second into the window; the row's errors are those of the whole window.
func (r *runner) measureReload(ctx context.Context, addr string, inst *instance, keep bool, before map[string]bool) *Measurement {
	type loaded struct {
		res Result
		err error
	}
	cpu := cpuMeter{roots: r.procs.roots}
	cpu.start()
	done := make(chan loaded, 1)
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { // owned by measureReload: received below
		res, err := r.load(lctx, Load{Addr: addr, Conns: r.cfg.Conns, KeepAlive: keep, Warmup: r.cfg.Warmup, Duration: r.cfg.Reload})
		done <- loaded{res, err}
	}()
	m := &Measurement{}
	select {
	case <-time.After(r.cfg.Warmup + time.Second):
		t0 := time.Now()
		note, err := inst.reload(ctx)
		took := time.Since(t0).Round(10 * time.Millisecond)
		switch {
		case errors.Is(err, errUnavailable):
			m.NA = "not available in this build: " + err.Error()
		case err != nil:
			m.Note = fmt.Sprintf("reload failed after %v: %v", took, err)
		case took > r.cfg.Reload-time.Second:
			m.Note = fmt.Sprintf("reload took %v, longer than the window; %s", took, note)
		default:
			m.Note = fmt.Sprintf("reload took %v; %s", took, note)
		}
	case <-ctx.Done():
	}
	l := <-done
	if l.err != nil {
		return &Measurement{NA: "failed: " + l.err.Error()}
	}
	m.Result = l.res
	m.Other = cpu.other()
	replaced := 0
	for k := range l.res.PerWorker {
		if !before[k] {
			replaced++
		}
	}
	if m.NA == "" {
		m.Note = strings.TrimSpace(fmt.Sprintf("%s; %d new workers answered", m.Note, replaced))
	}
	// The workers are replaced: load the new ones for the next workload.
	clear(before)
	for k := range l.res.PerWorker {
		before[k] = true
	}
	return m
}

// errUnavailable marks a reload the build does not support.
var errUnavailable = errors.New("reload not supported")

// procAlive reports p's exit with the last lines of its log (cohort's
// own error is its last line; Node's is above its version line).
func procAlive(p *proc, lines int) func() error {
	return func() error {
		if p.exited() {
			return fmt.Errorf("%s (%w: %v)", p.tail(lines), errExited, p.err)
		}
		return nil
	}
}

func (r *runner) nodeAlone(addr string) (*instance, error) {
	p, err := r.procs.start("node-alone", []string{r.node, r.js}, []string{"BENCH_ADDR=" + addr}, r.cfg.Root)
	if err != nil {
		return nil, err
	}
	return &instance{alive: procAlive(p, 2)}, nil
}

// nodeCluster runs hello.js as a cluster primary with Node's scheduling
// policy; SIGHUP makes it roll its workers.
func nodeCluster(policy string) func(r *runner, addr string) (*instance, error) {
	return func(r *runner, addr string) (*instance, error) {
		name := "node-cluster-" + policy
		env := []string{"BENCH_ADDR=" + addr, "BENCH_CLUSTER=" + strconv.Itoa(r.cfg.Workers), "NODE_CLUSTER_SCHED_POLICY=" + policy}
		p, err := r.procs.start(name, []string{r.node, r.js}, env, r.cfg.Root)
		if err != nil {
			return nil, err
		}
		inst := &instance{alive: procAlive(p, 2)}
		inst.reload = func(ctx context.Context) (string, error) {
			before := strings.Count(readFile(p.log), "reload done")
			if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				return "", fmt.Errorf("SIGHUP to the primary: %w", err)
			}
			deadline := time.Now().Add(30 * time.Second)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				if strings.Count(readFile(p.log), "reload done") > before {
					return "primary: " + lastLine(p.log, "reload done"), nil
				}
				if err := inst.alive(); err != nil {
					return "", err
				}
				time.Sleep(20 * time.Millisecond)
			}
			return "", errors.New("the primary did not report 'reload done' within 30s")
		}
		return inst, nil
	}
}

func (r *runner) goAlone(addr string) (*instance, error) {
	p, err := r.procs.start("go-alone", []string{r.hello}, []string{"BENCH_ADDR=" + addr}, r.cfg.Root)
	if err != nil {
		return nil, err
	}
	return &instance{alive: procAlive(p, 2)}, nil
}

func (r *runner) goReuseport(addr string) (*instance, error) {
	p, err := r.procs.start("go-reuseport", []string{r.hello, "-prefork", strconv.Itoa(r.cfg.Workers)}, []string{"BENCH_ADDR=" + addr}, r.cfg.Root)
	if err != nil {
		return nil, err
	}
	return &instance{alive: procAlive(p, 2)}, nil
}

// cohortRun runs the hello app under `cohort run` in mode. SIGHUP to the
// dispatcher is its rolling reload; a build without it either exits on the
// signal or keeps the old workers, and the reload row says so.
func cohortRun(mode, app string) func(r *runner, addr string) (*instance, error) {
	return cohortRunApp(mode, app, "")
}

// cohortRunApp is cohortRun with settings that have no flag (TOML lines,
// extra): `cohort run` then reads the app from a file in the work
// directory.
func cohortRunApp(mode, app, extra string) func(r *runner, addr string) (*instance, error) {
	return func(r *runner, addr string) (*instance, error) {
		cmd := []string{r.node, r.js}
		if app == "go" {
			cmd = []string{r.hello}
		}
		argv := append([]string{r.cfg.Cohort, "run", "--listen", addr, "--workers", strconv.Itoa(r.cfg.Workers), "--mode", mode, "--"}, cmd...)
		if extra != "" {
			quoted := make([]string, len(cmd))
			for i, a := range cmd {
				quoted[i] = strconv.Quote(a) // a TOML basic string, for the paths the harness builds
			}
			toml := fmt.Sprintf("command = [%s]\nworkers = %d\nmode = %q\n%s\n\n[[listen]]\nname = \"http\"\naddress = %q\n",
				strings.Join(quoted, ", "), r.cfg.Workers, mode, extra, addr)
			file := filepath.Join(r.cfg.Work, "hello.toml")
			if err := os.WriteFile(file, []byte(toml), 0o644); err != nil {
				return nil, fmt.Errorf("app file: %w", err)
			}
			argv = []string{r.cfg.Cohort, "run", file}
		}
		p, err := r.procs.start("cohort-"+mode+"-"+app, argv, nil, r.cfg.Root)
		if err != nil {
			return nil, err
		}
		inst := &instance{alive: procAlive(p, 1)}
		inst.reload = func(ctx context.Context) (string, error) {
			return cohortReload(ctx, p, addr, r.cfg.Workers)
		}
		return inst, nil
	}
}

// cohortReload sends SIGHUP to the dispatcher and waits until only new
// workers answer: 4N probes in a row from workers that did not answer
// before.
func cohortReload(ctx context.Context, p *proc, addr string, workers int) (string, error) {
	old := map[string]bool{}
	for range 8 * workers {
		if body, err := probe(addr, time.Second); err == nil {
			old[body] = true
		}
	}
	if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		return "", fmt.Errorf("SIGHUP to the dispatcher: %w", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	fresh := 0
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if p.exited() {
			return "", fmt.Errorf("%w: the dispatcher exited on SIGHUP (%s)", errUnavailable, p.tail(2))
		}
		body, err := probe(addr, time.Second)
		switch {
		case err != nil:
			fresh = 0
		case old[body]:
			fresh = 0
		default:
			fresh++
		}
		if fresh >= 4*workers {
			return "only new workers answer", nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "", fmt.Errorf("%w: SIGHUP did not replace the workers within 20s", errUnavailable)
}

// pm2 installs the pinned PM2 into Work/pm2 (once), starts a private
// daemon (PM2_HOME under Work) and the app in cluster mode. The daemon is
// stopped with `pm2 kill` and then by its pid.
func (r *runner) pm2(addr string) (*instance, error) {
	if err := r.installPM2(); err != nil {
		return nil, err
	}
	home := filepath.Join(r.cfg.Work, "pm2-home")
	env := append(os.Environ(), "PM2_HOME="+home, "BENCH_ADDR="+addr)
	env = slices.DeleteFunc(env, func(s string) bool { return strings.HasPrefix(s, "NODE_CLUSTER_SCHED_POLICY=") })
	pm2 := func(args ...string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, r.pm2Bin, args...)
		cmd.Env = env
		cmd.Dir = r.cfg.Root
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("pm2 %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(lastLines(string(b), 3)))
		}
		return nil
	}
	_ = pm2("kill") // a daemon left by an interrupted run
	killDaemon(home)
	if err := os.RemoveAll(home); err != nil {
		return nil, fmt.Errorf("pm2: fresh PM2_HOME: %w", err)
	}
	r.procs.onStop(func() {
		_ = pm2("kill")
		killDaemon(home)
	})
	if err := pm2("start", r.js, "-i", strconv.Itoa(r.cfg.Workers), "--name", "bench-hello"); err != nil {
		return nil, err
	}
	pid := daemonPID(home)
	if pid <= 0 {
		return nil, errors.New("pm2: no daemon pid in PM2_HOME")
	}
	r.procs.addRoot(pid)
	inst := &instance{alive: func() error {
		if syscall.Kill(pid, 0) != nil {
			return fmt.Errorf("pm2 daemon %d: %w", pid, errExited)
		}
		return nil
	}}
	inst.reload = func(ctx context.Context) (string, error) {
		if err := pm2("reload", "bench-hello"); err != nil {
			return "", err
		}
		return "`pm2 reload` returned", nil
	}
	return inst, nil
}

func (r *runner) installPM2() error {
	prefix := filepath.Join(r.cfg.Work, "pm2")
	r.pm2Bin = filepath.Join(prefix, "node_modules", ".bin", "pm2")
	var pkg struct{ Version string }
	if b, err := os.ReadFile(filepath.Join(prefix, "node_modules", "pm2", "package.json")); err == nil {
		_ = json.Unmarshal(b, &pkg)
	}
	if pkg.Version != PM2Version {
		if _, err := exec.LookPath("npm"); err != nil {
			return fmt.Errorf("install pm2: npm is needed (bench/deps.sh installs it): %w", err)
		}
		r.logf("installing pm2@%s into %s (npm)", PM2Version, prefix)
		cmd := exec.Command("npm", "install", "--prefix", prefix, "--no-audit", "--no-fund", "--loglevel=error", "pm2@"+PM2Version)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("npm install pm2@%s: %w: %s", PM2Version, err, lastLines(string(b), 5))
		}
	}
	r.versions["pm2"] = PM2Version
	return nil
}

// daemonPID reads the PM2 daemon's pid from PM2_HOME; 0 if there is none.
func daemonPID(home string) int {
	b, err := os.ReadFile(filepath.Join(home, "pm2.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// killDaemon kills the PM2 daemon of home and its process group (its
// cluster workers), by the pid it recorded, if that pid is still a PM2
// process.
func killDaemon(home string) {
	pid := daemonPID(home)
	if pid <= 0 {
		return
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), "PM2") {
		return
	}
	below := descendants(allProcs(), pid)
	if pgid, err := syscall.Getpgid(pid); err == nil && pgid == pid {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	} else {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	killSurvivors(below, 0)
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// lastLine returns the last line of the file at path that contains s.
func lastLine(path, s string) string {
	lines := strings.Split(readFile(path), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], s) {
			return strings.TrimSpace(lines[i])
		}
	}
	return ""
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], " | ")
}
