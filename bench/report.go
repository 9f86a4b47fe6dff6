package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Report is the outcome of one Run.
type Report struct {
	Date     time.Time     `json:"date"`
	Machine  Machine       `json:"machine"`
	Workers  int           `json:"workers"`
	Conns    int           `json:"conns"`
	Warmup   time.Duration `json:"warmup_ns"`
	Duration time.Duration `json:"duration_ns"`
	Reload   time.Duration `json:"reload_ns"`
	Procs    int           `json:"load_gomaxprocs"`
	Repeat   int           `json:"repeat"`
	LoadAvg  string        `json:"loadavg"` // of the machine when the run started
	Rows     []Row         `json:"rows"`
	Targets  []Target      `json:"targets"`
}

// Machine is what the figures were measured on.
type Machine struct {
	CPU      string            `json:"cpu"`
	Cores    int               `json:"cores"`
	Kernel   string            `json:"kernel"`
	Versions map[string]string `json:"versions"`
}

// Row is one setup with its two workloads (or, for a reload row, the two
// workloads during a reload).
type Row struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	App     string `json:"app"`
	Workers int    `json:"workers"`
	Reload  bool   `json:"reload,omitempty"`
	// NA says why the setup could not run ("not available in this
	// build: ..."); the measurements are then nil.
	NA        string       `json:"na,omitempty"`
	KeepAlive *Measurement `json:"keep_alive,omitempty"`
	Close     *Measurement `json:"close,omitempty"`
}

// Measurement is one workload of one row.
type Measurement struct {
	Result
	Spread float64 `json:"spread"` // max/min requests per worker; +Inf: an idle worker
	Note   string  `json:"note,omitempty"`
	NA     string  `json:"na,omitempty"`
	// Other is the share of the machine's CPU time that processes outside
	// the benchmark used while it ran: the noise on this figure.
	Other float64 `json:"other_cpu"`
	// Runs holds the req/s of every run when the row was repeated; the
	// rest of the Measurement is the median run.
	Runs []float64 `json:"runs,omitempty"`
}

// rpsText is req/s, with ±half the range of the runs when repeated.
func (m *Measurement) rpsText() string {
	s := fmt.Sprintf("%.0f", m.RPS)
	if len(m.Runs) > 1 && m.RPS > 0 {
		lo, hi := slices.Min(m.Runs), slices.Max(m.Runs)
		s += fmt.Sprintf(" ±%.0f%%", 50*(hi-lo)/m.RPS)
	}
	return s
}

// MarshalJSON writes an infinite spread as -1 (JSON has no Inf).
func (m Measurement) MarshalJSON() ([]byte, error) {
	type plain Measurement
	p := plain(m)
	if math.IsInf(p.Spread, 1) {
		p.Spread = -1
	}
	return json.Marshal(p)
}

// UnmarshalJSON reads what MarshalJSON wrote.
func (m *Measurement) UnmarshalJSON(b []byte) error {
	type plain Measurement
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	if p.Spread < 0 {
		p.Spread = math.Inf(1)
	}
	*m = Measurement(p)
	return nil
}

// ReadReport reads a results.json that Write wrote and evaluates the
// targets again, so the markdown and the chart can be rendered anew
// without measuring again.
func ReadReport(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read report: %w", err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		return nil, fmt.Errorf("read report %s: %w", path, err)
	}
	rep.Targets = targets(rep.Rows)
	return &rep, nil
}

func (m *Measurement) ok() bool { return m != nil && m.NA == "" }

func (m *Measurement) summary(keep bool, workers int) string {
	w := "new-conn  "
	if keep {
		w = "keep-alive"
	}
	if !m.ok() {
		return w + " " + m.NA
	}
	s := fmt.Sprintf("%s %9.0f req/s  p50 %s  p99 %s  errors %s  spread %s  other CPU %.0f %%", w, m.RPS, ms(m.P50), ms(m.P99), m.Errors, m.spreadText(workers), 100*m.Other)
	if m.Note != "" {
		s += "  (" + m.Note + ")"
	}
	return s
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

func spread(s float64) string {
	switch {
	case s == 0:
		return "—"
	case math.IsInf(s, 1):
		return "∞ (idle worker)"
	}
	return fmt.Sprintf("%.2f", s)
}

// spreadText is the spread column: "—" for a single process, "∞ (1 of 2
// served)" when a worker served nothing.
func (m *Measurement) spreadText(workers int) string {
	switch {
	case workers <= 1:
		return "—"
	case math.IsInf(m.Spread, 1):
		served := 0
		for _, n := range m.PerWorker {
			if n > 0 {
				served++
			}
		}
		return fmt.Sprintf("∞ (%d of %d served)", served, workers)
	}
	return spread(m.Spread)
}

func machine(root string, versions map[string]string) Machine {
	m := Machine{CPU: "?", Cores: runtime.NumCPU(), Kernel: "?", Versions: versions}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Machine[:])
	}
	return m
}

// loadavg is /proc/loadavg's 1, 5 and 15 minute averages.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// Write writes results.md, results.svg and results.json into dir.
func (rep *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("write report: json: %w", err)
	}
	for name, data := range map[string][]byte{
		"results.md":   []byte(rep.Markdown()),
		"results.svg":  []byte(rep.SVG()),
		"results.json": append(js, '\n'),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return fmt.Errorf("write report: %w", err)
		}
	}
	return nil
}

// MachineLine is the one-line description printed under the table.
func (rep *Report) MachineLine() string {
	m := rep.Machine
	return fmt.Sprintf("%s, %d CPUs, %s", m.CPU, m.Cores, m.Kernel)
}

// VersionLine lists the versions of everything measured.
func (rep *Report) VersionLine() string {
	v := rep.Machine.Versions
	var parts []string
	for _, k := range []string{"node", "pm2", "go", "cohort"} {
		if s, ok := v[k]; ok {
			parts = append(parts, k+" "+s)
		}
	}
	return strings.Join(parts, ", ")
}

// Markdown renders the report: the throughput table, the reload table, the
// targets and the machine.
func (rep *Report) Markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# cohort benchmark\n\n")
	p("Generated by `make bench` ([bench](../../bench)); do not edit by hand.\n\n")
	p("![requests per second by setup](results.svg)\n\n")
	p("The same hello app (one Node.js file, one Go program, both in `bench/hello/`) under each setup, N = %d workers; "+
		"%d concurrent connections from the Go load generator in `bench`, on 127.0.0.1 of the same machine "+
		"(GOMAXPROCS=%d, so it competes with the servers for the %d CPUs); %v warm-up, then %v measured per workload, "+
		"%s. "+
		"**keep-alive**: each connection sends requests back to back; **new-conn**: a new connection per request (`Connection: close`; latency includes the connect). "+
		"Spread: max/min of the requests each worker served (the app answers with its worker id and pid).\n\n",
		rep.Workers, rep.Conns, rep.Procs, rep.Machine.Cores, rep.Warmup, rep.Duration, repeatText(rep.Repeat))
	p("**Other CPU**: the share of the machine's CPU time used by processes outside the benchmark while it measured (the higher of the two workloads); above a few %% the row is noisy.\n\n")
	if worst := rep.worstOther(); worst > 0.10 {
		p("**This run was measured on a busy machine**: other processes used up to %.0f %% of the CPUs during some rows, so those figures and the ratios built on them are noisy. Run `make bench` on a quiet machine for figures to compare.\n\n", 100*worst)
	}
	p("| setup | keep-alive req/s | p50 | p99 | errors | spread | new-conn req/s | p50 | p99 | errors | spread | other CPU |\n")
	p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range rep.Rows {
		if r.Reload {
			continue
		}
		if r.NA != "" {
			p("| %s | %s |%s\n", r.Name, mdEscape(r.NA), strings.Repeat(" |", 10))
			continue
		}
		p("| %s | %s | %s | %s |\n", r.Name, cells(r.KeepAlive, r.Workers), cells(r.Close, r.Workers), otherText(r.KeepAlive, r.Close))
	}
	p("%s", rep.modesMarkdown())
	reloads := false
	for _, r := range rep.Rows {
		reloads = reloads || r.Reload
	}
	if reloads {
		p("\n## Reloads under load\n\nThe workers are replaced one by one while the load runs (%v window, reload %v after the warm-up); errors are those of the whole window.\n\n", rep.Reload, time.Second)
		p("| reload | workload | req/s | p99 | errors | other CPU | note |\n|---|---|--:|--:|--:|--:|---|\n")
		for _, r := range rep.Rows {
			if !r.Reload {
				continue
			}
			if r.NA != "" {
				p("| %s | | | | | | %s |\n", r.Name, mdEscape(r.NA))
				continue
			}
			for _, w := range []struct {
				n string
				m *Measurement
			}{{"keep-alive", r.KeepAlive}, {"new-conn", r.Close}} {
				switch {
				case w.m == nil:
				case !w.m.ok():
					p("| %s | %s | | | | | %s |\n", r.Name, w.n, mdEscape(w.m.NA))
				default:
					p("| %s | %s | %.0f | %s | %s | %s | %s |\n", r.Name, w.n, w.m.RPS, ms(w.m.P99), w.m.Errors, otherText(w.m), mdEscape(w.m.Note))
				}
			}
		}
	}
	if len(rep.Targets) > 0 {
		p("\n## Targets\n\nRatios from this run; a MISS is a measurement, not a failure.\n\n| target | ratio | result | why |\n|---|--:|---|---|\n")
		for _, t := range rep.Targets {
			p("| %s | %s | %s | %s |\n", mdEscape(t.Name), t.RatioText, t.Result(), mdEscape(t.Why))
		}
	}
	p("\nMachine: %s  \nVersions: %s  \nDate: %s, load average %s when the run started (other work on the machine shows up as noise)\n",
		rep.MachineLine(), rep.VersionLine(), rep.Date.UTC().Format("2006-01-02 15:04 UTC"), rep.LoadAvg)
	return b.String()
}

// modeRows are cohort's three modes for one app, shared first: the
// baseline of the ratios in the modes table.
var modeRows = []struct {
	name string
	ids  []string
}{
	{"Go", []string{"cohort-shared-go", "cohort-rr-go", "cohort-rr-go-1ms", "cohort-reuseport-go"}},
	{"Node", []string{"cohort-shared-node", "cohort-reuseport-node"}},
}

// modesMarkdown puts cohort's modes side by side per app, each with its
// req/s as a ratio of shared mode's in the same run (issue #9 asks for
// throughput and spread of the three modes from one run). Empty when no
// app has its shared row and another mode.
func (rep *Report) modesMarkdown() string {
	var b strings.Builder
	for _, app := range modeRows {
		base := find(rep.Rows, app.ids[0])
		if base == nil {
			continue // no baseline for the ratios
		}
		var lines []string
		for _, id := range app.ids {
			r := find(rep.Rows, id)
			if r == nil {
				continue
			}
			if r.NA != "" {
				lines = append(lines, fmt.Sprintf("| %s | %s | | | | | |", r.Name, mdEscape(r.NA)))
				continue
			}
			line := "| " + r.Name
			for _, keep := range []bool{false, true} {
				m := r.get(keep)
				if !m.ok() {
					line += " | — | | "
					continue
				}
				ratio := "—"
				if bm := base.get(keep); base.NA == "" && bm.ok() && bm.RPS > 0 {
					ratio = fmt.Sprintf("%.2f", m.RPS/bm.RPS)
				}
				line += fmt.Sprintf(" | %s | %s | %s", m.rpsText(), ratio, m.spreadText(r.Workers))
			}
			lines = append(lines, line+" |")
		}
		if len(lines) < 2 {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\n## cohort's modes side by side\n\nThe rows above, per app; ratio: req/s ÷ shared mode's req/s in this run.\n\n")
		} else {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "| %s app | new-conn req/s | ratio | spread | keep-alive req/s | ratio | spread |\n|---|--:|--:|--:|--:|--:|--:|\n", app.name)
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	return b.String()
}

// worstOther is the highest Other of all measurements.
func (rep *Report) worstOther() float64 {
	worst := 0.0
	for _, r := range rep.Rows {
		for _, m := range []*Measurement{r.KeepAlive, r.Close} {
			if m.ok() {
				worst = max(worst, m.Other)
			}
		}
	}
	return worst
}

// otherText is the highest Other of ms, as a percentage.
func otherText(ms ...*Measurement) string {
	o, any := 0.0, false
	for _, m := range ms {
		if m.ok() {
			o, any = max(o, m.Other), true
		}
	}
	if !any {
		return ""
	}
	return fmt.Sprintf("%.0f %%", 100*o)
}

func repeatText(n int) string {
	if n <= 1 {
		return "one run per row"
	}
	return fmt.Sprintf("%d runs per row in interleaved rounds; req/s is the median run, ± half the range of the runs, and the other columns are from the median run", n)
}

func cells(m *Measurement, workers int) string {
	if m == nil {
		return " | | | | "
	}
	if !m.ok() {
		return mdEscape(m.NA) + " | | | | "
	}
	sp := m.spreadText(workers)
	errs := m.Errors.String()
	if m.Note != "" {
		errs += " (" + mdEscape(m.Note) + ")"
	}
	return fmt.Sprintf("%s | %s | %s | %s | %s", m.rpsText(), ms(m.P50), ms(m.P99), errs, sp)
}

func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// Text renders the report for a terminal: the markdown tables are
// readable as they are.
func (rep *Report) Text() string { return rep.Markdown() }
