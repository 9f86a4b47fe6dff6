package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
)

// controlTarget resolves the APP argument (or an explicit --socket) to a
// control socket path: a `cohort run` of this user named APP, else the
// service's (apps.go).
func (env *environment) controlTarget(app, socket string) (string, error) {
	if socket != "" {
		return socket, nil
	}
	if err := appfile.CheckAppName(app); err != nil {
		return "", err
	}
	return env.socketFor(app), nil
}

func cmdStatus(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "status", "[--json] [--socket PATH] [APP]",
		"Show APP's workers as its dispatcher sees them: index, pid, generation,\n"+
			"state, uptime, restarts, connections, memory and CPU of each worker's\n"+
			"process tree. Without APP, every app on this host: the generated\n"+
			"services and the 'cohort run' instances, one line per app and per worker.")
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	socket := fs.String("socket", "", "the control socket (default: the app's, see cohort(1))")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() > 1 {
		fs.Usage()
		return 2
	}
	if fs.NArg() == 0 && *socket == "" {
		return statusAll(ctx, env, *asJSON)
	}
	app := fs.Arg(0)
	path, err := env.controlTarget(app, *socket)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort status: %v\n", err)
		return 2
	}
	st, err := fetchStatus(ctx, path)
	if err != nil {
		label := app
		if label == "" {
			label = path
		}
		fmt.Fprintf(env.stderr, "cohort status %s: %s\n", label, env.diagnose(ctx, app, *socket != "", err).text)
		return 1
	}
	if *asJSON {
		return encodeJSON(env, st)
	}
	printStatus(env, st, time.Now())
	return 0
}

// fetchStatus asks the dispatcher at path for its status, bounded.
func fetchStatus(ctx context.Context, path string) (*control.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, busTimeout)
	defer cancel()
	rep, err := control.Call(ctx, path, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		return nil, err
	}
	if rep.Status == nil {
		return nil, errors.New("the dispatcher sent no status")
	}
	return rep.Status, nil
}

func encodeJSON(env *environment, v any) int {
	enc := json.NewEncoder(env.stdout)
	enc.SetIndent("", "  ")
	// For scripts and people, not for HTML: "memory 512M > 400M" stays
	// as written rather than "\u003e".
	enc.SetEscapeHTML(false)
	if enc.Encode(v) != nil {
		return 1
	}
	return 0
}

// hint is why an app's control socket did not answer: a word for the
// STATE column and the sentence that says what to do.
type hint struct {
	state, text string
}

// diagnose says why the control socket of app did not answer, and what
// to do: run as root, there is no such app, it waits for its first
// connection, it is not running. explicit: the socket was given with
// --socket, so the app's name says nothing about where it is.
func (env *environment) diagnose(ctx context.Context, app string, explicit bool, err error) hint {
	if (errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM)) && os.Geteuid() != 0 {
		who := app
		if who == "" {
			who = "--socket …"
		}
		return hint{"needs-root", fmt.Sprintf("the control socket is readable by root and the app's user only: run as root (sudo cohort status %s)", who)}
	}
	gone := errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
	if !gone || app == "" {
		return hint{"unreachable", err.Error()}
	}
	if explicit {
		return hint{"unreachable", fmt.Sprintf("%v (is the app running? 'systemctl status %s')", err, app)}
	}
	var names []string
	known := false
	for _, a := range env.knownApps() {
		names = append(names, a.Name)
		known = known || a.Name == app
	}
	if !known {
		list := "none"
		if len(names) > 0 {
			list = strings.Join(names, ", ")
		}
		return hint{"unknown", fmt.Sprintf("no app %q; known apps: %s", app, list)}
	}
	return env.notRunning(ctx, app)
}

// notRunning says what systemd knows of app, whose control socket is not
// there.
func (env *environment) notRunning(ctx context.Context, app string) hint {
	ctx, cancel := context.WithTimeout(ctx, unitsTimeout)
	defer cancel()
	units := env.units
	if units == nil {
		units = unitsOverDBus
	}
	svc, sock, err := units(ctx, app)
	switch {
	case err != nil:
		return hint{"stopped", fmt.Sprintf("not running (systemd cannot say more: %v; 'systemctl status %s')", err, app)}
	case sock.Active == "active" && (svc.Active == "inactive" || svc.Active == "deactivating" || svc.Active == "failed"):
		return hint{"waiting", fmt.Sprintf("socket active, no worker started yet (socket activation: the first connection starts it; `systemctl start %s` starts it now)", app)}
	case svc.Active == "activating" || svc.Active == "reloading":
		return hint{"starting", fmt.Sprintf("starting (%s.service is %s/%s; 'systemctl status %s')", app, svc.Active, svc.Sub, app)}
	case svc.Active == "failed":
		return hint{"failed", fmt.Sprintf("%s.service failed: 'systemctl status %s', 'journalctl -u %s'", app, app, app)}
	case svc.Active == "active":
		return hint{"unreachable", fmt.Sprintf("%s.service is active but its control socket is gone ('systemctl status %s')", app, app)}
	default:
		return hint{"stopped", fmt.Sprintf("not running (%s.service is %s, %s.socket is %s: 'systemctl start %s')", app, svc.Active, app, sock.Active, app)}
	}
}

// unitsTimeout bounds what status asks systemd for a hint.
const unitsTimeout = 5 * time.Second

// unitsOverDBus reads app's service and socket unit states.
func unitsOverDBus(ctx context.Context, app string) (service, socket unitState, err error) {
	conn, err := connectSystemd(ctx)
	if err != nil {
		return service, socket, err
	}
	defer conn.Close()
	if service, err = readUnit(ctx, conn, app+".service"); err != nil {
		return service, socket, err
	}
	socket, err = readUnit(ctx, conn, app+".socket")
	return service, socket, err
}

// appStatus is one app of `cohort status` without APP (--json prints a
// list of them): the app, where it was found, and its dispatcher's status
// or why there is none.
type appStatus struct {
	knownApp
	Status *control.Status `json:"status,omitempty"`
	// State and Problem, when there is no Status: a word ("needs-root",
	// "waiting", "starting", "failed", "stopped", "unreachable") and the
	// sentence that says what to do.
	State   string `json:"state,omitempty"`
	Problem string `json:"problem,omitempty"`
}

// statusAll is `cohort status` without APP: every known app, asked in
// parallel.
func statusAll(ctx context.Context, env *environment, asJSON bool) int {
	apps := env.knownApps()
	all := make([]appStatus, len(apps))
	var wg sync.WaitGroup
	for i, a := range apps {
		all[i].knownApp = a
		wg.Go(func() {
			st, err := fetchStatus(ctx, a.Socket)
			if err != nil {
				h := env.diagnose(ctx, a.Name, false, err)
				all[i].State, all[i].Problem = h.state, h.text
				return
			}
			all[i].Status = st
		})
	}
	wg.Wait()
	if asJSON {
		return encodeJSON(env, all)
	}
	if len(all) == 0 {
		fmt.Fprintln(env.stderr, "cohort status: no apps on this host (no app files on the search path, no 'cohort run')")
		return 0
	}
	printAll(env, all, time.Now())
	return 0
}

// printAll is the table of every app: a line per app (its dispatcher, and
// the sum over its workers) and a line per worker, named APP.N as in the
// log; below it, for each app without a dispatcher, why and what to do.
func printAll(env *environment, all []appStatus, now time.Time) {
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "APP\tPID\tGEN\tSTATE\tUPTIME\tRESTARTS\tCONNS\tRSS\tCPU%")
	for _, a := range all {
		st := a.Status
		if st == nil {
			fmt.Fprintf(w, "%s\t-\t-\t%s\t-\t-\t-\t-\t-\n", a.Name, a.State)
			continue
		}
		rr := st.Mode == string(appfile.ModeRoundRobin)
		ready, restarts, active := 0, 0, 0
		var handed uint64
		var rss int64
		var cpu float64
		for _, wk := range st.Workers {
			if wk.State == "ready" {
				ready++
			}
			restarts += wk.Restarts
			handed += wk.Handed
			active += wk.Active
			rss += wk.RSS
			cpu += wk.CPUPercent
		}
		pid, uptime := "-", "-"
		if st.PID != 0 {
			pid = strconv.Itoa(st.PID)
		}
		if !st.Since.IsZero() {
			uptime = now.Sub(st.Since).Round(time.Second).String()
		}
		state := fmt.Sprintf("%s %d/%d", st.State, ready, len(st.Workers))
		if st.ConfigError != "" {
			state += " (config: " + st.ConfigError + ")"
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t%.1f\n",
			a.Name, pid, st.Generation, state, uptime, restarts, conns(rr, active, handed), humanBytes(rss), cpu)
		for _, wk := range st.Workers {
			pid, uptime := workerTimes(wk, now)
			fmt.Fprintf(w, "  %s.%d\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t%.1f\n",
				a.Name, wk.Index, pid, wk.Generation, wk.State, uptime, wk.Restarts, conns(rr, wk.Active, wk.Handed), humanBytes(wk.RSS), wk.CPUPercent)
		}
	}
	w.Flush()
	for _, a := range all {
		if a.Status != nil {
			printRestarts(env, a.Name, a.Status)
			printRecycles(env, a.Name, a.Status)
		}
	}
	for _, a := range all {
		if a.Status == nil {
			fmt.Fprintf(env.stdout, "%s: %s\n", a.Name, a.Problem)
		}
	}
}

// printRecycles says, below a table, which workers were recycled and why
// the last time: recycles are not restarts (RESTARTS counts crashes).
func printRecycles(env *environment, app string, st *control.Status) {
	if st.RecycleMemory != "" {
		fmt.Fprintf(env.stdout, "%s: recycle memory %s\n", app, st.RecycleMemory)
	}
	for _, wk := range st.Workers {
		if wk.Recycles > 0 {
			fmt.Fprintf(env.stdout, "%s.%d: recycled %s, last: %s\n", app, wk.Index, times(wk.Recycles), wk.LastRecycle)
		}
	}
}

// conns is the CONNS column: open/handed in round-robin mode, where the
// dispatcher passes every connection; "-" in the others, where the kernel
// does.
func conns(rr bool, active int, handed uint64) string {
	if !rr {
		return "-"
	}
	return fmt.Sprintf("%d/%d", active, handed)
}

func workerTimes(wk control.Worker, now time.Time) (pid, uptime string) {
	if wk.PID == 0 {
		return "-", "-"
	}
	return strconv.Itoa(wk.PID), now.Sub(wk.Started).Round(time.Second).String()
}

func printStatus(env *environment, st *control.Status, now time.Time) {
	fmt.Fprintf(env.stdout, "%s: %s\n", st.App, st.Line)
	if line := cpusLine(st.CPUs); line != "" {
		fmt.Fprintf(env.stdout, "%s: %s\n", st.App, line)
	}
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "WORKER\tPID\tGEN\tSTATE\tUPTIME\tRESTARTS\tCONNS\tRSS\tCPU%")
	rr := st.Mode == string(appfile.ModeRoundRobin)
	for _, wk := range st.Workers {
		pid, uptime := workerTimes(wk, now)
		fmt.Fprintf(w, "%d\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t%.1f\n",
			wk.Index, pid, wk.Generation, wk.State, uptime, wk.Restarts, conns(rr, wk.Active, wk.Handed), humanBytes(wk.RSS), wk.CPUPercent)
	}
	w.Flush()
	printCgroups(env, st)
	printRestarts(env, st.App, st)
	printRecycles(env, st.App, st)
}

// printRestarts says, below the table, why each worker slot was
// restarted: the RESTARTS column counts, this line tells a crash loop from
// OOM kills or an unhealthy round-robin channel ("web.0: restarted 3
// times: crashed 2, unhealthy 1"), most frequent cause first.
func printRestarts(env *environment, app string, st *control.Status) {
	for _, wk := range st.Workers {
		if len(wk.RestartCauses) == 0 {
			continue
		}
		causes := slices.SortedFunc(maps.Keys(wk.RestartCauses), func(a, b string) int {
			return cmp.Or(cmp.Compare(wk.RestartCauses[b], wk.RestartCauses[a]), cmp.Compare(a, b))
		})
		parts := make([]string, len(causes))
		for i, c := range causes {
			parts[i] = fmt.Sprintf("%s %d", c, wk.RestartCauses[c])
		}
		fmt.Fprintf(env.stdout, "%s.%d: restarted %s: %s\n", app, wk.Index, times(wk.Restarts), strings.Join(parts, ", "))
	}
}

// times is "1 time", "2 times"…
func times(n int) string {
	if n == 1 {
		return "1 time"
	}
	return strconv.Itoa(n) + " times"
}

// printCgroups is what the workers' own cgroups say, when they have
// them: memory.current against memory.max, CPU time (cpu.stat, and how
// long cpu.max throttled it), memory.high crossings, OOM kills and PSI
// (some, avg10) where the kernel has it; "-" for what it does not count.
func printCgroups(env *environment, st *control.Status) {
	show := false
	for _, wk := range st.Workers {
		show = show || wk.Cgroup != nil
	}
	if !show {
		return
	}
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "WORKER	CGROUP	MEM	MEM MAX	CPU TIME	THROTTLED	HIGH	OOM KILLS	PSI MEM	PSI CPU")
	for _, wk := range st.Workers {
		c := wk.Cgroup
		if c == nil {
			continue
		}
		mem, max := "-", "-"
		if c.MemoryCurrent != nil {
			mem = humanBytes(int64(*c.MemoryCurrent))
		}
		if c.MemoryMax > 0 {
			max = humanBytes(c.MemoryMax)
		}
		psi := func(p *control.Pressure) string {
			if p == nil {
				return "-"
			}
			return fmt.Sprintf("%.2f", p.Some10)
		}
		usec := func(n uint64) string { return (time.Duration(n) * time.Microsecond).Round(time.Millisecond).String() }
		fmt.Fprintf(w, "%d	%s	%s	%s	%s	%s	%d	%d	%s	%s\n", wk.Index, filepath.Base(c.Path), mem, max,
			usec(c.CPUUsageUsec), usec(c.CPUThrottledUsec), c.MemoryHighEvents, c.OOMKills, psi(c.MemoryPressure), psi(c.CPUPressure))
	}
	w.Flush()
}

// cpusLine says what workers = "auto" counted and how: "workers auto =
// 1 (affinity 2, cgroup cpu quota 1.50)"; "" from a dispatcher that does
// not say.
func cpusLine(c control.CPUs) string {
	switch {
	case c.Count == 0:
		return ""
	case c.WorkersAuto:
		return fmt.Sprintf("workers auto = %d (%s)", c.Count, c.How)
	}
	return fmt.Sprintf("COHORT_CPUS = %d (%s)", c.Count, c.How)
}

func humanBytes(n int64) string {
	switch {
	case n <= 0:
		return "-"
	case n < 1<<20:
		return fmt.Sprintf("%dK", n>>10)
	case n < 1<<30:
		return fmt.Sprintf("%.1fM", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1fG", float64(n)/(1<<30))
}

func cmdScale(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "scale", "[--socket PATH] APP N",
		"Run N workers for APP until its next restart (new slots start, surplus\n"+
			"ones stop gracefully). To keep N, set workers = N in the app file.")
	socket := fs.String("socket", "", "the control socket (default: the app's, see cohort(1))")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return 2
	}
	n, err := strconv.Atoi(fs.Arg(1))
	if err != nil || n < 1 || n > appfile.MaxWorkers {
		fmt.Fprintf(env.stderr, "cohort scale: N must be a number from 1 to %d, got %q\n", appfile.MaxWorkers, fs.Arg(1))
		return 2
	}
	path, err := env.controlTarget(fs.Arg(0), *socket)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort scale: %v\n", err)
		return 2
	}
	if _, err := control.Call(ctx, path, control.Request{Cmd: control.CmdScale, Workers: n}); err != nil {
		fmt.Fprintf(env.stderr, "cohort scale %s: %s\n", fs.Arg(0), env.diagnose(ctx, fs.Arg(0), *socket != "", err).text)
		return 1
	}
	fmt.Fprintf(env.stdout, "%s: %d workers\n", fs.Arg(0), n)
	return 0
}
