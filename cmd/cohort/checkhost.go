package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher"
	"github.com/cohort-dev/cohort/generator"
	"github.com/cohort-dev/cohort/generator/verify"
	"github.com/cohort-dev/cohort/internal/cgroup"
)

// verifyTimeout bounds one systemd-analyze verify run (it takes a few
// hundred milliseconds).
const verifyTimeout = 30 * time.Second

// hostChecks are the checks of `cohort check` that ask this host: does the
// command exist, does systemd know the directives. With offline, what they
// find is a warning, for files meant for another host.
type hostChecks struct {
	ctx     context.Context
	offline bool
	stderr  io.Writer

	// cgroupRoot is where the cgroup2 hierarchy is mounted
	// (/sys/fs/cgroup; tests set another).
	cgroupRoot string

	noAnalyzer bool                // systemd-analyze is missing; said once
	known      map[string][]string // systemd's directives by section, read once
}

// hostControllers lists the cgroup v2 controllers this host can give a
// service, those its cgroup2 root offers (systemd enables a delegated
// unit's from them), and which directory it read: root, or the unified
// hierarchy of a hybrid host.
func hostControllers(root string) (have []string, where string) {
	for _, dir := range []string{root, filepath.Join(root, "unified")} {
		if c, err := cgroup.Controllers(dir); err == nil {
			return c, dir
		}
	}
	return nil, "no cgroup2 hierarchy at " + root + ", which"
}

// limitsKey is the first [limits] key of l written through controller c,
// for the position of check's report.
func limitsKey(l appfile.Limits, c string) string {
	var keys []string
	switch c {
	case cgroup.Memory:
		keys = []string{"memory_high", "memory_max", "memory_swap_max"}
	case cgroup.CPU:
		keys = []string{"cpu_weight", "cpu_quota"}
	case cgroup.Pids:
		keys = []string{"tasks_max"}
	}
	set := map[string]bool{
		"memory_high": l.MemoryHigh != 0, "memory_max": l.MemoryMax != 0, "memory_swap_max": l.MemorySwapMax != 0,
		"cpu_weight": l.CPUWeight != 0, "cpu_quota": l.CPUQuota != 0, "tasks_max": l.TasksMax != 0,
	}
	for _, k := range keys {
		if set[k] {
			return "limits." + k
		}
	}
	return "limits"
}

// cohortPath is the cohort binary the units' ExecStart= names while they
// are verified: this one, so that verify finds it on a host where the
// package is not installed.
func (hc *hostChecks) cohortPath() string {
	if self, err := os.Executable(); err == nil {
		return self
	}
	return generator.DefaultCohortPath
}

// check runs the host checks on a valid app, printing what it finds, and
// reports whether the app passed (warnings pass).
func (hc *hostChecks) check(path string, app *appfile.App, data []byte, us *generator.Units) bool {
	var found appfile.Errors
	seen := map[string]bool{}
	report := func(key, format string, args ...any) {
		e := &appfile.Error{File: path, Msg: fmt.Sprintf(format, args...)}
		if key != "" {
			e.Line, e.Col = appfile.Position(data, key)
		}
		if hc.offline {
			e.Msg = "warning: " + e.Msg
		}
		// A [unit] or [socket] directive is in every socket unit of
		// the app: say it once.
		if !seen[e.Error()] {
			seen[e.Error()] = true
			found = append(found, e)
		}
	}
	defer func() {
		sort.SliceStable(found, func(i, j int) bool {
			a, b := found[i], found[j]
			return a.Line < b.Line || a.Line == b.Line && a.Col < b.Col
		})
		for _, e := range found {
			fmt.Fprintln(hc.stderr, e)
		}
	}()
	ok := func() bool { return hc.offline || len(found) == 0 }
	if _, err := dispatcher.ResolveCommand(app, []string{"PATH=" + dispatcher.ServicePATH}); err != nil {
		switch {
		case strings.HasPrefix(err.Error(), "environment_file"):
			report("environment_file", "%v", err)
		case errors.Is(err, fs.ErrNotExist):
			report("command.0", "command[0] %q does not exist on this host", app.Command[0])
		case errors.Is(err, fs.ErrPermission):
			report("command.0", "command[0] %q is not an executable file", app.Command[0])
		default:
			report("command.0", "command[0] %v on this host", err)
		}
	}
	if need := cgroup.Needs(app.Limits); len(need) > 0 {
		have, where := hostControllers(hc.cgroupRoot)
		list := strings.Join(have, " ")
		if list == "" {
			list = "none"
		}
		// The dispatcher refuses such an app when it starts (its
		// cgroups.check); say so now, where each key is written.
		for _, m := range need {
			if cgroup.Missing([]string{m}, have) != "" {
				report(limitsKey(app.Limits, m), "[limits] need the %s controller, which this host does not offer its services (%s offers: %s): the app would be refused when it starts", m, where, list)
			}
		}
	}
	ctx, cancel := context.WithTimeout(hc.ctx, verifyTimeout)
	defer cancel()
	complaints, err := verify.Units(ctx, us.Files)
	if errors.Is(err, verify.ErrNoAnalyzer) {
		if !hc.noAnalyzer {
			fmt.Fprintf(hc.stderr, "cohort check: %v; [unit], [service] and [socket] directives not checked against systemd\n", err)
			hc.noAnalyzer = true
		}
		return ok()
	}
	if err != nil {
		report("", "%v", err)
		return ok()
	}
	for _, c := range complaints {
		table := strings.ToLower(c.Section)
		key := table + "." + c.Key
		passThrough := c.Key != "" && isPassThrough(app, table, c.Key)
		switch {
		case c.Unknown && passThrough:
			if hc.known == nil {
				hc.known = verify.Directives(ctx)
			}
			hint := ""
			if s := appfile.Suggest(c.Key, hc.known[c.Section]); s != "" {
				hint = fmt.Sprintf(" (did you mean %q?)", s)
			}
			report(key, "[%s] %s: systemd does not know this directive%s", table, c.Key, hint)
		case passThrough:
			report(key, "[%s] %s: systemd-analyze verify: %s", table, c.Key, c.Msg)
		case c.Unit != "":
			report("", "systemd-analyze verify: %s:%d: %s", c.Unit, c.Line, c.Msg)
		default:
			report("", "systemd-analyze verify: %s", c.Msg)
		}
	}
	return ok()
}

// isPassThrough reports whether the app's pass-through table ("unit",
// "service", "socket") sets key: a complaint about it belongs to the app
// file, not to cohort.
func isPassThrough(app *appfile.App, table, key string) bool {
	var ds []appfile.Directive
	switch table {
	case "unit":
		ds = app.Unit
	case "service":
		ds = app.Service
	case "socket":
		ds = app.Socket
	}
	for _, d := range ds {
		if d.Key == key {
			return true
		}
	}
	return false
}
