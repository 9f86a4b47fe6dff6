package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	sddbus "github.com/coreos/go-systemd/v22/dbus"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator/running"
)

// busTimeout bounds a D-Bus conversation that is not a job wait.
const busTimeout = 10 * time.Second

// connectSystemd opens the system bus, or systemd's private socket when
// there is no bus daemon (root only), and says clearly when neither works.
func connectSystemd(ctx context.Context) (*sddbus.Conn, error) {
	// The context given to NewWithContext lives as long as the connection
	// (godbus closes the connection when it is done), so the connect's
	// deadline is a timer that cancels it only while connecting.
	ctx, cancel := context.WithCancel(ctx)
	timer := time.AfterFunc(busTimeout, cancel)
	conn, err := sddbus.NewWithContext(ctx)
	if !timer.Stop() && err == nil {
		conn.Close()
		err = fmt.Errorf("connect timed out after %v", busTimeout)
	}
	if err != nil {
		cancel()
		return nil, fmt.Errorf("cannot talk to systemd over D-Bus (is systemd running, and is the system bus up?): %w", err)
	}
	return conn, nil
}

// unitState is what `cohort list` shows of one unit.
type unitState struct {
	Active string `json:"active"`
	Sub    string `json:"sub"`
	PID    uint32 `json:"main_pid,omitempty"`
}

type appListing struct {
	App   string `json:"app"`
	File  string `json:"file"`
	Error string `json:"error,omitempty"` // the file's first problem
	// Kept: the file is broken and the app runs its running
	// configuration (the last one that validated).
	Kept    bool      `json:"running_config_kept,omitempty"`
	Service unitState `json:"service"`
	Socket  unitState `json:"socket"`
}

func cmdList(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "list", "[--json]",
		"List every app on the search path with the state systemd reports for its\n"+
			"service and socket units (ActiveState/SubState, read over D-Bus).")
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	files, err := appFiles(env, nil)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort list: %v\n", err)
		return 1
	}
	conn, err := connectSystemd(ctx)
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort list: %v\n", err)
		return 1
	}
	defer conn.Close()

	var apps []appListing
	for _, f := range files {
		a := appListing{App: appfile.AppName(f), File: f}
		if _, err := appfile.ParseFile(f); err != nil {
			a.Error = appfile.Summary(err)
			_, rerr := running.Read(running.Dir, a.App)
			a.Kept = rerr == nil
		}
		a.Service, err = readUnit(ctx, conn, a.App+".service")
		if err == nil {
			a.Socket, err = readUnit(ctx, conn, a.App+".socket")
		}
		if err != nil {
			fmt.Fprintf(env.stderr, "cohort list: %v\n", err)
			return 1
		}
		apps = append(apps, a)
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(apps); err != nil {
			return 1
		}
		return 0
	}
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "APP\tSERVICE\tSOCKET\tMAIN PID\tFILE")
	for _, a := range apps {
		pid := "-"
		if a.Service.PID != 0 {
			pid = fmt.Sprint(a.Service.PID)
		}
		file := a.File
		switch {
		case a.Kept:
			file += " (broken: " + a.Error + "; running the last good configuration)"
		case a.Error != "":
			file += " (broken: " + a.Error + ")"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", a.App, a.Service.Active+"/"+a.Service.Sub, a.Socket.Active+"/"+a.Socket.Sub, pid, file)
	}
	w.Flush()
	return 0
}

func readUnit(ctx context.Context, conn *sddbus.Conn, unit string) (unitState, error) {
	ctx, cancel := context.WithTimeout(ctx, busTimeout)
	defer cancel()
	props, err := conn.GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		return unitState{}, fmt.Errorf("read %s: %w", unit, err)
	}
	st := unitState{Active: fmt.Sprint(props["ActiveState"]), Sub: fmt.Sprint(props["SubState"])}
	if props["LoadState"] == "not-found" {
		st.Active, st.Sub = "not-found", "-"
		return st, nil
	}
	if len(unit) > 8 && unit[len(unit)-8:] == ".service" {
		p, err := conn.GetServicePropertyContext(ctx, unit, "MainPID")
		if err == nil {
			if pid, ok := p.Value.Value().(uint32); ok {
				st.PID = pid
			}
		}
	}
	return st, nil
}

func cmdReload(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "reload", "APP",
		"Ask systemd to reload APP's service (a rolling restart of its workers)\n"+
			"and wait for the job's result: exit status 0 when every slot runs a new\n"+
			"worker, 1 when the reload failed (the old workers keep serving).")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for the reload job")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	app := fs.Arg(0)
	if err := appfile.CheckAppName(app); err != nil {
		fmt.Fprintf(env.stderr, "cohort reload: %v\n", err)
		return 2
	}
	// A broken file would fail the reload in ExecReload= anyway, with the
	// error only in the journal; say it here, and before asking systemd,
	// which knows no unit for an app whose broken file it never ran.
	if file := appFile(env, app); file != "" {
		if _, err := appfile.ParseFile(file); err != nil {
			fmt.Fprintf(env.stderr, "cohort reload: %s; reload refused, fix the file first (cohort check %s)\n", appfile.Summary(err), file)
			return 1
		}
	}
	unit := app + ".service"
	if err := reloadUnit(ctx, unit, *timeout); err != nil {
		fmt.Fprintf(env.stderr, "cohort reload: %v\n", err)
		return 1
	}
	fmt.Fprintf(env.stdout, "%s reloaded\n", unit)
	return 0
}

// reloadUnit asks systemd to reload unit and waits up to timeout for the
// job's result: nil when it is "done", else an error that says where to
// look.
func reloadUnit(ctx context.Context, unit string, timeout time.Duration) error {
	conn, err := connectSystemd(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done := make(chan string, 1)
	if _, err := conn.ReloadUnitContext(ctx, unit, "replace", done); err != nil {
		return fmt.Errorf("%s: %w", unit, err)
	}
	app := strings.TrimSuffix(unit, ".service")
	select {
	case result := <-done:
		if result != "done" {
			return fmt.Errorf("reload of %s %s; see 'systemctl status %s' and 'journalctl -u %s'", unit, result, app, app)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("no result for %s after %v", unit, timeout)
	}
}

// appFile is the app file in effect for app on the search path, or "".
func appFile(env *environment, app string) string {
	files, _ := appFiles(env, nil)
	for _, f := range files {
		if appfile.AppName(f) == app {
			return f
		}
	}
	return ""
}
