package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/generator/config"
)

// controlTarget resolves the APP argument (or an explicit --socket) to a
// control socket path.
func controlTarget(app, socket string) (string, error) {
	if socket != "" {
		return socket, nil
	}
	if err := config.CheckAppName(app); err != nil {
		return "", err
	}
	return control.SocketPath(app), nil
}

func cmdStatus(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "status", "[--json] [--socket PATH] APP",
		"Show APP's workers as its dispatcher sees them: index, pid, generation,\n"+
			"state, uptime, restarts, connections, memory and CPU.")
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	socket := fs.String("socket", "", "the control socket (default /run/cohort/APP/control.sock)")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 && *socket == "" {
		fs.Usage()
		return 2
	}
	path, err := controlTarget(fs.Arg(0), *socket)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort status: %v\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, busTimeout)
	defer cancel()
	rep, err := control.Call(ctx, path, control.Request{Cmd: control.CmdStatus})
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort status: %v (is the app running? 'systemctl status %s')\n", err, fs.Arg(0))
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if enc.Encode(rep.Status) != nil {
			return 1
		}
		return 0
	}
	printStatus(env, rep.Status, time.Now())
	return 0
}

func printStatus(env *environment, st *control.Status, now time.Time) {
	fmt.Fprintf(env.stdout, "%s: %s\n", st.App, st.Line)
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "WORKER\tPID\tGEN\tSTATE\tUPTIME\tRESTARTS\tCONNS\tRSS\tCPU%")
	for _, wk := range st.Workers {
		pid, uptime := "-", "-"
		if wk.PID != 0 {
			pid = strconv.Itoa(wk.PID)
			uptime = now.Sub(wk.Started).Round(time.Second).String()
		}
		conns := "-"
		if st.Mode == string(config.ModeRoundRobin) {
			conns = fmt.Sprintf("%d/%d", wk.Active, wk.Handed)
		}
		fmt.Fprintf(w, "%d\t%s\t%d\t%s\t%s\t%d\t%s\t%s\t%.1f\n",
			wk.Index, pid, wk.Generation, wk.State, uptime, wk.Restarts, conns, humanBytes(wk.RSS), wk.CPUPercent)
	}
	w.Flush()
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
	socket := fs.String("socket", "", "the control socket (default /run/cohort/APP/control.sock)")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return 2
	}
	n, err := strconv.Atoi(fs.Arg(1))
	if err != nil || n < 1 || n > config.MaxWorkers {
		fmt.Fprintf(env.stderr, "cohort scale: N must be a number from 1 to %d, got %q\n", config.MaxWorkers, fs.Arg(1))
		return 2
	}
	path, err := controlTarget(fs.Arg(0), *socket)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort scale: %v\n", err)
		return 2
	}
	if _, err := control.Call(ctx, path, control.Request{Cmd: control.CmdScale, Workers: n}); err != nil {
		fmt.Fprintf(env.stderr, "cohort scale: %v\n", err)
		return 1
	}
	fmt.Fprintf(env.stdout, "%s: %d workers\n", fs.Arg(0), n)
	return 0
}
