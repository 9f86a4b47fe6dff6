package bench

import (
	"fmt"
	"slices"
	"strings"
)

// Target is one of the goals, stated as a ratio of two rows of
// the same run.
type Target struct {
	Name      string  `json:"name"`
	Ratio     float64 `json:"ratio"` // 0 when not measured (NA)
	RatioText string  `json:"ratio_text"`
	Pass      bool    `json:"pass"`
	NA        bool    `json:"na,omitempty"`
	Why       string  `json:"why,omitempty"`
}

// Result is "PASS", "MISS" or "n/a".
func (t Target) Result() string {
	switch {
	case t.NA:
		return "n/a"
	case t.Pass:
		return "PASS"
	}
	return "MISS"
}

// noise is the run-to-run variation of a throughput ratio on a small
// machine where the load generator shares the CPUs; a MISS within it says
// so.
const noise = 0.05

func find(rows []Row, id string) *Row {
	for i := range rows {
		if rows[i].ID == id {
			return &rows[i]
		}
	}
	return nil
}

// pick returns a workload of a row, or why it is missing.
func pick(rows []Row, id string, keep bool) (*Measurement, string) {
	r := find(rows, id)
	switch {
	case r == nil:
		return nil, id + " was not run"
	case r.NA != "":
		return nil, r.Name + ": " + r.NA
	}
	m := r.Close
	if keep {
		m = r.KeepAlive
	}
	if !m.ok() {
		if m == nil {
			return nil, r.Name + " was not measured"
		}
		return nil, r.Name + ": " + m.NA
	}
	return m, ""
}

func workload(keep bool) string {
	if keep {
		return "keep-alive"
	}
	return "new-conn"
}

// targets evaluates the targets on rows.
func targets(rows []Row) []Target {
	var ts []Target
	na := func(name, why string) Target {
		return Target{Name: name, RatioText: "—", NA: true, Why: why}
	}

	// Round-robin penalty: cohort's (Go app) against Node's (Node app),
	// new-connection load, where the hop costs most.
	{
		name := "cohort round-robin penalty < Node's: (cohort rr ÷ shared, Go) > (Node SCHED_RR ÷ SCHED_NONE), new-conn"
		rr, why1 := pick(rows, "cohort-rr-go", false)
		sh, why2 := pick(rows, "cohort-shared-go", false)
		nrr, why3 := pick(rows, "node-cluster-rr", false)
		nnone, why4 := pick(rows, "node-cluster-none", false)
		if why := firstOf(why1, why2, why3, why4); why != "" {
			ts = append(ts, na(name, why))
		} else {
			c, n := rr.RPS/sh.RPS, nrr.RPS/nnone.RPS
			t := Target{Name: name, Ratio: c / n, RatioText: fmt.Sprintf("%.2f vs %.2f", c, n), Pass: c > n}
			if !t.Pass {
				t.Why = fmt.Sprintf("cohort loses %.0f %% to the hop, Node %.0f %%", 100*(1-c), 100*(1-n))
			}
			ts = append(ts, busy(t, rr, sh, nrr, nnone))
		}
	}
	for _, v := range []struct{ id, name, why string }{
		{"cohort-rr-go", "cohort round-robin ≥ 90 % of shared (Go, new-conn; issue 19)", "the dispatcher's accept+SCM_RIGHTS hop costs more than 10 % here"},
		{"cohort-rr-go-1ms", "cohort round-robin, accept_interval 1ms ≥ 90 % of shared (Go, new-conn; issue 19)", "the hop costs more than 10 % here even with fewer wake-ups"},
	} {
		rr, why1 := pick(rows, v.id, false)
		sh, why2 := pick(rows, "cohort-shared-go", false)
		if why := firstOf(why1, why2); why != "" {
			ts = append(ts, na(v.name, why))
		} else {
			ts = append(ts, busy(atLeast(v.name, rr.RPS/sh.RPS, 0.90, v.why), rr, sh))
		}
	}
	for _, base := range []struct{ id, name string }{{"node-cluster-none", "Node SCHED_NONE"}, {"pm2", "PM2"}} {
		for _, keep := range []bool{true, false} {
			name := fmt.Sprintf("cohort shared (Node) ≥ %s, %s", base.name, workload(keep))
			c, why1 := pick(rows, "cohort-shared-node", keep)
			b, why2 := pick(rows, base.id, keep)
			if why := firstOf(why1, why2); why != "" {
				ts = append(ts, na(name, why))
				continue
			}
			ts = append(ts, busy(atLeast(name, c.RPS/b.RPS, 1, ""), c, b))
		}
	}
	for _, keep := range []bool{true, false} {
		name := "cohort round-robin spread max/min ≤ 1.1, " + workload(keep)
		m, why := pick(rows, "cohort-rr-go", keep)
		if why != "" {
			ts = append(ts, na(name, why))
			continue
		}
		t := Target{Name: name, Ratio: m.Spread, RatioText: spread(m.Spread), Pass: m.Spread > 0 && m.Spread <= 1.1}
		if !t.Pass {
			t.Why = perWorkerText(m)
		}
		ts = append(ts, t)
	}
	ts = append(ts, reloadErrors("cohort reload: 0 errors under load (both workloads)", rows, "reload-cohort"))

	// Issue #9, reuseport mode. The kernel picks a socket by a hash of the
	// connection's 4-tuple, so with a new source port per request the
	// spread should be close to 1; keep-alive pins 64 connections to
	// sockets once, which is a coin toss per connection and no target.
	{
		name := "cohort reuseport spread max/min ≤ 1.2 (Go, new-conn)"
		m, why := pick(rows, "cohort-reuseport-go", false)
		if why != "" {
			ts = append(ts, na(name, why))
		} else {
			t := Target{Name: name, Ratio: m.Spread, RatioText: spread(m.Spread), Pass: m.Spread > 0 && m.Spread <= 1.2}
			if !t.Pass {
				t.Why = perWorkerText(m)
			}
			ts = append(ts, t)
		}
	}
	// Like shared mode, reuseport has no hop through the dispatcher: only
	// the accept queue differs, so it should keep up with shared.
	for _, keep := range []bool{false, true} {
		name := "cohort reuseport ≥ 95 % of shared (Go, " + workload(keep) + ")"
		rp, why1 := pick(rows, "cohort-reuseport-go", keep)
		sh, why2 := pick(rows, "cohort-shared-go", keep)
		if why := firstOf(why1, why2); why != "" {
			ts = append(ts, na(name, why))
			continue
		}
		ts = append(ts, busy(atLeast(name, rp.RPS/sh.RPS, 0.95, "reuseport is slower than shared mode beyond the noise"), rp, sh))
	}
	ts = append(ts, reloadErrors("cohort reload, reuseport: 0 errors under load (Node and Go, both workloads)", rows, "reload-cohort-reuseport-node", "reload-cohort-reuseport-go"))
	return ts
}

// reloadErrors is a target of no failed request during the reloads of the
// rows ids, both workloads; it is n/a unless every one of them was measured.
func reloadErrors(name string, rows []Row, ids ...string) Target {
	var errs Errors
	var why string
	var where []string // which reload failed how, for the Why of a MISS
	for _, id := range ids {
		for _, keep := range []bool{true, false} {
			m, w := pick(rows, id, keep)
			if w != "" {
				why = firstOf(why, w)
				continue
			}
			errs.add(m.Errors)
			if m.Errors.Total() > 0 {
				where = append(where, fmt.Sprintf("%s, %s: %s", find(rows, id).Name, workload(keep), m.Errors))
			}
		}
	}
	if why != "" {
		return Target{Name: name, RatioText: "—", NA: true, Why: why}
	}
	t := Target{Name: name, Ratio: float64(errs.Total()), RatioText: fmt.Sprint(errs.Total()), Pass: errs.Total() == 0}
	if !t.Pass {
		t.Why = "errors: " + strings.Join(where, "; ")
	}
	return t
}

// atLeast is a throughput-ratio target; a MISS within noise says so.
func atLeast(name string, ratio, want float64, why string) Target {
	t := Target{Name: name, Ratio: ratio, RatioText: fmt.Sprintf("%.2f", ratio), Pass: ratio >= want}
	if !t.Pass {
		if ratio >= want-noise {
			t.Why = fmt.Sprintf("within %.0f %% of the target: run-to-run noise with the load generator on the same %s", 100*noise, "CPUs")
		} else {
			t.Why = why
		}
	}
	return t
}

// busy adds to a MISS that the machine was busy with other work while one
// of the compared measurements ran, which makes the ratio unfair.
func busy(t Target, ms ...*Measurement) Target {
	if t.Pass {
		return t
	}
	worst := 0.0
	for _, m := range ms {
		worst = max(worst, m.Other)
	}
	if worst > 0.10 {
		t.Why = strings.TrimSpace(fmt.Sprintf("%s; the machine was busy: other processes used up to %.0f %% of the CPUs during these rows, rerun on a quiet machine", t.Why, 100*worst))
		t.Why = strings.TrimPrefix(t.Why, "; ")
	}
	return t
}

func perWorkerText(m *Measurement) string {
	s := "requests per worker:"
	keys := make([]string, 0, len(m.PerWorker))
	for k := range m.PerWorker {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		s += fmt.Sprintf(" %s: %d;", k, m.PerWorker[k])
	}
	return s
}

func firstOf(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}
