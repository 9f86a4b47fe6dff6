package bench

// The cost benchmark (issue 19, item 1): the CPU time the process that
// accepts and hands connections on spends per connection, read from
// /proc over a fixed number of new-connection requests, for cohort's
// round-robin dispatcher and, in the same run, Node's cluster SCHED_RR
// primary; cohort's shared mode (no balancer) gives the total CPU per
// request that round-robin is compared with.

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// CostConfig is one cost run. Root, Work, Cohort, Workers and Log are as
// in Config.
type CostConfig struct {
	Root, Work, Cohort string
	Workers            int
	// Conns is the number of clients (8), Total the requests of each
	// measured phase (20,000), Rate the paced phase's requests per second
	// (4,000); the other phase runs as fast as the setup answers.
	Conns int
	Total int64
	Rate  float64
	// Only limits the run to these setups (cost setup ids: node-cluster-rr,
	// cohort-rr-go, cohort-rr-go-1ms, cohort-shared-go); empty: all four.
	Only []string
	Log  func(format string, args ...any)
}

// CostRow is one setup in one phase.
type CostRow struct {
	ID, Name string
	Phase    string  // "paced" or "saturated"
	RPS      float64 // achieved
	Requests int64
	Errors   int64
	// Balancer is the balancing process's own CPU time (utime + stime of
	// the dispatcher or Node's primary, not of its workers) per request;
	// zero for shared mode, whose dispatcher hands nothing on. Total is
	// that of the whole tree (balancer and workers) per request.
	Balancer, Total time.Duration
	P99             time.Duration
	NA              string
}

// CostReport is a cost run.
type CostReport struct {
	Date             time.Time
	LoadBefore, Load string // /proc/loadavg before and after
	Rows             []CostRow
}

var costSetups = []string{"node-cluster-rr", "cohort-rr-go", "cohort-rr-go-1ms", "cohort-shared-go"}

// Cost runs the cost benchmark: for each setup, a warm-up, then Total
// requests paced at Rate, then Total requests as fast as they are
// answered, each on a new connection, with the CPU time of the balancing
// process and of its tree read from /proc before and after each phase.
func Cost(ctx context.Context, cc CostConfig) (*CostReport, error) {
	cfg := Config{Root: cc.Root, Work: cc.Work, Cohort: cc.Cohort, Workers: cc.Workers, QuietWait: -1}
	only := cc.Only
	if len(only) == 0 {
		only = costSetups
	}
	cfg.Only = only
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if cc.Conns <= 0 {
		cc.Conns = 8
	}
	if cc.Total <= 0 {
		cc.Total = 20000
	}
	if cc.Rate <= 0 {
		cc.Rate = 4000
	}
	logf := cc.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	r := &runner{cfg: cfg, procs: &procs{logDir: cfg.Work + "/logs"}, js: cfg.Root + "/bench/hello/hello.js", port: cfg.BasePort + 500, versions: map[string]string{}}
	defer r.procs.stopAll(3 * time.Second)
	if err := r.prepare(ctx); err != nil {
		return nil, err
	}
	rep := &CostReport{Date: time.Now(), LoadBefore: loadavg()}
	for _, id := range only {
		var s setup
		for _, x := range setups {
			if x.id == id {
				s = x
			}
		}
		if s.id == "" {
			return nil, fmt.Errorf("cost: unknown setup %q (one of %s)", id, strings.Join(costSetups, ", "))
		}
		rep.Rows = append(rep.Rows, r.cost(ctx, s, cc, logf)...)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	rep.Load = loadavg()
	return rep, nil
}

// cost measures setup s in both phases.
func (r *runner) cost(ctx context.Context, s setup, cc CostConfig, logf func(string, ...any)) []CostRow {
	defer r.procs.stopAll(5 * time.Second)
	addr := r.nextAddr()
	inst, err := s.start(r, addr)
	if err == nil {
		_, err = waitReady(ctx, addr, inst.alive, r.cfg.Workers, 20*time.Second, 3*time.Second)
	}
	if err != nil {
		return []CostRow{{ID: s.id, Name: s.name, NA: err.Error()}}
	}
	balancer := r.balancer(s)
	if balancer == 0 {
		return []CostRow{{ID: s.id, Name: s.name, NA: "no balancing process found"}}
	}
	// Warm up: the workers' runtimes, the TCP stack, the dispatcher's
	// goroutines and buffers.
	if _, err := r.load(ctx, Load{Addr: addr, Conns: cc.Conns, Duration: time.Second}); err != nil {
		return []CostRow{{ID: s.id, Name: s.name, NA: err.Error()}}
	}
	var rows []CostRow
	for _, phase := range []struct {
		name string
		rate float64
	}{{"paced", cc.Rate}, {"saturated", 0}} {
		row := CostRow{ID: s.id, Name: s.name, Phase: phase.name}
		self0, tree0 := r.treeCPU(balancer)
		res, err := r.load(ctx, Load{Addr: addr, Conns: cc.Conns, Total: cc.Total, Rate: phase.rate, Duration: 10 * time.Minute})
		self1, tree1 := r.treeCPU(balancer)
		if err != nil {
			row.NA = err.Error()
			rows = append(rows, row)
			continue
		}
		n := max(res.Requests, 1)
		row.RPS, row.Requests, row.Errors, row.P99 = res.RPS, res.Requests, res.Errors.Total(), res.P99
		if s.id != "cohort-shared-go" {
			row.Balancer = ticks(self1-self0) / time.Duration(n)
		}
		row.Total = ticks(tree1-tree0) / time.Duration(n)
		logf("%-18s %-9s %6.0f req/s, balancer %v/conn, total %v/req, p99 %v, %d errors", s.id, phase.name, row.RPS, row.Balancer, row.Total, row.P99.Round(time.Microsecond), row.Errors)
		rows = append(rows, row)
	}
	return rows
}

// balancer finds the process of s that accepts and hands connections on:
// the Node primary the harness started, or the dispatcher, which `cohort
// run` runs as its child (cmd/cohort/runparent.go).
func (r *runner) balancer(s setup) int {
	r.procs.mu.Lock()
	root := r.procs.list[len(r.procs.list)-1].cmd.Process.Pid
	r.procs.mu.Unlock()
	if !s.cohort {
		return root
	}
	for pid, st := range allProcs() {
		if st.ppid != root {
			continue
		}
		if exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe"); err == nil && exe == r.cfg.Cohort {
			return pid
		}
	}
	return 0
}

// treeCPU reads the balancing process's own CPU time and that of its
// whole tree (the workers too), in clock ticks.
func (r *runner) treeCPU(pid int) (self, tree uint64) {
	for p, st := range descendants(allProcs(), pid) {
		if p == pid {
			self = st.self
		}
		tree += st.cpu
	}
	return self, tree
}

// ticks converts clock ticks (USER_HZ, 100 on Linux) to a duration.
func ticks(n uint64) time.Duration { return time.Duration(n) * 10 * time.Millisecond }

// Markdown renders the report as a table with the ratios the issue asks
// for: Node's primary ÷ cohort's dispatcher per connection, and
// round-robin's total CPU per request ÷ shared mode's.
func (c *CostReport) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Cost run %s, load average %s before, %s after.\n\n", c.Date.UTC().Format(time.RFC3339), c.LoadBefore, c.Load)
	b.WriteString("| setup | phase | req/s | balancer CPU/conn | total CPU/req | p99 | errors |\n|---|---|--:|--:|--:|--:|--:|\n")
	get := func(id, phase string) *CostRow {
		for i := range c.Rows {
			if c.Rows[i].ID == id && c.Rows[i].Phase == phase && c.Rows[i].NA == "" {
				return &c.Rows[i]
			}
		}
		return nil
	}
	for _, row := range c.Rows {
		if row.NA != "" {
			fmt.Fprintf(&b, "| %s | | not available: %s | | | | |\n", row.Name, row.NA)
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.1f µs | %.1f µs | %v | %d |\n", row.Name, row.Phase, row.RPS,
			us(row.Balancer), us(row.Total), row.P99.Round(10*time.Microsecond), row.Errors)
	}
	b.WriteString("\n")
	for _, phase := range []string{"paced", "saturated"} {
		node, sh := get("node-cluster-rr", phase), get("cohort-shared-go", phase)
		for _, v := range []struct{ id, what string }{{"cohort-rr-go", ""}, {"cohort-rr-go-1ms", " (accept_interval 1ms)"}} {
			rr := get(v.id, phase)
			if node != nil && rr != nil && rr.Balancer > 0 {
				fmt.Fprintf(&b, "* %s: Node's primary ÷ cohort's dispatcher%s, CPU per connection: %.1f×\n", phase, v.what, float64(node.Balancer)/float64(rr.Balancer))
			}
			if rr != nil && sh != nil && sh.Total > 0 {
				fmt.Fprintf(&b, "* %s: round-robin%s ÷ shared, total CPU per request: %.2f×\n", phase, v.what, float64(rr.Total)/float64(sh.Total))
			}
		}
	}
	return b.String()
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
