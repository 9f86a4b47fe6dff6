// Package generator turns cohort app files into systemd units: it is the
// body of cohort-generator (which systemd runs at boot and on every
// daemon-reload) and of `cohort generate`.
//
// Like systemd's own generators it writes only into the output directory it
// is given, logs one line per problem and skips a bad app file, and never
// lets one app stop the others.
package generator

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator/running"
	"github.com/cohort-dev/cohort/internal/cpuset"
	"github.com/cohort-dev/cohort/units"
)

// DefaultCohortPath is where the package installs the cohort binary, which
// generated services run as `cohort dispatch FILE`.
const DefaultCohortPath = "/usr/bin/cohort"

// UnitDirs are the directories whose units an app must not shadow or be
// shadowed by: the administrator's and the vendors'.
func UnitDirs() []string {
	return []string{"/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"}
}

// How much longer than the dispatcher's own deadlines systemd waits.
const (
	startMargin = 15 * time.Second
	stopMargin  = 10 * time.Second
)

// MaxAppUnitBytes bounds what the units of one app may hold in all. Every
// socket unit repeats the [unit] and [socket] pass-through directives, so
// in reuseport mode a file within config's limits could still render to a
// gigabyte; Render stops at this budget instead, keeping the generator's
// memory bounded whatever the file holds.
const MaxAppUnitBytes = 8 << 20

// Options says where the generator looks.
type Options struct {
	CohortPath string   // the binary in ExecStart=; DefaultCohortPath when empty
	UnitDirs   []string // checked for name clashes; none when empty
	// SystemdVersion is the running systemd's version (RunningSystemd);
	// 0 when unknown, which renders units that work on every version.
	// From 254 on, the service has DelegateSubgroup=, which puts the
	// dispatcher into its leaf of the delegated subtree before it runs;
	// before, the dispatcher moves itself there (see dispatcher/cgroups.go).
	SystemdVersion int
	// CPUs is how many workers `workers = "auto"` means in reuseport mode,
	// where the generator must emit one socket set per worker; 0 counts
	// the CPUs this process may run on (see AvailableCPUs).
	CPUs int
	// RunningDir holds the running configurations of the apps that run
	// (running.Dir under systemd): an app file that does not validate is
	// rendered from its app's snapshot there, so that a running app keeps
	// its units. "" renders nothing for a bad file.
	RunningDir string
}

// Units are the unit files of one app, and the socket units that
// sockets.target should want when the app is enabled.
type Units struct {
	Files []units.File
	Wants []string
}

// Render builds the units of a validated app.
func Render(app *appfile.App, opts Options) (*Units, error) {
	cohort := opts.CohortPath
	if cohort == "" {
		cohort = DefaultCohortPath
	}
	service := app.Name + ".service"
	sockets, err := Sockets(app, opts.CPUs)
	if err != nil {
		return nil, err
	}
	// Every socket unit repeats the [unit] and [socket] directives:
	// refuse before rendering what would pass the budget anyway.
	perSocket := directiveBytes(app.Unit) + directiveBytes(app.Socket)
	if n := len(sockets) * perSocket; n > MaxAppUnitBytes {
		return nil, unitBudgetError(app, len(sockets))
	}
	socketNames := make([]string, len(sockets))
	for i, s := range sockets {
		socketNames[i] = s.Unit
	}
	if app.Metrics.On() {
		// Its own unit, like a listener's: systemd holds it across
		// restarts of the service, so scrapes and readiness probes
		// queue instead of being refused while the dispatcher restarts.
		socketNames = append(socketNames, MetricsSocket(app))
	}

	prepare := []string{cohort, "dispatch-prepare", app.Path}
	out := &Units{}
	size := 0
	for i, sock := range sockets {
		l := sock.Listener
		s := &units.Socket{
			Name:               sock.Unit,
			Description:        fmt.Sprintf("cohort app %s: listener %s on %s", app.Name, l.Name, l.Address),
			SourcePath:         app.Path,
			Service:            service,
			ListenStream:       listenStream(l),
			FileDescriptorName: sock.FDName,
			Backlog:            l.Backlog,
			ReusePort:          l.ReusePort || app.Mode == appfile.ModeReusePort,
			NoDelay:            l.NoDelay,
			KeepAlive:          l.KeepAlive,
			SocketUser:         l.SocketUser,
			SocketGroup:        l.SocketGroup,
			SocketMode:         l.SocketMode,
			ExtraUnit:          options(app.Unit),
			ExtraSocket:        options(app.Socket),
		}
		if sock.Slot >= 0 {
			s.Description = fmt.Sprintf("cohort app %s: listener %s on %s for worker %d", app.Name, l.Name, l.Address, sock.Slot)
		}
		if i == 0 {
			s.Wants = socketNames[1:]
			// The main socket records the running configuration
			// before systemd binds, so that a socket-activated app
			// whose service never started keeps its sockets through a
			// bad edit too, and forgets it when stopped (see
			// docs/config.md, "A bad edit").
			s.ExecStartPre = prepare
			s.ExecStopPost = []string{cohort, "dispatch-prepare", "--remove", app.Path}
		} else {
			s.PartOf = socketNames[0]
		}
		f, err := s.Render()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", app.Path, err)
		}
		if size += len(f.Content); size > MaxAppUnitBytes {
			return nil, unitBudgetError(app, len(sockets))
		}
		out.Files = append(out.Files, f)
	}

	if app.Metrics.On() {
		l := app.Metrics.Listen
		s := &units.Socket{
			Name:               MetricsSocket(app),
			Description:        fmt.Sprintf("cohort app %s: metrics, readiness and liveness on %s", app.Name, l.Address),
			SourcePath:         app.Path,
			Service:            service,
			ListenStream:       listenStream(l),
			FileDescriptorName: appfile.MetricsFDName,
			PartOf:             socketNames[0],
			// [unit] applies to every unit of the app; [socket] tunes
			// the app's own listeners, not this one.
			ExtraUnit: options(app.Unit),
		}
		f, err := s.Render()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", app.Path, err)
		}
		out.Files = append(out.Files, f)
	}

	workers := workersText(app.Workers)
	if app.Mode == appfile.ModeReusePort {
		workers = fmt.Sprint(len(sockets) / len(app.Listen))
	}
	svc := &units.Service{
		Name:             service,
		Description:      fmt.Sprintf("cohort app %s (%s workers, %s mode)", app.Name, workers, app.Mode),
		SourcePath:       app.Path,
		Sockets:          socketNames,
		ExecStartPre:     prepare,
		ExecStart:        []string{cohort, "dispatch", app.Path},
		User:             app.User,
		Group:            app.Group,
		RuntimeDirectory: "cohort/" + app.Name,
		// The dispatcher reports READY=1 after ready_timeout at the latest,
		// and kills workers after stop_timeout: systemd waits a little
		// longer so that it never cuts the dispatcher short.
		StartTimeout: addMargin(app.ReadyTimeout, startMargin),
		// A stop drains for drain_delay before stop_timeout begins.
		StopTimeout: addMargin(addMargin(app.StopTimeout, app.DrainDelay), stopMargin),
		Hardening:   app.Hardening,
		// Every worker gets a cgroup of its own in the service's
		// delegated subtree (dispatcher/cgroups.go).
		Delegate:     true,
		ExtraUnit:    options(app.Unit),
		ExtraService: options(app.Service),
		// The dispatcher's own lines are "web[pid]:", its workers'
		// "web.2/4711[pid]:" (the dispatcher's logrelay.JournalIdentifier).
		SyslogIdentifier: app.Name,
	}
	if opts.SystemdVersion >= MinDelegateSubgroup {
		svc.DelegateSubgroup = appfile.SupervisorCgroup
	}
	n := len(sockets) / max(len(app.Listen), 1) // reuseport: the slots
	if app.Mode != appfile.ModeReusePort {
		if n, err = workerCount(app, opts.CPUs); err != nil {
			return nil, err
		}
	}
	svc.LogRateLimit = JournalRateLimit(app.LogRateLimit, n)
	// A journald limit or identifier the file sets itself wins: files
	// written before cohort sized them (the documented workaround for a
	// flooding app was [service] LogRateLimitIntervalSec = 0) must keep
	// generating after an upgrade rather than fail at the next boot.
	for _, d := range app.Service {
		switch d.Key {
		case "LogRateLimitIntervalSec", "LogRateLimitBurst":
			svc.LogRateLimit = nil
		case "SyslogIdentifier":
			svc.SyslogIdentifier = ""
		}
	}
	// Type=notify with an ExecReload= that waits, on every systemd
	// version: the generator does not need to know which one runs.
	// systemd ≥ 253 has Type=notify-reload (SIGHUP, then RELOADING=1
	// … READY=1), but it has no way for the service to say that a
	// reload failed: only a timeout fails it (systemd.service(5),
	// TimeoutStartSec=), so `systemctl reload` would succeed after a
	// rolling reload that kept the old workers. ExecReload= is a
	// control process whose exit status systemd takes as the reload's
	// result, on 252 as on 257. `cohort dispatch-reload` asks the
	// dispatcher over its control socket and exits 1 on failure;
	// `kill -HUP $MAINPID` would return at once. The dispatcher's
	// RELOADING=1/READY=1 (also sent for a SIGHUP that did not come
	// from systemd) keep the unit's state "reloading" meanwhile. It runs
	// as root ("+"): it validates the file and records the configuration
	// it reloaded as the running one, which only root may write.
	svc.ExecReload = []string{cohort, "dispatch-reload", app.Path}
	f, err := svc.Render()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", app.Path, err)
	}
	out.Files = append(out.Files, f)
	if app.Enable {
		out.Wants = socketNames
	}
	return out, nil
}

// workerCount is the number of workers app runs here: workers = "auto"
// counts the CPUs the generator may run on, which is what the service's
// dispatcher counts too unless CPUAffinity= narrows it (then fewer
// workers share the same unit budget: still enough).
func workerCount(app *appfile.App, cpus int) (int, error) {
	if app.Workers.Auto && cpus == 0 {
		n, err := AvailableCPUs()
		if err != nil {
			return 0, fmt.Errorf("%s: workers = \"auto\": %w", app.Path, err)
		}
		cpus = n
	}
	return app.Workers.Count(cpus), nil
}

// Journal rate limit sizing (issue 15.1): the dispatcher's own lines per
// interval that journald's limit leaves room for, on top of the workers'
// budgets: a start, reload or stop is a few lines per worker, and each
// slot's "lines suppressed" report one more.
const (
	dispatcherLines          = 1000
	dispatcherLinesPerWorker = 100
)

// JournalRateLimit is the service's LogRateLimitIntervalSec= and
// LogRateLimitBurst= for the dispatcher's per-slot budget lim with
// workers slots: journald's window of one interval can overlap two of a
// slot's windows (dispatcher/ratelimit.go), so 2 × workers × burst, plus
// the dispatcher's own lines. No limit in the app file is no limit in
// journald either (interval 0).
func JournalRateLimit(lim appfile.LogRateLimit, workers int) *units.LogRateLimit {
	if lim.Off() {
		return &units.LogRateLimit{}
	}
	n := 2*uint64(workers)*uint64(lim.Burst) + dispatcherLines + dispatcherLinesPerWorker*uint64(workers)
	return &units.LogRateLimit{Interval: lim.Interval, Burst: uint32(min(n, math.MaxUint32))}
}

// addMargin is d + margin, saturating at the longest time.Duration: the
// config bounds durations (appfile.MaxDuration), and an App built some other
// way must not wrap around into a negative timeout that drops the
// directive.
func addMargin(d, margin time.Duration) time.Duration {
	if d > math.MaxInt64-margin {
		return math.MaxInt64
	}
	return d + margin
}

// MetricsSocket is the name of app's metrics socket unit,
// <app>-cohort-metrics.socket: listener names may not start with
// "cohort-", so no listener's unit has it.
func MetricsSocket(app *appfile.App) string {
	return app.Name + "-cohort-metrics.socket"
}

// Socket is one socket unit of an app: which listener it binds, for which
// worker slot, and the names systemd and the dispatcher know it by.
type Socket struct {
	Unit     string // "web.socket", "web-admin.socket", "web-http-1.socket"
	FDName   string // FileDescriptorName=: the listener's name, or "http.1" in reuseport mode
	Listener appfile.Listener
	Slot     int // the worker slot in reuseport mode; -1 otherwise
}

// Sockets lists an app's socket units. The first is always <app>.socket,
// the unit people start and enable; it wants the others.
//
// In shared and round-robin mode there is one per listener, the others
// named <app>-<listener>.socket. In reuseport mode there is one per
// listener and worker slot, all bound to the same address with
// ReusePort=yes: slot i of listener L is <app>-<L>-<i>.socket, with
// FileDescriptorName=<L>.<i> so that the dispatcher can tell the sets
// apart. cpus is what workers = "auto" counts (0: AvailableCPUs).
func Sockets(app *appfile.App, cpus int) ([]Socket, error) {
	if app.Mode != appfile.ModeReusePort {
		out := make([]Socket, len(app.Listen))
		for i, l := range app.Listen {
			out[i] = Socket{Unit: app.Name + "-" + l.Name + ".socket", FDName: l.Name, Listener: l, Slot: -1}
		}
		if len(out) > 0 {
			out[0].Unit = app.Name + ".socket"
		}
		return out, nil
	}
	if app.Workers.Auto && cpus == 0 {
		n, err := AvailableCPUs()
		if err != nil {
			return nil, fmt.Errorf("%s: workers = \"auto\": %w", app.Path, err)
		}
		cpus = n
	}
	n := app.Workers.Count(cpus)
	if n*len(app.Listen) > appfile.MaxReusePortSockets {
		return nil, fmt.Errorf("%s: mode = \"reuseport\" writes one socket unit per worker and listener: workers = \"auto\" is %d CPUs here × %d listeners = %d, more than %d; set workers",
			app.Path, n, len(app.Listen), n*len(app.Listen), appfile.MaxReusePortSockets)
	}
	out := make([]Socket, 0, n*len(app.Listen))
	for _, l := range app.Listen {
		for i := range n {
			out = append(out, Socket{
				Unit:     fmt.Sprintf("%s-%s-%d.socket", app.Name, l.Name, i),
				FDName:   appfile.SlotFDName(l.Name, i),
				Listener: l,
				Slot:     i,
			})
		}
	}
	if len(out) > 0 {
		out[0].Unit = app.Name + ".socket"
	}
	return out, nil
}

// AvailableCPUs counts the CPUs this process may use: cpuset.Limit's
// Count, what the dispatcher counts too. systemd runs generators with its
// own affinity and in its own cgroup, so a container's limits (an
// ancestor of both) are seen here as by the service; the service's own
// CPUAffinity= and CPUQuota= only narrow the dispatcher's count.
func AvailableCPUs() (int, error) {
	l, err := cpuset.Read()
	if err != nil {
		return 0, err
	}
	return l.Count(), nil
}

// listenStream renders an address for ListenStream=: ":8080" becomes
// "8080", which systemd binds on all addresses, IPv4 and IPv6.
func listenStream(l appfile.Listener) string {
	if l.Kind == appfile.ListenTCP && strings.HasPrefix(l.Address, ":") {
		return l.Address[1:]
	}
	return l.Address
}

func workersText(w appfile.Workers) string {
	if w.Auto {
		return "auto"
	}
	return fmt.Sprint(w.N)
}

func unitBudgetError(app *appfile.App, sockets int) error {
	return fmt.Errorf("%s: the units would hold more than %d bytes (%d socket units, each with the [unit] and [socket] directives); use fewer workers, listeners or directives",
		app.Path, MaxAppUnitBytes, sockets)
}

// directiveBytes is what ds adds to a unit file, at least.
func directiveBytes(ds []appfile.Directive) int {
	n := 0
	for _, d := range ds {
		n += len(d.Key) + len(d.Value) + 2 // "=" and "\n"
	}
	return n
}

func options(ds []appfile.Directive) []units.Option {
	out := make([]units.Option, len(ds))
	for i, d := range ds {
		out[i] = units.Option{Key: d.Key, Value: d.Value}
	}
	return out
}

// Generator reads every app on a search path and writes their units.
type Generator struct {
	SearchPath []string
	Options    Options
	// Log receives one line per problem ("file:line:col: message"); systemd
	// sends a generator's stderr to the journal.
	Log io.Writer
}

// ErrBadApps is returned (wrapped) by Run when at least one app file was
// skipped; the units of every other app were still written.
var ErrBadApps = errors.New("some app files were skipped")

// Run writes the units of every valid app into dir, and the wants-symlinks
// of enabled apps into dir/sockets.target.wants. It reports each bad file on
// g.Log and goes on with the others. A bad file whose app runs (it has a
// snapshot in Options.RunningDir) is reported too, with "keeping the
// running configuration of APP", and its units are rendered from the
// snapshot, so that a typo and a daemon-reload do not take the sockets
// from a running app; it counts as bad for ErrBadApps.
func (g *Generator) Run(dir string) error {
	files, err := appfile.Discover(g.SearchPath)
	bad := 0
	if err != nil {
		fmt.Fprintf(g.Log, "cohort-generator: %v\n", err)
		bad++
	}
	owner := map[string]string{} // unit name → app file that produced it
	existing := indexUnits(g.Options.UnitDirs)
	for _, path := range files {
		err := g.one(dir, path, owner, existing)
		if errors.Is(err, errKept) {
			bad++
			continue
		}
		if err != nil {
			fmt.Fprintln(g.Log, err)
			fmt.Fprintf(g.Log, "cohort-generator: skipped %s: no units generated for it\n", path)
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d app files: %w", bad, len(files), ErrBadApps)
	}
	return nil
}

func (g *Generator) one(dir, path string, owner, existing map[string]string) error {
	us, err := g.render(path)
	kept := false
	if err != nil {
		from, kerr := g.renderRunning(path)
		if kerr != nil {
			if !errors.Is(kerr, running.ErrNone) {
				fmt.Fprintf(g.Log, "cohort-generator: %s: %v\n", path, kerr)
			}
			return err
		}
		fmt.Fprintln(g.Log, running.KeepMessage(err, appfile.AppName(path)))
		us, kept = from, true
	}
	for _, f := range us.Files {
		if other, taken := owner[f.Name]; taken {
			return fmt.Errorf("%s: unit %s is already generated for %s; rename one of the apps or listeners", path, f.Name, other)
		}
		if other, ok := existing[f.Name]; ok {
			return fmt.Errorf("%s: unit %s already exists as %s; rename the app file (or remove that unit)", path, f.Name, other)
		}
	}
	if err := Write(dir, us, func(name string) { owner[name] = path }); err != nil {
		return err
	}
	if kept {
		// Counted as a bad file (exit status 1), already reported; but
		// the units are written and the app keeps running as it was.
		return errKept
	}
	return nil
}

// errKept marks a bad file whose app was rendered from its running
// configuration: it counts as bad, but has been reported already.
var errKept = errors.New("kept the running configuration")

// render parses and renders the app file at path.
func (g *Generator) render(path string) (*Units, error) {
	app, err := appfile.ParseFile(path)
	if err != nil {
		return nil, err
	}
	us, err := Render(app, g.Options)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return us, nil
}

// renderRunning renders the app of path from its running configuration:
// the same units as the last time the app was started or reloaded, with
// SourcePath= and the commands still naming path. An error wraps
// running.ErrNone when the app has no snapshot (it does not run, or
// RunningDir is "").
func (g *Generator) renderRunning(path string) (*Units, error) {
	if g.Options.RunningDir == "" {
		return nil, running.ErrNone
	}
	app, err := running.Load(g.Options.RunningDir, path)
	if err != nil {
		return nil, err
	}
	return Render(app, g.Options)
}

// Write writes an app's unit files and wants-symlinks into dir, calling
// written for each unit name.
func Write(dir string, us *Units, written func(name string)) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("output directory: %w", err)
	}
	for _, f := range us.Files {
		if err := os.WriteFile(filepath.Join(dir, f.Name), f.Content, 0o644); err != nil {
			return fmt.Errorf("write unit: %w", err)
		}
		if written != nil {
			written(f.Name)
		}
	}
	if len(us.Wants) == 0 {
		return nil
	}
	wants := filepath.Join(dir, "sockets.target.wants")
	if err := os.MkdirAll(wants, 0o755); err != nil {
		return fmt.Errorf("create wants directory: %w", err)
	}
	for _, name := range us.Wants {
		link := filepath.Join(wants, name)
		if err := os.Symlink(filepath.Join(dir, name), link); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("enable %s: %w", name, err)
		}
	}
	return nil
}

// indexUnits maps the unit files in dirs to their paths (the first
// directory wins), reading each directory once: the generator runs at every
// boot, and a stat per unit per directory adds up. Masks (symlinks to
// /dev/null) are left out: they are the administrator saying "not this
// one", and do not clash.
func indexUnits(dirs []string) map[string]string {
	units := map[string]string{}
	masked := map[string]bool{}
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if err != nil {
			continue // a missing vendor directory is normal
		}
		for _, e := range entries {
			name := e.Name()
			if _, seen := units[name]; seen || masked[name] || e.IsDir() {
				continue
			}
			p := filepath.Join(d, name)
			if e.Type()&fs.ModeSymlink != 0 {
				if target, err := os.Readlink(p); err == nil && target == os.DevNull {
					masked[name] = true
					continue
				}
			}
			units[name] = p
		}
	}
	return units
}
