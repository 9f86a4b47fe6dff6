package appfile

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/sys/unix"
)

// ParseFile reads and validates the app file at path. The app's name is the
// file's stem. The error, when not nil, is an Errors listing every problem
// of the file, or a plain error when the file could not be read.
//
// Errors name the file as given; the App records its absolute path, because
// units (SourcePath=, ExecStart=) and a dispatcher started elsewhere must
// find it again.
func ParseFile(path string) (*App, error) {
	app, _, err := ParseFileSource(path)
	return app, err
}

// ParseFileSource is ParseFile that also returns the bytes it read (nil when
// it could not read them), for a caller that maps later findings about the
// App back to the file with Position.
func ParseFileSource(path string) (*App, []byte, error) {
	data, err := ReadRegularFile(path, MaxFileSize)
	if err != nil {
		return nil, nil, fmt.Errorf("read app file: %w", err)
	}
	app, err := Parse(path, data)
	if err != nil {
		return nil, data, err
	}
	if app.Path, err = filepath.Abs(path); err != nil {
		return nil, data, fmt.Errorf("app file %s: %w", path, err)
	}
	return app, data, nil
}

// Position returns where the key at path is written in src, an app file
// that Parse accepted: path is dotted, with array items by index
// ("service.MemoryMax", "command.0", "listen.1.address"). A key that is not
// written gives the position of its closest written ancestor, or 1:1.
func Position(src []byte, path string) (line, col int) {
	p := locate(string(src)).at(path)
	return p.line, p.col
}

// Parse validates the app file contents data, read from path. It never
// panics, whatever data holds; on error it returns nil and an Errors.
func Parse(path string, data []byte) (*App, error) {
	d := &decoder{file: path}
	app := New(AppName(path))
	app.Path = path

	// The decoder's cost grows faster than the file with nesting and
	// dotted keys: refuse such shapes before it runs.
	if err := checkShape(path, data); err != nil {
		return nil, Errors{err}
	}
	var raw map[string]any
	if _, err := toml.Decode(string(data), &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			// The decoder gives no line for some errors at the end of
			// the input (`"\` alone): say line 1 rather than none.
			d.add(&Error{File: path, Line: max(pe.Position.Line, 1), Col: max(pe.Position.Col, 1), Msg: "TOML syntax: " + pe.Message})
		} else {
			d.add(&Error{File: path, Line: 1, Col: 1, Msg: "TOML syntax: " + err.Error()})
		}
		return nil, d.errs
	}
	d.idx = locate(string(data))

	if err := CheckAppName(app.Name); err != nil {
		d.add(&Error{File: path, Line: 1, Col: 1, Msg: err.Error()})
	}
	if why := badText(path, lineText); why != "" {
		// The path goes into SourcePath=, the units' header comment and
		// ExecStart=: a directory named "d\nExecStartPre=…" must not.
		d.add(&Error{File: path, Line: 1, Col: 1, Msg: "the app file's path " + why})
	}
	d.app(raw, app)
	app.NodePreload = NodeProgram(app.Command)
	if d.nodePreload != nil {
		app.NodePreload = *d.nodePreload
		if app.NodePreload && app.Mode == ModeRoundRobin {
			d.errorAt("node_preload", "", "node_preload works in shared and reuseport mode only: in round-robin mode connections arrive over cohort's channel, which Node's public APIs cannot receive fds from (see node_preload in cohort.toml(5))")
		}
	}
	d.validate(app)
	if len(d.errs) > 0 {
		return nil, d.report()
	}
	return app, nil
}

// MaxErrors is how many errors of one file are reported, the first in file
// order; one more line counts the rest ("… and N more errors"). A file of
// 10,000 unknown keys then costs neither 10,000 suggestions nor 10,000 log
// lines.
const MaxErrors = 20

// report returns the errors kept, plus one that counts the others.
func (d *decoder) report() Errors {
	if d.dropped == 0 {
		return d.errs
	}
	noun := "errors"
	if d.dropped == 1 {
		noun = "error"
	}
	return append(d.errs, &Error{File: d.file, Msg: fmt.Sprintf("… and %d more %s", d.dropped, noun)})
}

// AppName is the app name for an app file: its base name without ".toml".
func AppName(path string) string {
	return strings.TrimSuffix(filepath.Base(path), ".toml")
}

// appNameRE is what systemd accepts in a unit name prefix, less '@' (which
// would make the units templates) and '\' (escapes nobody wants in an app
// name).
var appNameRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]+$`)

// The app name's length is bounded by the longest path the dispatcher
// binds in the app's runtime directory, which must fit sockaddr_un.
const (
	// SunPathMax is the size of sockaddr_un.sun_path on Linux, the
	// terminating NUL included.
	SunPathMax = 108
	// RuntimeRoot is where systemd creates an app's RuntimeDirectory=
	// (cohort/<app>), which holds its notify and control sockets.
	RuntimeRoot = "/run/cohort/"
	// MaxRuntimeSocketName is the longest socket file name the dispatcher
	// makes there: "notify-<pid>-<8 hex digits>.sock" with the largest pid
	// Linux can hand out (PID_MAX_LIMIT, 4194304); "control.sock" is
	// shorter. The dispatcher's tests hold it to this.
	MaxRuntimeSocketName = len("notify-4194304-ffffffff.sock")
	// MaxAppName is the longest app name: RuntimeRoot + name + "/" +
	// MaxRuntimeSocketName + NUL must fit SunPathMax, so 66. It also keeps
	// every unit name (at most name + "-" + 64-byte listener name + "-"
	// + 4-digit slot + ".socket", 143 bytes) under systemd's 255.
	MaxAppName = SunPathMax - 1 - len(RuntimeRoot) - len("/") - MaxRuntimeSocketName
)

// CheckAppName reports whether name can prefix systemd unit names and name
// the app's runtime directory.
func CheckAppName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("empty app name")
	case len(name) > MaxAppName:
		return fmt.Errorf("app name %q is %d characters long; at most %d fit (its socket path %s<app>/ + a %d-byte socket name must fit the %d bytes of a unix socket address)",
			name, len(name), MaxAppName, RuntimeRoot, MaxRuntimeSocketName, SunPathMax)
	case !appNameRE.MatchString(name):
		return fmt.Errorf("app name %q (the file name) may hold only letters, digits and _ . : -", name)
	case strings.HasPrefix(name, "-") || strings.HasPrefix(name, "."):
		return fmt.Errorf("app name %q must not start with %q", name, name[:1])
	}
	return nil
}

type decoder struct {
	file    string
	idx     keyIndex
	errs    Errors // the first MaxErrors by position, sorted
	dropped int    // errors found but not kept
	// nodePreload is node_preload when the file sets it.
	nodePreload *bool
}

// keeps reports whether an error at p would be among the first MaxErrors
// of the file; when not, it counts it as dropped, and the caller need not
// build it.
func (d *decoder) keeps(p position) bool {
	if len(d.errs) < MaxErrors {
		return true
	}
	last := d.errs[len(d.errs)-1]
	if p.line < last.Line || p.line == last.Line && p.col < last.Col {
		return true
	}
	d.dropped++
	return false
}

// add inserts e in position order, after any at the same position, and
// drops the last error when more than MaxErrors are kept.
func (d *decoder) add(e *Error) {
	i := sort.Search(len(d.errs), func(i int) bool {
		o := d.errs[i]
		return o.Line > e.Line || o.Line == e.Line && o.Col > e.Col
	})
	d.errs = append(d.errs, nil)
	copy(d.errs[i+1:], d.errs[i:])
	d.errs[i] = e
	if len(d.errs) > MaxErrors {
		d.errs = d.errs[:MaxErrors]
		d.dropped++
	}
}

// label is how a key is named in a message: its path, less any array
// element prefix (the position already says which element).
func label(path string) string {
	parts := strings.Split(path, ".")
	for i := len(parts) - 1; i >= 0; i-- {
		if _, err := strconv.Atoi(parts[i]); err == nil {
			return strings.Join(parts[i+1:], ".")
		}
	}
	return path
}

// errorAt records an error about the key at path.
func (d *decoder) errorAt(path, suggestion, format string, args ...any) {
	p := d.idx.at(path)
	if !d.keeps(p) {
		return
	}
	d.add(&Error{File: d.file, Line: p.line, Col: p.col, Msg: fmt.Sprintf(format, args...), Suggestion: suggestion})
}

// The keys of each table, for unknown-key suggestions.
var (
	appKeys = []string{"command", "environment", "environment_file", "working_directory", "user", "group",
		"workers", "mode", "max_pending", "ack_timeout", "balance", "weights", "sticky", "accept_threads", "accept_interval", "cpu_affinity", "node_preload", "ready", "ready_settle", "ready_timeout", "stop_signal", "kill_mode", "stop_timeout",
		"restart", "watchdog", "limits", "enable", "hardening", "listen", "unit", "service", "socket",
		"reload_batch", "log_rate_limit_interval", "log_rate_limit_burst", "recycle", "metrics", "drain_delay"}
	restartKeys = []string{"initial", "max", "min_uptime"}
	limitsKeys  = []string{"memory_high", "memory_max", "memory_swap_max", "cpu_weight", "cpu_quota", "tasks_max"}
	metricsKeys = []string{"listen", "min_ready"}
	recycleKeys = []string{"memory", "memory_interval", "max_lifetime", "max_lifetime_jitter",
		"max_connections", "max_connections_jitter", "min_interval"}
	listenKeys = []string{"name", "address", "backlog", "reuse_port", "nodelay", "keepalive",
		"socket_user", "socket_group", "socket_mode"}
)

// sortedKeys returns m's keys in file order, so errors come out in order.
func (d *decoder) sortedKeys(prefix string, m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := d.idx.at(joinPath(prefix, keys[i])), d.idx.at(joinPath(prefix, keys[j]))
		if a != b {
			return a.line < b.line || a.line == b.line && a.col < b.col
		}
		return keys[i] < keys[j]
	})
	return keys
}

func (d *decoder) unknown(path, key string, known []string) {
	if p := d.idx.at(path); !d.keeps(p) {
		return // not worth a suggestion
	}
	d.errorAt(path, suggest(key, known), "unknown key %q", key)
}

func (d *decoder) app(raw map[string]any, app *App) {
	for _, k := range d.sortedKeys("", raw) {
		v := raw[k]
		switch k {
		case "command":
			app.Command = d.stringList(k, v, false, execText)
		case "environment":
			app.Environment = d.environment(k, v)
		case "environment_file":
			app.EnvironmentFiles = d.stringList(k, v, true, lineText)
		case "working_directory":
			app.WorkingDirectory, _ = d.str(k, v)
			app.workingDirAt = d.idx.at(k)
		case "user":
			app.User, _ = d.str(k, v)
		case "group":
			app.Group, _ = d.str(k, v)
		case "workers":
			app.Workers = d.workers(k, v)
		case "mode":
			if s, ok := d.str(k, v); ok {
				app.Mode = Mode(s)
			}
		case "max_pending":
			if n, ok := d.integer(k, v, 1, MaxMaxPending, fmt.Sprintf("a number from 1 to %d", MaxMaxPending)); ok {
				app.MaxPending = n
			}
		case "ack_timeout":
			t := d.duration(k, v, app.AckTimeout)
			if t < MinAckTimeout || t > MaxAckTimeout {
				d.errorAt(k, "", "ack_timeout: want a duration from %s to %s, got %s", MinAckTimeout, MaxAckTimeout, t)
				break
			}
			app.AckTimeout = t
		case "balance":
			if s, ok := d.str(k, v); ok {
				app.Balance = s
			}
		case "weights":
			app.Weights = d.weights(k, v)
		case "sticky":
			if s, ok := d.str(k, v); ok {
				app.Sticky = s
			}
		case "accept_threads":
			if n, ok := d.integer(k, v, 1, MaxAcceptThreads, fmt.Sprintf("a number from 1 to %d", MaxAcceptThreads)); ok {
				app.AcceptThreads = n
			}
		case "accept_interval":
			if t, s, ok := d.durationText(k, v, `"1ms" or "500us"`); ok {
				if t < 0 || t > MaxAcceptInterval {
					d.errorAt(k, "", "accept_interval: want a duration from 0 to %s, got %q", MaxAcceptInterval, s)
					break
				}
				app.AcceptInterval = t
			}
		case "cpu_affinity":
			app.CPUAffinity, _ = d.boolean(k, v)
		case "node_preload":
			if b, ok := d.boolean(k, v); ok {
				d.nodePreload = &b
			}
		case "ready":
			app.Ready = d.ready(k, v)
		case "ready_settle":
			app.ReadySettle = d.settle(k, v)
		case "ready_timeout":
			app.ReadyTimeout = d.duration(k, v, app.ReadyTimeout)
		case "stop_signal":
			app.StopSignal = d.signal(k, v)
		case "kill_mode":
			app.KillMode = d.killMode(k, v)
		case "stop_timeout":
			app.StopTimeout = d.duration(k, v, app.StopTimeout)
		case "drain_delay":
			dur, s, ok := d.durationText(k, v, `"5s" or "0s"`)
			if ok && dur > MaxDrainDelay {
				d.errorAt(k, "", "drain_delay: want at most %s, got %q", MaxDrainDelay, s)
				break
			}
			app.DrainDelay = dur
		case "restart":
			d.restart(k, v, &app.Restart)
		case "recycle":
			d.recycle(k, v, &app.Recycle)
		case "watchdog":
			app.Watchdog = d.duration(k, v, 0)
		case "reload_batch":
			app.ReloadBatch = d.reloadBatch(k, v)
		case "log_rate_limit_interval":
			app.LogRateLimit.Interval = d.logInterval(k, v, app.LogRateLimit.Interval)
		case "log_rate_limit_burst":
			if n, ok := d.integer(k, v, 0, MaxLogRateLimitBurst, fmt.Sprintf("a number of lines from 0 (no limit) to %d", MaxLogRateLimitBurst)); ok {
				app.LogRateLimit.Burst = n
			}
		case "limits":
			d.limits(k, v, &app.Limits)
		case "enable":
			app.Enable, _ = d.boolean(k, v)
		case "hardening":
			app.Hardening, _ = d.str(k, v)
		case "listen":
			app.Listen = d.listeners(k, v)
		case "metrics":
			d.metrics(k, v, &app.Metrics)
		case "unit":
			app.Unit = d.directives(k, v)
		case "service":
			app.Service = d.directives(k, v)
		case "socket":
			app.Socket = d.directives(k, v)
		default:
			d.unknown(k, k, appKeys)
		}
	}
}

// typeName names a decoded TOML value's type the way the TOML spec does.
func typeName(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case int64:
		return "integer"
	case float64:
		return "float"
	case bool:
		return "boolean"
	case map[string]any:
		return "table"
	case []map[string]any, []any:
		return "array"
	case time.Time:
		return "date-time"
	}
	return fmt.Sprintf("%T", v)
}

// str reads a string that may reach a unit file: one line of text.
func (d *decoder) str(path string, v any) (string, bool) {
	s, ok := v.(string)
	if !ok {
		d.errorAt(path, "", "%s: want a string, got %s", label(path), typeName(v))
		return "", false
	}
	if !d.checkText(path, label(path), s, lineText) {
		return "", false
	}
	return s, true
}

func (d *decoder) boolean(path string, v any) (bool, bool) {
	b, ok := v.(bool)
	if !ok {
		d.errorAt(path, "", "%s: want true or false, got %s", label(path), typeName(v))
	}
	return b, ok
}

// stringList accepts an array of strings; with single, a lone string too.
// Each string must pass rule; the bad ones are left out.
func (d *decoder) stringList(path string, v any, single bool, rule textRule) []string {
	if s, ok := v.(string); ok && single {
		if !d.checkText(path, path, s, rule) {
			return nil
		}
		return []string{s}
	}
	items, ok := v.([]any)
	if !ok {
		if single {
			d.errorAt(path, "", "%s: want a string or an array of strings, got %s", path, typeName(v))
		} else {
			d.errorAt(path, "", "%s: want an array of strings, got %s", path, typeName(v))
		}
		return nil
	}
	out := make([]string, 0, len(items))
	refused := false
	for i, item := range items {
		s, ok := item.(string)
		if !ok {
			d.errorAt(fmt.Sprintf("%s.%d", path, i), "", "%s[%d]: want a string, got %s", path, i, typeName(item))
			continue
		}
		if !d.checkText(fmt.Sprintf("%s.%d", path, i), fmt.Sprintf("%s[%d]", path, i), s, rule) {
			refused = true
			continue
		}
		out = append(out, s)
	}
	if refused {
		// Reported; nil tells checkCommand not to add "must name a
		// program" for a command whose program was refused.
		return nil
	}
	return out
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func (d *decoder) environment(path string, v any) map[string]string {
	m, ok := v.(map[string]any)
	if !ok {
		d.errorAt(path, "", "%s: want a table of NAME = \"value\", got %s", path, typeName(v))
		return map[string]string{}
	}
	env := make(map[string]string, len(m))
	for _, k := range d.sortedKeys(path, m) {
		kp := joinPath(path, k)
		if !envNameRE.MatchString(k) {
			d.errorAt(kp, "", "environment variable name %q may hold only letters, digits and _ and must not start with a digit", k)
			continue
		}
		switch val := m[k].(type) {
		case string:
			if d.checkText(kp, kp, val, execText) {
				env[k] = val
			}
		case int64, float64, bool:
			d.errorAt(kp, "", "%s: want a string, got %s (write %q)", kp, typeName(val), fmt.Sprint(val))
		default:
			d.errorAt(kp, "", "%s: want a string, got %s", kp, typeName(val))
		}
	}
	return env
}

func (d *decoder) workers(path string, v any) Workers {
	switch val := v.(type) {
	case string:
		if val == "auto" {
			return Workers{Auto: true}
		}
		if n, err := strconv.Atoi(val); err == nil {
			d.errorAt(path, "", "workers: want \"auto\" or a number, got the string %q (write workers = %d)", val, n)
			return Workers{Auto: true}
		}
		d.errorAt(path, suggest(val, []string{"auto"}), "workers: want \"auto\" or a number from 1 to %d, got %q", MaxWorkers, val)
	case int64:
		if val < 1 || val > MaxWorkers {
			d.errorAt(path, "", "workers: %d is out of range 1..%d", val, MaxWorkers)
			break
		}
		return Workers{N: int(val)}
	default:
		d.errorAt(path, "", "workers: want \"auto\" or a number from 1 to %d, got %s", MaxWorkers, typeName(v))
	}
	return Workers{Auto: true}
}

// reloadBatch reads how many slots a rolling reload replaces at once.
func (d *decoder) reloadBatch(path string, v any) int {
	n, ok := d.integer(path, v, 1, MaxWorkers, fmt.Sprintf("a number from 1 to %d", MaxWorkers))
	if !ok {
		return 1
	}
	return n
}

// integer reads a whole number from lo to hi; want names the range in the
// error ("a number from 1 to 64"). ok is false when an error was recorded.
func (d *decoder) integer(path string, v any, lo, hi int64, want string) (int, bool) {
	n, ok := v.(int64)
	if !ok || n < lo || n > hi {
		d.errorAt(path, "", "%s: want %s, got %s", label(path), want, describe(v))
		return 0, false
	}
	return int(n), true
}

// weights reads weights = [2, 1, 1]: one whole number per worker slot.
func (d *decoder) weights(path string, v any) []int {
	list, ok := v.([]any)
	if !ok || len(list) == 0 || len(list) > MaxWeights {
		d.errorAt(path, "", "weights: want a list of 1 to %d numbers, one per worker slot, got %s", MaxWeights, describe(v))
		return nil
	}
	out := make([]int, 0, len(list))
	for i, x := range list {
		n, ok := x.(int64)
		if !ok || n < 1 || n > MaxWeight {
			d.errorAt(fmt.Sprintf("%s.%d", path, i), "", "weights: want whole numbers from 1 to %d, got %s", MaxWeight, describe(x))
			return nil
		}
		out = append(out, int(n))
	}
	return out
}

func (d *decoder) ready(path string, v any) Readiness {
	def := Readiness{Kind: ReadyListening}
	s, ok := d.str(path, v)
	if !ok {
		return def
	}
	switch ReadyKind(s) {
	case ReadyListening, ReadyNotify, ReadyExec:
		return Readiness{Kind: ReadyKind(s)}
	}
	dur, err := ParseDuration(s)
	if err != nil {
		d.errorAt(path, suggest(s, []string{"listening", "notify", "exec"}), "ready: want \"listening\", \"notify\", \"exec\" or a duration such as \"2s\", got %q", s)
		return def
	}
	if dur > MaxDuration {
		d.errorAt(path, "", "ready: %q is longer than the longest duration cohort accepts, %s", s, maxDurationText)
		return Readiness{Kind: ReadyExec}
	}
	return Readiness{Kind: ReadyDelay, Delay: dur}
}

// settle reads ready_settle: a duration, "0s" allowed.
func (d *decoder) settle(path string, v any) time.Duration {
	dur, _, ok := d.durationText(path, v, `"1s" or "0s"`)
	if !ok {
		return DefaultReadySettle
	}
	return dur
}

// logInterval reads log_rate_limit_interval: "0s" (no limit) or a
// duration from MinLogRateLimitInterval to MaxLogRateLimitInterval.
func (d *decoder) logInterval(path string, v any, def time.Duration) time.Duration {
	dur, s, ok := d.durationText(path, v, `"30s" or "0s" (no limit)`)
	if !ok {
		return def
	}
	if dur != 0 && (dur < MinLogRateLimitInterval || dur > MaxLogRateLimitInterval) {
		d.errorAt(path, "", "log_rate_limit_interval: want \"0s\" (no limit) or a duration from %s to %s, got %q", MinLogRateLimitInterval, MaxLogRateLimitInterval, s)
		return def
	}
	return dur
}

// duration reads a positive duration string; on error it returns def.
func (d *decoder) duration(path string, v any, def time.Duration) time.Duration {
	dur, s, ok := d.durationText(path, v, `"30s" or "1min 30s"`)
	if !ok {
		return def
	}
	if dur <= 0 {
		d.errorAt(path, "", "%s: must be longer than 0", label(path))
		return def
	}
	if dur > MaxDuration {
		d.errorAt(path, "", "%s: %q is longer than the longest duration cohort accepts, %s", label(path), s, maxDurationText)
		return def
	}
	return dur
}

// durationText reads a duration written as a string, as systemd writes
// them; examples is what the error for a value of another type suggests,
// with the value itself in seconds when it was a bare number. ok is false
// when an error was recorded.
func (d *decoder) durationText(path string, v any, examples string) (dur time.Duration, text string, ok bool) {
	s, isString := v.(string)
	if !isString {
		hint := ""
		if n, isInt := v.(int64); isInt {
			hint = fmt.Sprintf(" (write \"%ds\")", n)
		}
		d.errorAt(path, "", "%s: want a duration such as %s, got %s%s", label(path), examples, typeName(v), hint)
		return 0, "", false
	}
	dur, err := ParseDuration(s)
	if err != nil {
		d.errorAt(path, "", "%s: %v", label(path), err)
		return 0, s, false
	}
	return dur, s, true
}

var signalNames = []string{"SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGKILL"}

func (d *decoder) signal(path string, v any) syscall.Signal {
	s, ok := d.str(path, v)
	if !ok {
		return syscall.SIGTERM
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		d.errorAt(path, suggest(s, signalNames), "stop_signal: unknown signal %q", s)
		return syscall.SIGTERM
	}
	return sig
}

var killModes = []string{KillModeGroup, KillModeMixed}

// killMode decodes kill_mode; an unknown one is an error at its key and
// leaves the default.
func (d *decoder) killMode(path string, v any) string {
	s, ok := d.str(path, v)
	if !ok {
		return KillModeGroup
	}
	if !slices.Contains(killModes, s) {
		d.errorAt(path, suggest(s, killModes), "kill_mode: want %q or %q, got %q", KillModeGroup, KillModeMixed, s)
		return KillModeGroup
	}
	return s
}

func (d *decoder) restart(path string, v any, r *Restart) {
	m, ok := v.(map[string]any)
	if !ok {
		d.errorAt(path, "", "restart: want a table ([restart]), got %s", typeName(v))
		return
	}
	for _, k := range d.sortedKeys(path, m) {
		kp := joinPath(path, k)
		switch k {
		case "initial":
			r.Initial = d.duration(kp, m[k], r.Initial)
		case "max":
			r.Max = d.duration(kp, m[k], r.Max)
		case "min_uptime":
			r.MinUptime = d.duration(kp, m[k], r.MinUptime)
		default:
			d.unknown(kp, k, restartKeys)
		}
	}
	if r.Initial > r.Max {
		d.errorAt(path, "", "restart: initial (%v) is longer than max (%v)", r.Initial, r.Max)
	}
}

// limits reads [limits]: sizes as systemd writes them (bytes, or K, M, G,
// T with base 1024; "infinity" for none), cpu_quota as a percentage.
func (d *decoder) limits(path string, v any, l *Limits) {
	m, ok := v.(map[string]any)
	if !ok {
		d.errorAt(path, "", "limits: want a table ([limits]), got %s", typeName(v))
		return
	}
	for _, k := range d.sortedKeys(path, m) {
		kp := joinPath(path, k)
		switch k {
		case "memory_high":
			l.MemoryHigh = d.limitSize(kp, m[k], MinMemoryLimit, false)
		case "memory_max":
			l.MemoryMax = d.limitSize(kp, m[k], MinMemoryLimit, false)
		case "memory_swap_max":
			l.MemorySwapMax = d.limitSize(kp, m[k], 1, true)
		case "cpu_weight":
			l.CPUWeight, _ = d.integer(kp, m[k], 1, MaxCPUWeight, fmt.Sprintf("a number from 1 to %d (the default weight is 100)", MaxCPUWeight))
		case "cpu_quota":
			l.CPUQuota = d.percent(kp, m[k])
		case "tasks_max":
			l.TasksMax, _ = d.integer(kp, m[k], 1, MaxTasks, fmt.Sprintf("a number from 1 to %d", MaxTasks))
		default:
			d.unknown(kp, k, limitsKeys)
		}
	}
	if l.MemoryHigh > 0 && l.MemoryMax > 0 && l.MemoryHigh > l.MemoryMax {
		d.errorAt(joinPath(path, "memory_high"), "", "limits: memory_high (%s) is above memory_max (%s): the kernel would kill before it throttles", FormatSize(uint64(l.MemoryHigh)), FormatSize(uint64(l.MemoryMax)))
	}
}

// limitSize reads a [limits] size: "infinity" for none (0), else a size
// as d.size reads one, at least min bytes; zero only where zeroOK (a
// swap max of nothing), which then reads as SwapNone. It returns 0 after
// an error.
func (d *decoder) limitSize(path string, v any, min uint64, zeroOK bool) int64 {
	switch val := v.(type) {
	case string:
		if val == "infinity" {
			return 0
		}
	case int64:
		if val == 0 && zeroOK {
			return SwapNone
		}
	}
	n := d.size(path, v)
	if n == 0 {
		return 0
	}
	if n < min {
		d.errorAt(path, "", "%s: want at least %s, got %s (a size needs its unit: \"512M\")", label(path), FormatSize(min), describe(v))
		return 0
	}
	return int64(n)
}

// percent reads cpu_quota: "50%" … MaxCPUQuota%.
func (d *decoder) percent(path string, v any) int {
	want := fmt.Sprintf(`a percentage of one CPU such as "50%%" or "200%%", from 1%% to %d%%`, MaxCPUQuota)
	s, ok := v.(string)
	num, isPct := strings.CutSuffix(s, "%")
	n, err := strconv.Atoi(num)
	if !ok || !isPct || err != nil || n < 1 || n > MaxCPUQuota || strings.HasPrefix(num, "+") {
		d.errorAt(path, "", "%s: want %s, got %s", label(path), want, describe(v))
		return 0
	}
	return n
}

// metrics decodes the [metrics] table.
func (d *decoder) metrics(path string, v any, m *Metrics) {
	t, ok := v.(map[string]any)
	if !ok {
		d.errorAt(path, "", "metrics: want a table ([metrics]), got %s", typeName(v))
		return
	}
	for _, k := range d.sortedKeys(path, t) {
		kp := joinPath(path, k)
		switch k {
		case "listen":
			s, ok := d.str(kp, t[k])
			if !ok {
				break
			}
			kind, hint, err := ParseAddress(s)
			if err != nil {
				d.errorAt(kp, hint, "metrics listen: %v", err)
				break
			}
			m.Listen = Listener{Name: MetricsFDName, Address: s, Kind: kind}
		case "min_ready":
			m.MinReady, _ = d.integer(kp, t[k], 1, MaxWorkers, fmt.Sprintf("a number of workers from 1 to %d", MaxWorkers))
		default:
			d.unknown(kp, k, metricsKeys)
		}
	}
	if _, written := d.idx[joinPath(path, "listen")]; !m.On() && !written { // a refused listen has its error
		kp := joinPath(path, "min_ready")
		if _, written := d.idx[kp]; written {
			d.errorAt(kp, "", "%s needs [metrics] listen: without /readyz no load balancer sees it", kp)
		}
	}
}

// recycle reads the [recycle] table. What depends on other keys (the
// mode, for max_connections) is checked in validate.
func (d *decoder) recycle(path string, v any, r *Recycle) {
	m, ok := v.(map[string]any)
	if !ok {
		d.errorAt(path, "", "recycle: want a table ([recycle]), got %s", typeName(v))
		return
	}
	conns := fmt.Sprintf("a number of connections from 1 to %d", MaxRecycleConnections)
	for _, k := range d.sortedKeys(path, m) {
		kp := joinPath(path, k)
		switch k {
		case "memory":
			r.Memory = d.size(kp, m[k])
		case "memory_interval":
			t := d.duration(kp, m[k], r.MemoryInterval)
			if t < MinRecycleMemoryInterval {
				d.errorAt(kp, "", "memory_interval: want at least %s, got %s", MinRecycleMemoryInterval, t)
				break
			}
			r.MemoryInterval = t
		case "max_lifetime":
			r.MaxLifetime = d.duration(kp, m[k], 0)
		case "max_lifetime_jitter":
			r.LifetimeJitter, _, _ = d.durationText(kp, m[k], `"1h" or "0s"`)
		case "max_connections":
			r.MaxConnections, _ = d.integer(kp, m[k], 1, MaxRecycleConnections, conns)
		case "max_connections_jitter":
			r.ConnectionsJitter, _ = d.integer(kp, m[k], 0, MaxRecycleConnections, fmt.Sprintf("a number of connections from 0 to %d", MaxRecycleConnections))
		case "min_interval":
			dur, s, ok := d.durationText(kp, m[k], `"10s" or "0s"`)
			if ok && dur > MaxDuration {
				d.errorAt(kp, "", "min_interval: %q is longer than the longest duration cohort accepts, %s", s, maxDurationText)
				break
			}
			if ok {
				r.MinInterval = dur
			}
		default:
			d.unknown(kp, k, recycleKeys)
		}
	}
	if r.LifetimeJitter > MaxDuration {
		d.errorAt(joinPath(path, "max_lifetime_jitter"), "", "max_lifetime_jitter is longer than the longest duration cohort accepts, %s", maxDurationText)
		r.LifetimeJitter = 0
	}
	// A modifier without its policy is a mistake the user would not see
	// otherwise: nothing would be recycled. (Sorted for file order.)
	for _, p := range [][2]string{{"max_connections_jitter", "max_connections"}, {"max_lifetime_jitter", "max_lifetime"}, {"memory_interval", "memory"}} {
		_, mod := m[p[0]]
		_, base := m[p[1]]
		if mod && !base {
			d.errorAt(joinPath(path, p[0]), "", "%s applies only with %s, which is not set", p[0], p[1])
		}
	}
}

// size reads a memory size: a string as systemd writes MemoryMax=
// ("400M"), or an integer number of bytes. It returns 0 after an error.
func (d *decoder) size(path string, v any) uint64 {
	switch val := v.(type) {
	case int64:
		if val < 1 || uint64(val) > MaxSize {
			d.errorAt(path, "", "%s: want a size such as \"400M\" or a number of bytes from 1 to %d, got %d", label(path), MaxSize, val)
			return 0
		}
		return uint64(val)
	case string:
		b, err := ParseSize(val)
		if err != nil {
			d.errorAt(path, "", "%s: %v", label(path), err)
			return 0
		}
		return b
	}
	d.errorAt(path, "", "%s: want a size such as \"400M\", got %s", label(path), typeName(v))
	return 0
}

func (d *decoder) listeners(path string, v any) []Listener {
	var tables []map[string]any
	switch val := v.(type) {
	case []map[string]any:
		tables = val
	case []any:
		for i, item := range val {
			t, ok := item.(map[string]any)
			if !ok {
				d.errorAt(fmt.Sprintf("%s.%d", path, i), "", "listen[%d]: want a table, got %s", i, typeName(item))
				continue
			}
			tables = append(tables, t)
		}
	default:
		d.errorAt(path, "", "listen: want [[listen]] tables, got %s", typeName(v))
		return nil
	}
	if len(tables) > MaxListeners {
		d.errorAt(fmt.Sprintf("%s.%d", path, MaxListeners), "", "listen: more than %d listeners", MaxListeners)
		tables = tables[:MaxListeners]
	}
	out := make([]Listener, 0, len(tables))
	for i, t := range tables {
		out = append(out, d.listener(fmt.Sprintf("%s.%d", path, i), t))
	}
	return out
}

var fdNameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)

func (d *decoder) listener(path string, t map[string]any) Listener {
	var l Listener
	for _, k := range d.sortedKeys(path, t) {
		kp := joinPath(path, k)
		v := t[k]
		switch k {
		case "name":
			l.Name, _ = d.str(kp, v)
			if l.Name != "" && !fdNameRE.MatchString(l.Name) {
				d.errorAt(kp, "", "listen name %q may hold only letters, digits and _ . - (at most 64)", l.Name)
			} else if strings.HasPrefix(l.Name, "cohort-") {
				d.errorAt(kp, "", "listen name %q: names starting with \"cohort-\" are reserved", l.Name)
			}
		case "address":
			if s, ok := d.str(kp, v); ok {
				l.Address = s
				kind, hint, err := ParseAddress(s)
				if err != nil {
					d.errorAt(kp, hint, "%v", err)
				}
				l.Kind = kind
			}
		case "backlog":
			l.Backlog, _ = d.integer(kp, v, 1, 65535, "a number from 1 to 65535")
		case "reuse_port":
			l.ReusePort, _ = d.boolean(kp, v)
		case "nodelay":
			l.NoDelay, _ = d.boolean(kp, v)
		case "keepalive":
			l.KeepAlive, _ = d.boolean(kp, v)
		case "socket_user":
			l.SocketUser, _ = d.str(kp, v)
		case "socket_group":
			l.SocketGroup, _ = d.str(kp, v)
		case "socket_mode":
			l.SocketMode = d.fileMode(kp, v)
		default:
			d.unknown(kp, k, listenKeys)
		}
	}
	// A name or address that was written but refused has its error
	// already.
	if _, written := d.idx[path+".name"]; l.Name == "" && !written {
		d.errorAt(path, "", "[[listen]] needs a name (the socket's FileDescriptorName=, e.g. name = \"http\")")
	}
	if _, written := d.idx[path+".address"]; l.Address == "" && !written {
		d.errorAt(path, "", "[[listen]] needs an address (\"127.0.0.1:8080\", \"[::1]:8080\", \":8080\", \"/run/app.sock\" or \"@abstract\")")
	}
	if l.Kind == ListenTCP {
		for key, set := range map[string]bool{"socket_user": l.SocketUser != "", "socket_group": l.SocketGroup != "", "socket_mode": l.SocketMode != 0} {
			if set {
				d.errorAt(joinPath(path, key), "", "%s applies only to unix socket paths, not to %q", key, l.Address)
			}
		}
	} else if l.Kind != "" {
		for key, set := range map[string]bool{"nodelay": l.NoDelay, "keepalive": l.KeepAlive} {
			if set {
				d.errorAt(joinPath(path, key), "", "%s applies only to TCP addresses, not to %q", key, l.Address)
			}
		}
	}
	return l
}

// describe prints a value for an error message: strings quoted, others as
// their type and value.
func describe(v any) string {
	switch val := v.(type) {
	case string:
		return strconv.Quote(val)
	case int64, float64, bool:
		return fmt.Sprintf("%s %v", typeName(v), val)
	}
	return typeName(v)
}

func (d *decoder) fileMode(path string, v any) uint32 {
	s, ok := v.(string)
	if !ok {
		d.errorAt(path, "", "%s: want an octal mode as a string, e.g. \"0660\", got %s", label(path), describe(v))
		return 0
	}
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o7777 {
		d.errorAt(path, "", "%s: %q is not an octal file mode such as \"0660\"", label(path), s)
		return 0
	}
	return uint32(m)
}

// ParseAddress checks a listen address and says what kind it is. On error,
// hint may hold a corrected address to suggest.
//
// The address reaches ListenStream= and Description= of a unit: it must be
// one line of text (see badText), and a unix path or abstract name must
// not end with a backslash or a space, which systemd would read as a
// continuation line or strip.
func ParseAddress(s string) (kind ListenKind, hint string, err error) {
	if why := badText(s, lineText); why != "" {
		return "", "", fmt.Errorf("address %s %s", quoteShort(s), why)
	}
	switch {
	case s == "":
		return "", "", fmt.Errorf("empty address")
	case (strings.HasPrefix(s, "@") || strings.HasPrefix(s, "/")) && unitLineEnd(s) != "":
		return "", "", fmt.Errorf("unix socket address %q %s", s, unitLineEnd(s))
	case strings.HasPrefix(s, "@"):
		if len(s) < 2 || len(s) > 107 {
			return "", "", fmt.Errorf("abstract socket name %q must have 1 to 106 characters after @", s)
		}
		return ListenAbstract, "", nil
	case strings.HasPrefix(s, "/"):
		if len(s) > 107 {
			return "", "", fmt.Errorf("unix socket path %q is longer than 107 bytes", s)
		}
		if filepath.Clean(s) != s {
			return "", filepath.Clean(s), fmt.Errorf("unix socket path %q is not clean", s)
		}
		return ListenUnix, "", nil
	}
	host, port, err := splitHostPort(s)
	if err != nil {
		return "", "", fmt.Errorf("address %q: %v", s, err)
	}
	n, perr := strconv.Atoi(port)
	if perr != nil || n < 1 || n > 65535 {
		return "", "", fmt.Errorf("address %q: port %q is not a number from 1 to 65535", s, port)
	}
	if strings.Contains(host, "%") && isIPLiteral(host) {
		// socket_address_parse() hands what is inside the brackets to
		// inet_pton(), which knows no zones: systemd refuses the socket
		// unit, and only `cohort run` could bind it.
		return "", "", fmt.Errorf("address %q: systemd's ListenStream= takes no IPv6 zone (%%%s); write the address without it and add [socket] BindToDevice = %q", s, host[strings.IndexByte(host, '%')+1:], host[strings.IndexByte(host, '%')+1:])
	}
	if host != "" && !isIPLiteral(host) {
		if host == "localhost" {
			hint = "127.0.0.1:" + port
		}
		return "", hint, fmt.Errorf("address %q: host must be an IP address (systemd binds addresses, it does not resolve names)", s)
	}
	return ListenTCP, "", nil
}

func splitHostPort(s string) (host, port string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]")
		if end < 0 || !strings.HasPrefix(s[end+1:], ":") {
			return "", "", fmt.Errorf("want [v6address]:port")
		}
		host, port = s[1:end], s[end+2:]
		if !strings.Contains(host, ":") {
			return "", "", fmt.Errorf("brackets are for IPv6 addresses")
		}
		return host, port, nil
	}
	i := strings.LastIndex(s, ":")
	if i < 0 {
		return "", "", fmt.Errorf("want host:port, [v6]:port, :port, /path.sock or @abstract")
	}
	host, port = s[:i], s[i+1:]
	if strings.Contains(host, ":") {
		return "", "", fmt.Errorf("IPv6 addresses need brackets: [%s]:%s", host, port)
	}
	return host, port, nil
}

func isIPLiteral(host string) bool {
	if strings.Contains(host, ":") {
		// IPv6 (a %zone is refused by ParseAddress).
		h, _, _ := strings.Cut(host, "%")
		for _, c := range h {
			if !(c == ':' || c == '.' || c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
		return strings.Count(h, ":") >= 2
	}
	parts := strings.Split(host, ".")
	if len(parts) != 4 {
		return false
	}
	for _, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 255 || len(p) > 1 && p[0] == '0' {
			return false
		}
	}
	return true
}

var directiveRE = regexp.MustCompile(`^[A-Z][A-Za-z0-9]*$`)

// reserved are directives cohort writes itself; setting them through a
// pass-through table would fight the generated unit.
var reserved = map[string]map[string]string{
	"unit": {"SourcePath": "it always names the app file"},
	"service": {
		"Type": "cohort's dispatcher speaks sd_notify", "ExecStart": "use command", "ExecReload": "cohort reloads itself",
		"NotifyAccess": "cohort sets it", "KillMode": "cohort stops its workers itself",
		"User": "use the top-level user key", "Group": "use the top-level group key", "DynamicUser": "leave user unset for DynamicUser=yes",
		"WorkingDirectory": "use working_directory", "TimeoutStopSec": "use stop_timeout",
	},
	"socket": {
		"ListenStream": "use [[listen]]", "FileDescriptorName": "use [[listen]] name", "Service": "cohort sets it",
		"Backlog": "use [[listen]] backlog", "ReusePort": "use [[listen]] reuse_port", "NoDelay": "use [[listen]] nodelay",
		"KeepAlive": "use [[listen]] keepalive", "SocketUser": "use [[listen]] socket_user",
		"SocketGroup": "use [[listen]] socket_group", "SocketMode": "use [[listen]] socket_mode",
	},
}

// directives reads a pass-through table: Directive = "value", a number, a
// boolean (yes/no) or an array of those (the directive repeated).
func (d *decoder) directives(section string, v any) []Directive {
	m, ok := v.(map[string]any)
	if !ok {
		d.errorAt(section, "", "%s: want a table ([%s]) of systemd directives, got %s", section, section, typeName(v))
		return nil
	}
	var out []Directive
	for _, k := range d.sortedKeys(section, m) {
		kp := joinPath(section, k)
		if !directiveRE.MatchString(k) {
			d.errorAt(kp, "", "[%s] %q is not a systemd directive name (CamelCase letters and digits, e.g. LimitNOFILE)", section, k)
			continue
		}
		if why, ok := reserved[section][k]; ok {
			d.errorAt(kp, "", "[%s] %s is set by cohort: %s", section, k, why)
			continue
		}
		values := []any{m[k]}
		if list, isList := m[k].([]any); isList {
			values = list
		}
		for _, val := range values {
			if len(out) == MaxDirectives {
				d.errorAt(kp, "", "[%s]: more than %d directives", section, MaxDirectives)
				return out
			}
			s, ok := directiveValue(val)
			if !ok {
				d.errorAt(kp, "", "[%s] %s: want a string, number, boolean or an array of them, got %s", section, k, typeName(val))
				continue
			}
			if why := badText(s, lineText); why != "" {
				d.errorAt(kp, "", "[%s] %s = %s %s", section, k, quoteShort(s), why)
				continue
			}
			if why := unitLineEnd(s); why != "" {
				d.errorAt(kp, "", "[%s] %s = %q %s", section, k, s, why)
				continue
			}
			out = append(out, Directive{Key: k, Value: s})
		}
	}
	return out
}

func directiveValue(v any) (string, bool) {
	switch val := v.(type) {
	case string:
		return val, true
	case int64:
		return strconv.FormatInt(val, 10), true
	case float64:
		return strconv.FormatFloat(val, 'f', -1, 64), true
	case bool:
		if val {
			return "yes", true
		}
		return "no", true
	}
	return "", false
}
