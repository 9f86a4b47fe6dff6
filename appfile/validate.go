package appfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// userNameRE is systemd's "relaxed" user and group name check, the one
// User= and Group= apply; numeric IDs are accepted too.
var userNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?$|^[0-9]+$`)

// validate checks what a key's type alone cannot: required keys, paths,
// names, and agreement between keys.
func (d *decoder) validate(app *App) {
	d.checkCommand(app.Command)
	for i, f := range app.EnvironmentFiles {
		if !filepath.IsAbs(strings.TrimPrefix(f, "-")) {
			d.errorAt(fmt.Sprintf("environment_file.%d", i), "", "environment_file %q must be an absolute path (a leading \"-\" makes it optional)", f)
		}
	}
	if app.WorkingDirectory != "" && !filepath.IsAbs(app.WorkingDirectory) {
		d.errorAt("working_directory", "", "working_directory %q must be an absolute path", app.WorkingDirectory)
	}
	for key, name := range map[string]string{"user": app.User, "group": app.Group} {
		if name != "" && !userNameRE.MatchString(name) {
			d.errorAt(key, "", "%s %q is not a valid user or group name", key, name)
		}
	}
	for i, l := range app.Listen {
		for key, name := range map[string]string{"socket_user": l.SocketUser, "socket_group": l.SocketGroup} {
			if name != "" && !userNameRE.MatchString(name) {
				d.errorAt(fmt.Sprintf("listen.%d.%s", i, key), "", "%s %q is not a valid user or group name", key, name)
			}
		}
	}
	modes := []string{string(ModeShared), string(ModeRoundRobin), string(ModeReusePort)}
	if !slices.Contains(modes, string(app.Mode)) {
		d.errorAt("mode", suggest(string(app.Mode), modes), "mode: want \"shared\", \"round-robin\" or \"reuseport\", got %q", app.Mode)
	}
	if app.Mode == ModeReusePort {
		d.checkReusePort(app)
	}
	if _, set := d.idx["ready_settle"]; set {
		switch {
		case app.Ready.Kind != ReadyListening:
			d.errorAt("ready_settle", "", "ready_settle applies only to ready = \"listening\" (ready is %q)", readyText(app.Ready))
		case app.ReadySettle >= app.ReadyTimeout:
			d.errorAt("ready_settle", "", "ready_settle (%s) must be shorter than ready_timeout (%s), or no worker would ever be ready", app.ReadySettle, app.ReadyTimeout)
		}
	}
	for _, only := range []struct{ key, label, why string }{
		{"accept_interval", "accept_interval", ""},
		{"recycle.max_connections", "max_connections", " and the dispatcher cannot count their connections (use max_lifetime or memory)"},
	} {
		if _, set := d.idx[only.key]; set && app.Mode != ModeRoundRobin && slices.Contains(modes, string(app.Mode)) {
			d.errorAt(only.key, "", "%s applies only to mode = \"round-robin\": in mode = %q the workers accept on their own%s", only.label, app.Mode, only.why)
		}
	}
	balances := []string{BalanceRoundRobin, BalanceLeastConnections, BalanceP2C, BalanceWeighted}
	if !slices.Contains(balances, app.Balance) {
		d.errorAt("balance", suggest(app.Balance, balances), "balance: want \"round-robin\", \"least-connections\", \"p2c\" or \"weighted\", got %q", app.Balance)
	}
	if _, set := d.idx["weights"]; set && app.Balance != BalanceWeighted {
		d.errorAt("weights", "", "weights apply only to balance = \"weighted\" (balance is %q)", app.Balance)
	}
	if _, set := d.idx["weights"]; !set && app.Balance == BalanceWeighted {
		d.errorAt("balance", "", "balance = \"weighted\" needs weights = [...], one per worker slot")
	}
	stickies := []string{StickyClientIP, StickyProxyProtocol}
	if app.Sticky != StickyNone && !slices.Contains(stickies, app.Sticky) {
		d.errorAt("sticky", suggest(app.Sticky, stickies), "sticky: want \"client-ip\" or \"proxy-protocol\", got %q", app.Sticky)
	}

	profiles := []string{HardeningDefault, HardeningStrict, HardeningNone}
	if !slices.Contains(profiles, app.Hardening) {
		d.errorAt("hardening", suggest(app.Hardening, profiles), "hardening: want \"default\", \"strict\" or \"none\", got %q", app.Hardening)
	}
	if len(app.Listen) == 0 {
		if _, written := d.idx["listen"]; !written {
			d.errorAt("", "", "missing [[listen]]: an app needs at least one listening socket")
		}
	}
	names, addrs := map[string]int{}, map[string]int{}
	for i, l := range app.Listen {
		if j, dup := names[l.Name]; dup && l.Name != "" {
			d.errorAt(fmt.Sprintf("listen.%d.name", i), "", "listen name %q is already used by listener %d", l.Name, j+1)
		}
		names[l.Name] = i
		if j, dup := addrs[l.Address]; dup && l.Address != "" {
			d.errorAt(fmt.Sprintf("listen.%d.address", i), "", "address %q is already used by listener %d", l.Address, j+1)
		}
		addrs[l.Address] = i
	}
	if _, written := d.idx["drain_delay"]; written && app.DrainDelay > 0 && !app.Metrics.On() {
		if _, tried := d.idx["metrics.listen"]; !tried { // a refused listen has its error
			d.errorAt("drain_delay", "", "drain_delay needs [metrics] listen: without /readyz no load balancer sees the drain")
		}
	}
	if m := app.Metrics.Listen; m.Address != "" {
		if j, dup := addrs[m.Address]; dup {
			d.errorAt("metrics.listen", "", "metrics listen %q is already used by listener %d", m.Address, j+1)
		}
	}
}

// checkReusePort refuses what reuseport mode cannot do: it binds every
// listener once per worker, which only TCP allows (a unix socket path or
// abstract name can be bound once).
func (d *decoder) checkReusePort(app *App) {
	if n := app.Workers.N * len(app.Listen); !app.Workers.Auto && n > MaxReusePortSockets {
		d.errorAt("workers", "",
			"mode = \"reuseport\" writes one socket unit per worker and listener: %d workers × %d listeners = %d, more than %d",
			app.Workers.N, len(app.Listen), n, MaxReusePortSockets)
	}
	for i, l := range app.Listen {
		if l.Kind == ListenUnix || l.Kind == ListenAbstract {
			d.errorAt(fmt.Sprintf("listen.%d.address", i), "",
				"mode = \"reuseport\" binds every listener once per worker, which only TCP allows; %q is a unix socket (use mode = \"shared\" or \"round-robin\")", l.Address)
		}
		key := fmt.Sprintf("listen.%d.reuse_port", i)
		if _, written := d.idx[key]; written && !l.ReusePort {
			d.errorAt(key, "", "reuse_port = false contradicts mode = \"reuseport\", which sets ReusePort=yes on every socket")
		}
	}
}

func (d *decoder) checkCommand(command []string) {
	_, written := d.idx["command"]
	switch {
	case command == nil && written:
		return // not an array of strings: already reported
	case len(command) == 0 && written:
		d.errorAt("command", "", "command: must name a program, e.g. [\"/usr/bin/node\", \"server.js\"]")
	case len(command) == 0:
		d.errorAt("", "", "missing required key \"command\" (e.g. command = [\"/usr/bin/node\", \"server.js\"])")
	case command[0] == "" || strings.Contains(command[0], "/") && !filepath.IsAbs(command[0]):
		d.errorAt("command.0", "", "command[0] %q must be an absolute path or a program name looked up in $PATH", command[0])
	}
}

// readyText is a Readiness as an app file writes it.
func readyText(r Readiness) string {
	if r.Kind == ReadyDelay {
		return r.Delay.String()
	}
	return string(r.Kind)
}

// CheckHost checks what Parse cannot, because it depends on the machine
// and not on the file: the working directory must exist, be a directory
// and be searchable by this process (a dispatcher calls it as the
// service's user). Parse does not call it: the generator runs early at
// boot, when the directory's file system may not be mounted yet; `cohort
// check` and the dispatcher (at start and on every reload) do, so that a
// missing directory is one clear error instead of workers failing to
// start over and over. The error is an Errors located at the key when
// the App was read from a file.
func CheckHost(app *App) error {
	dir := app.WorkingDirectory
	if dir == "" {
		return nil
	}
	msg := ""
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		msg = fmt.Sprintf("working_directory %q does not exist on this host", dir)
	case err != nil:
		msg = fmt.Sprintf("working_directory %q: %v", dir, err)
	case !fi.IsDir():
		msg = fmt.Sprintf("working_directory %q is not a directory", dir)
	default:
		if err := unix.Access(dir, unix.X_OK); err != nil {
			msg = fmt.Sprintf("working_directory %q cannot be entered by uid %d: %v", dir, os.Getuid(), err)
		}
	}
	if msg == "" {
		return nil
	}
	if app.Path == "" {
		return errors.New(msg) // an App built without a file
	}
	p := app.workingDirAt
	return Errors{{File: app.Path, Line: p.line, Col: p.col, Msg: msg}}
}
