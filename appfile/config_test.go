package appfile

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

const minimal = `command = ["/usr/bin/node", "server.js"]
[[listen]]
name = "http"
address = "127.0.0.1:8080"
`

func TestParseGood(t *testing.T) {
	tests := []struct {
		name  string
		src   string
		check func(t *testing.T, app *App)
	}{
		{"defaults", minimal, func(t *testing.T, app *App) {
			want := New("web")
			want.Path = "/etc/cohort/web.toml"
			want.Command = []string{"/usr/bin/node", "server.js"}
			want.Listen = []Listener{{Name: "http", Address: "127.0.0.1:8080", Kind: ListenTCP}}
			want.NodePreload = true // the program is node
			if app.KillMode != KillModeGroup {
				t.Errorf("kill_mode = %q, want %q", app.KillMode, KillModeGroup)
			}
			if !reflect.DeepEqual(app, want) {
				t.Errorf("got  %+v\nwant %+v", app, want)
			}
		}},
		{"node_preload", "node_preload = false\n" + minimal, func(t *testing.T, app *App) {
			if app.NodePreload {
				t.Error("node_preload = false is on")
			}
		}},
		{"node_preload default off for other programs", "command = [\"/bin/sh\", \"-c\", \"exec node x.js\"]\n" + listenHTTP, func(t *testing.T, app *App) {
			if app.NodePreload {
				t.Error("preload on for /bin/sh")
			}
		}},
		{"node_preload on for a shell", "node_preload = true\nmode = \"reuseport\"\ncommand = [\"/bin/sh\", \"-c\", \"exec node x.js\"]\n" + listenHTTP, func(t *testing.T, app *App) {
			if !app.NodePreload {
				t.Error("node_preload = true is off")
			}
		}},
		{"limits", minimal + `
[limits]
memory_high = "400M"
memory_max = "512M"
memory_swap_max = 0
cpu_weight = 50
cpu_quota = "150%"
tasks_max = 64
`, func(t *testing.T, app *App) {
			want := Limits{MemoryHigh: 400 << 20, MemoryMax: 512 << 20, MemorySwapMax: SwapNone, CPUWeight: 50, CPUQuota: 150, TasksMax: 64}
			if app.Limits != want || !app.Limits.Any() {
				t.Errorf("limits %+v, want %+v", app.Limits, want)
			}
		}},
		{"limits in bytes and infinity", minimal + "[limits]\nmemory_max = 1073741824\nmemory_swap_max = \"infinity\"\nmemory_high = \"infinity\"\n", func(t *testing.T, app *App) {
			if want := (Limits{MemoryMax: 1 << 30}); app.Limits != want {
				t.Errorf("limits %+v, want %+v", app.Limits, want)
			}
		}},
		{"no limits", minimal, func(t *testing.T, app *App) {
			if app.Limits.Any() {
				t.Errorf("limits %+v, want none", app.Limits)
			}
		}},
		{"balance weighted, sticky, accept threads", "mode = \"round-robin\"\nbalance = \"weighted\"\nweights = [2, 1, 1]\nsticky = \"client-ip\"\naccept_threads = 2\n" + minimal, func(t *testing.T, app *App) {
			if app.Balance != BalanceWeighted || !reflect.DeepEqual(app.Weights, []int{2, 1, 1}) || app.Sticky != StickyClientIP || app.AcceptThreads != 2 {
				t.Errorf("balance %q weights %v sticky %q accept_threads %d", app.Balance, app.Weights, app.Sticky, app.AcceptThreads)
			}
		}},
		{"balance p2c, proxy-protocol", "mode = \"round-robin\"\nbalance = \"p2c\"\nsticky = \"proxy-protocol\"\n" + minimal, func(t *testing.T, app *App) {
			if app.Balance != BalanceP2C || app.Sticky != StickyProxyProtocol || app.AcceptThreads != 0 {
				t.Errorf("balance %q sticky %q accept_threads %d", app.Balance, app.Sticky, app.AcceptThreads)
			}
		}},
		{"accept interval", "mode = \"round-robin\"\naccept_interval = \"500us\"\n" + minimal, func(t *testing.T, app *App) {
			if app.AcceptInterval != 500*time.Microsecond {
				t.Errorf("accept_interval %v, want 500µs", app.AcceptInterval)
			}
		}},
		{"no accept interval", "mode = \"round-robin\"\n" + minimal, func(t *testing.T, app *App) {
			if app.AcceptInterval != 0 {
				t.Errorf("accept_interval %v, want 0", app.AcceptInterval)
			}
		}},
		{"log rate limit", "log_rate_limit_interval = \"1min\"\nlog_rate_limit_burst = 250\n" + minimal, func(t *testing.T, app *App) {
			if want := (LogRateLimit{Interval: time.Minute, Burst: 250}); app.LogRateLimit != want || app.LogRateLimit.Off() {
				t.Errorf("log rate limit %+v, want %+v", app.LogRateLimit, want)
			}
		}},
		{"log rate limit off", "log_rate_limit_interval = \"0s\"\n" + minimal, func(t *testing.T, app *App) {
			if !app.LogRateLimit.Off() || app.LogRateLimit.Burst != DefaultLogRateLimitBurst {
				t.Errorf("log rate limit %+v; want off", app.LogRateLimit)
			}
		}},
		{"log rate limit burst 0", "log_rate_limit_burst = 0\n" + minimal, func(t *testing.T, app *App) {
			if !app.LogRateLimit.Off() || app.LogRateLimit.Interval != DefaultLogRateLimitInterval {
				t.Errorf("log rate limit %+v; want off", app.LogRateLimit)
			}
		}},
		{"everything", `
command = ["node", "server.js", "--port=0"]
environment = { NODE_ENV = "production", PORT = "8080" }
environment_file = ["-/etc/default/web", "/etc/web.env"]
working_directory = "/srv/web"
user = "web"
group = "www-data"
workers = 4
mode = "round-robin"
max_pending = 16
ack_timeout = "2500ms"
balance = "least-connections"
cpu_affinity = true
ready = "notify"
ready_timeout = "1min 30s"
stop_signal = "INT"
kill_mode = "mixed"
stop_timeout = "10s"
watchdog = "5s"
reload_batch = 2
enable = true
hardening = "strict"

[restart]
initial = "250ms"
max = "1m"
min_uptime = "2 s"

[[listen]]
name = "http"
address = "[::1]:8080"
backlog = 1024
reuse_port = true
nodelay = true
keepalive = true

[[listen]]
name = "admin"
address = "/run/web/admin.sock"
socket_user = "web"
socket_group = "adm"
socket_mode = "0660"

[[listen]]
name = "abstract"
address = "@web-private"

[unit]
After = ["postgresql.service", "redis.service"]

[service]
LimitNOFILE = 65536
MemoryMax = "1G"
PrivateNetwork = false

[socket]
Accept = false
`, func(t *testing.T, app *App) {
			if got := app.Command; !reflect.DeepEqual(got, []string{"node", "server.js", "--port=0"}) {
				t.Errorf("command = %q", got)
			}
			if app.Environment["NODE_ENV"] != "production" || app.Environment["PORT"] != "8080" {
				t.Errorf("environment = %v", app.Environment)
			}
			if !reflect.DeepEqual(app.EnvironmentFiles, []string{"-/etc/default/web", "/etc/web.env"}) {
				t.Errorf("environment_file = %q", app.EnvironmentFiles)
			}
			if app.ReloadBatch != 2 {
				t.Errorf("reload_batch = %d, want 2", app.ReloadBatch)
			}
			if app.Workers != (Workers{N: 4}) || app.Mode != ModeRoundRobin || !app.CPUAffinity {
				t.Errorf("workers %+v mode %q affinity %v", app.Workers, app.Mode, app.CPUAffinity)
			}
			if app.MaxPending != 16 || app.Balance != BalanceLeastConnections || app.AckTimeout != 2500*time.Millisecond {
				t.Errorf("max_pending %d balance %q ack_timeout %v", app.MaxPending, app.Balance, app.AckTimeout)
			}
			if app.Ready != (Readiness{Kind: ReadyNotify}) || app.ReadyTimeout != 90*time.Second {
				t.Errorf("ready %+v timeout %v", app.Ready, app.ReadyTimeout)
			}
			if app.StopSignal != syscall.SIGINT || app.KillMode != KillModeMixed || app.StopTimeout != 10*time.Second || app.Watchdog != 5*time.Second {
				t.Errorf("stop %v %q %v watchdog %v", app.StopSignal, app.KillMode, app.StopTimeout, app.Watchdog)
			}
			if app.Restart != (Restart{Initial: 250 * time.Millisecond, Max: time.Minute, MinUptime: 2 * time.Second}) {
				t.Errorf("restart %+v", app.Restart)
			}
			if !app.Enable || app.Hardening != HardeningStrict || app.User != "web" || app.Group != "www-data" {
				t.Errorf("enable %v hardening %q user %q group %q", app.Enable, app.Hardening, app.User, app.Group)
			}
			wantListen := []Listener{
				{Name: "http", Address: "[::1]:8080", Kind: ListenTCP, Backlog: 1024, ReusePort: true, NoDelay: true, KeepAlive: true},
				{Name: "admin", Address: "/run/web/admin.sock", Kind: ListenUnix, SocketUser: "web", SocketGroup: "adm", SocketMode: 0o660},
				{Name: "abstract", Address: "@web-private", Kind: ListenAbstract},
			}
			if !reflect.DeepEqual(app.Listen, wantListen) {
				t.Errorf("listen = %+v", app.Listen)
			}
			wantUnit := []Directive{{"After", "postgresql.service"}, {"After", "redis.service"}}
			wantService := []Directive{{"LimitNOFILE", "65536"}, {"MemoryMax", "1G"}, {"PrivateNetwork", "no"}}
			if !reflect.DeepEqual(app.Unit, wantUnit) || !reflect.DeepEqual(app.Service, wantService) ||
				!reflect.DeepEqual(app.Socket, []Directive{{"Accept", "no"}}) {
				t.Errorf("pass-through: unit %v service %v socket %v", app.Unit, app.Service, app.Socket)
			}
		}},
		{"ready delay and any-port listener", `command = ["/bin/app"]
ready = "1.5s"
[[listen]]
name = "http"
address = ":8080"
`, func(t *testing.T, app *App) {
			if app.Ready != (Readiness{Kind: ReadyDelay, Delay: 1500 * time.Millisecond}) {
				t.Errorf("ready = %+v", app.Ready)
			}
			if app.Listen[0].Kind != ListenTCP {
				t.Errorf("kind = %q", app.Listen[0].Kind)
			}
		}},
		{"default readiness is listening with a settle window", "command = [\"/bin/app\"]\n" + listenHTTP, func(t *testing.T, app *App) {
			if app.Ready != (Readiness{Kind: ReadyListening}) || app.ReadySettle != DefaultReadySettle {
				t.Errorf("ready = %+v, settle %v; want listening, %v", app.Ready, app.ReadySettle, DefaultReadySettle)
			}
		}},
		{"ready_settle", "command = [\"/bin/app\"]\nready_settle = \"0s\"\nready = \"listening\"\n" + listenHTTP, func(t *testing.T, app *App) {
			if app.Ready.Kind != ReadyListening || app.ReadySettle != 0 {
				t.Errorf("ready = %+v, settle %v; want listening, 0", app.Ready, app.ReadySettle)
			}
		}},
		{"metrics", "command = [\"/bin/app\"]\ndrain_delay = \"5s\"\n" + listenHTTP + "[metrics]\nlisten = \"127.0.0.1:9464\"\nmin_ready = 3\n", func(t *testing.T, app *App) {
			want := Metrics{Listen: Listener{Name: MetricsFDName, Address: "127.0.0.1:9464", Kind: ListenTCP}, MinReady: 3}
			if app.Metrics != want || !app.Metrics.On() || app.DrainDelay != 5*time.Second {
				t.Errorf("metrics = %+v, want %+v", app.Metrics, want)
			}
			if n := app.Metrics.ReadyNeeded(2); n != 2 {
				t.Errorf("min_ready 3 with 2 workers needs %d, want 2 (scaled down)", n)
			}
		}},
		{"metrics on a unix socket, default min_ready", "command = [\"/bin/app\"]\n" + listenHTTP + "[metrics]\nlisten = \"/run/web-metrics.sock\"\n", func(t *testing.T, app *App) {
			if app.Metrics.Listen.Kind != ListenUnix || app.DrainDelay != 0 {
				t.Errorf("metrics = %+v", app.Metrics)
			}
			for workers, want := range map[int]int{1: 1, 2: 1, 4: 3, 16: 15} {
				if n := app.Metrics.ReadyNeeded(workers); n != want {
					t.Errorf("%d workers need %d ready, want %d", workers, n, want)
				}
			}
		}},
		{"no metrics", "command = [\"/bin/app\"]\n" + listenHTTP, func(t *testing.T, app *App) {
			if app.Metrics.On() {
				t.Errorf("metrics on by default: %+v", app.Metrics)
			}
		}},
		{"listen as inline array", `command = ["/bin/app"]
listen = [{ name = "a", address = "127.0.0.1:1" }, { name = "b", address = "127.0.0.1:2" }]
`, func(t *testing.T, app *App) {
			if len(app.Listen) != 2 || app.Listen[1].Name != "b" {
				t.Errorf("listen = %+v", app.Listen)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app, err := Parse("/etc/cohort/web.toml", []byte(tt.src))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tt.check(t, app)
		})
	}
}

func TestParseBad(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string // every error line, in order
	}{
		{"typo", "command = [\"/bin/app\"]\nworkers = 2\nwokers = 4\n" + listenHTTP,
			[]string{`web.toml:3:1: unknown key "wokers" (did you mean "workers"?)`}},
		{"syntax", "command = [\"/bin/app\"\n",
			[]string{`web.toml:1:22: TOML syntax: expected a comma`}},
		{"missing everything", "# nothing\n",
			[]string{`web.toml:1:1: missing required key "command"`, `web.toml:1:1: missing [[listen]]`}},
		{"all errors of a file, in order", `command = "node server.js"
workers = 0
mode = "roundrobin"
ready_timeout = 30
stop_signal = "SIGTREM"
kill_mode = "mixd"
hardening = "paranoid"
` + listenHTTP,
			[]string{
				`web.toml:1:1: command: want an array of strings, got string`,
				`web.toml:2:1: workers: 0 is out of range 1..1024`,
				`web.toml:3:1: mode: want "shared", "round-robin" or "reuseport", got "roundrobin" (did you mean "round-robin"?)`,
				`web.toml:4:1: ready_timeout: want a duration such as "30s" or "1min 30s", got integer (write "30s")`,
				`web.toml:5:1: stop_signal: unknown signal "SIGTREM" (did you mean "SIGTERM"?)`,
				`web.toml:6:1: kill_mode: want "group" or "mixed", got "mixd" (did you mean "mixed"?)`,
				`web.toml:7:1: hardening: want "default", "strict" or "none", got "paranoid"`,
			}},
		{"node_preload in round-robin mode", "command = [\"node\"]\nmode = \"round-robin\"\nnode_preload = true\n" + listenHTTP,
			[]string{`web.toml:3:1: node_preload works in shared and reuseport mode only: in round-robin mode connections arrive over cohort's channel, which Node's public APIs cannot receive fds from (see node_preload in cohort.toml(5))`}},
		{"node_preload not a boolean", "command = [\"node\"]\nnode_preload = \"yes\"\n" + listenHTTP,
			[]string{`web.toml:2:1: node_preload: want true or false, got string`}},
		{"limits", minimal + `[limits]
memory_max = "512"
memory_high = "1G"
memory_swap_max = "2X"
cpu_weight = 0
cpu_quota = 1.5
tasks_max = "64"
memory_mx = "1G"
`, []string{
			`web.toml:6:1: limits.memory_max: want at least 1M, got "512" (a size needs its unit: "512M")`,
			`web.toml:8:1: limits.memory_swap_max: size "2X": want bytes or a number with K, M, G or T (powers of 1024, as systemd's MemoryMax=), e.g. "400M"`,
			`web.toml:9:1: limits.cpu_weight: want a number from 1 to 10000 (the default weight is 100), got integer 0`,
			`web.toml:10:1: limits.cpu_quota: want a percentage of one CPU such as "50%" or "200%", from 1% to 102400%, got float 1.5`,
			`web.toml:11:1: limits.tasks_max: want a number from 1 to 4194304, got "64"`,
			`web.toml:12:1: unknown key "memory_mx" (did you mean "memory_max"?)`,
		}},
		{"limits high above max", minimal + "[limits]\nmemory_max = \"512M\"\nmemory_high = \"1G\"\n", []string{
			`web.toml:7:1: limits: memory_high (1G) is above memory_max (512M): the kernel would kill before it throttles`,
		}},
		{"metrics", "command = [\"/bin/app\"]\ndrain_delay = \"1h\"\n" + listenHTTP + "[metrics]\nlisten = \"127.0.0.1:8080\"\nmin_ready = 0\nlisten_to = 1\n",
			[]string{
				`web.toml:2:1: drain_delay: want at most 10m0s, got "1h"`,
				`web.toml:7:1: metrics listen "127.0.0.1:8080" is already used by listener 1`,
				`web.toml:8:1: metrics.min_ready: want a number of workers from 1 to 1024, got integer 0`,
				`web.toml:9:1: unknown key "listen_to" (did you mean "listen"?)`,
			}},
		{"drain_delay without metrics", "command = [\"/bin/app\"]\ndrain_delay = \"5s\"\n" + listenHTTP,
			[]string{`web.toml:2:1: drain_delay needs [metrics] listen: without /readyz no load balancer sees the drain`}},
		{"min_ready without listen", "command = [\"/bin/app\"]\n" + listenHTTP + "[metrics]\nmin_ready = 2\n",
			[]string{`web.toml:6:1: metrics.min_ready needs [metrics] listen: without /readyz no load balancer sees it`}},
		{"metrics not a table", "command = [\"/bin/app\"]\nmetrics = \"127.0.0.1:9464\"\n" + listenHTTP,
			[]string{`web.toml:2:1: metrics: want a table ([metrics]), got string`}},
		{"reuseport typo", "command = [\"/bin/app\"]\nmode = \"reuse-port\"\n" + listenHTTP,
			[]string{`web.toml:2:1: mode: want "shared", "round-robin" or "reuseport", got "reuse-port" (did you mean "reuseport"?)`}},
		{"reuseport needs tcp", `command = ["/bin/app"]
mode = "reuseport"
[[listen]]
name = "http"
address = "127.0.0.1:8080"
[[listen]]
name = "sock"
address = "/run/web.sock"
[[listen]]
name = "abs"
address = "@web"
reuse_port = false
`,
			[]string{
				`web.toml:8:1: mode = "reuseport" binds every listener once per worker, which only TCP allows; "/run/web.sock" is a unix socket (use mode = "shared" or "round-robin")`,
				`web.toml:11:1: mode = "reuseport" binds every listener once per worker, which only TCP allows; "@web" is a unix socket (use mode = "shared" or "round-robin")`,
				`web.toml:12:1: reuse_port = false contradicts mode = "reuseport", which sets ReusePort=yes on every socket`,
			}},
		{"reload_batch out of range", "command = [\"/bin/app\"]\nreload_batch = 0\n" + listenHTTP,
			[]string{`web.toml:2:1: reload_batch: want a number from 1 to 1024, got integer 0`}},
		{"reload_batch too big", "command = [\"/bin/app\"]\nreload_batch = 1025\n" + listenHTTP,
			[]string{`web.toml:2:1: reload_batch: want a number from 1 to 1024, got integer 1025`}},
		{"reload_batch as string", "command = [\"/bin/app\"]\nreload_batch = \"2\"\n" + listenHTTP,
			[]string{`web.toml:2:1: reload_batch: want a number from 1 to 1024, got "2"`}},
		{"workers as string number", "command = [\"/bin/app\"]\nworkers = \"4\"\n" + listenHTTP,
			[]string{`web.toml:2:1: workers: want "auto" or a number, got the string "4" (write workers = 4)`}},
		{"workers auto typo", "command = [\"/bin/app\"]\nworkers = \"atuo\"\n" + listenHTTP,
			[]string{`web.toml:2:1: workers: want "auto" or a number from 1 to 1024, got "atuo" (did you mean "auto"?)`}},
		{"relative paths", `command = ["./server"]
working_directory = "srv"
environment_file = "web.env"
` + listenHTTP,
			[]string{
				`web.toml:1:12: command[0] "./server" must be an absolute path or a program name looked up in $PATH`,
				`web.toml:2:1: working_directory "srv" must be an absolute path`,
				`web.toml:3:1: environment_file "web.env" must be an absolute path (a leading "-" makes it optional)`,
			}},
		{"environment values", "command = [\"/bin/app\"]\n[environment]\nPORT = 8080\n\"BAD-NAME\" = \"x\"\n" + listenHTTP,
			[]string{
				`web.toml:3:1: environment.PORT: want a string, got integer (write "8080")`,
				`web.toml:4:1: environment variable name "BAD-NAME" may hold only letters, digits and _ and must not start with a digit`,
			}},
		{"bad users", "command = [\"/bin/app\"]\nuser = \"we b\"\ngroup = \"-x\"\n" + listenHTTP,
			[]string{`web.toml:2:1: user "we b" is not a valid user or group name`, `web.toml:3:1: group "-x" is not a valid user or group name`}},
		{"restart", "command = [\"/bin/app\"]\n[restart]\ninitial = \"5s\"\nmax = \"1s\"\nmin_uptime = \"-1s\"\n" + listenHTTP,
			[]string{
				`web.toml:2:1: restart: initial (5s) is longer than max (1s)`,
				`web.toml:5:1: restart.min_uptime: negative duration "-1s"`,
			}},
		{"durations", "command = [\"/bin/app\"]\nstop_timeout = \"0s\"\nwatchdog = \"5 parsecs\"\nready = \"soon\"\n" + listenHTTP,
			[]string{
				`web.toml:2:1: stop_timeout: must be longer than 0`,
				`web.toml:3:1: watchdog: invalid unit in duration "5 parsecs" (units: us, ms, s, min, h, d, w)`,
				`web.toml:4:1: ready: want "listening", "notify", "exec" or a duration such as "2s", got "soon"`,
			}},
		{"ready_settle", "command = [\"/bin/app\"]\nready = \"notify\"\nready_settle = \"2s\"\n" + listenHTTP,
			[]string{`web.toml:3:1: ready_settle applies only to ready = "listening" (ready is "notify")`}},
		{"ready_settle too long", "command = [\"/bin/app\"]\nready_timeout = \"5s\"\nready_settle = \"5s\"\n" + listenHTTP,
			[]string{`web.toml:3:1: ready_settle (5s) must be shorter than ready_timeout (5s), or no worker would ever be ready`}},
		{"ready_settle type", "command = [\"/bin/app\"]\nready_settle = 1\n" + listenHTTP,
			[]string{`web.toml:2:1: ready_settle: want a duration such as "1s" or "0s", got integer`}},
		{"listeners", `command = ["/bin/app"]
[[listen]]
name = "http"
address = "localhost:8080"
[[listen]]
name = "http"
address = "127.0.0.1:70000"
[[listen]]
adress = "/run/a.sock"
[[listen]]
name = "sock"
address = "/run/a.sock"
nodelay = true
socket_mode = 660
[[listen]]
name = "tcp"
address = "10.0.0.1:80"
socket_mode = "0600"
backlog = 0
[[listen]]
name = "v6"
address = "::1:80"
[[listen]]
name = "cohort-rr"
address = "@x"
`,
			[]string{
				`web.toml:4:1: address "localhost:8080": host must be an IP address (systemd binds addresses, it does not resolve names) (did you mean "127.0.0.1:8080"?)`,
				`web.toml:6:1: listen name "http" is already used by listener 1`,
				`web.toml:7:1: address "127.0.0.1:70000": port "70000" is not a number from 1 to 65535`,
				`web.toml:8:1: [[listen]] needs a name`,
				`web.toml:8:1: [[listen]] needs an address`,
				`web.toml:9:1: unknown key "adress" (did you mean "address"?)`,
				`web.toml:13:1: nodelay applies only to TCP addresses, not to "/run/a.sock"`,
				`web.toml:14:1: socket_mode: want an octal mode as a string, e.g. "0660", got integer 660`,
				`web.toml:18:1: socket_mode applies only to unix socket paths, not to "10.0.0.1:80"`,
				`web.toml:19:1: backlog: want a number from 1 to 65535, got integer 0`,
				`web.toml:22:1: address "::1:80": IPv6 addresses need brackets: [::1]:80`,
				`web.toml:24:1: listen name "cohort-rr": names starting with "cohort-" are reserved`,
			}},
		{"pass-through", `command = ["/bin/app"]
[service]
ExecStart = "/bin/other"
limitNOFILE = 10
Environment = { A = "b" }
[socket]
ListenStream = "9090"
[unit]
Description = "multi\nline"
` + listenHTTP,
			[]string{
				`web.toml:3:1: [service] ExecStart is set by cohort: use command`,
				`web.toml:4:1: [service] "limitNOFILE" is not a systemd directive name`,
				`web.toml:5:1: [service] Environment: want a string, number, boolean or an array of them, got table`,
				`web.toml:7:1: [socket] ListenStream is set by cohort: use [[listen]]`,
				`web.toml:9:1: [unit] Description = "multi\nline" holds the control character newline (\n) at byte 5`,
			}},
		{"round-robin knobs", "command = [\"/bin/app\"]\nmax_pending = 0\nbalance = \"least-connection\"\n" + listenHTTP,
			[]string{
				`web.toml:2:1: max_pending: want a number from 1 to 65535, got integer 0`,
				`web.toml:3:1: balance: want "round-robin", "least-connections", "p2c" or "weighted", got "least-connection" (did you mean "least-connections"?)`,
			}},
		{"weights and sticky", "command = [\"/bin/app\"]\nweights = [2, 0]\nsticky = \"client_ip\"\naccept_threads = 0\n" + listenHTTP,
			[]string{
				`web.toml:2:1: weights apply only to balance = "weighted" (balance is "round-robin")`,
				`web.toml:2:15: weights: want whole numbers from 1 to 100, got integer 0`,
				`web.toml:3:1: sticky: want "client-ip" or "proxy-protocol", got "client_ip" (did you mean "client-ip"?)`,
				`web.toml:4:1: accept_threads: want a number from 1 to 64, got integer 0`,
			}},
		{"accept interval", "command = [\"/bin/app\"]\nmode = \"round-robin\"\naccept_interval = \"20ms\"\n" + listenHTTP,
			[]string{`web.toml:3:1: accept_interval: want a duration from 0 to 10ms, got "20ms"`}},
		{"accept interval type", "command = [\"/bin/app\"]\nmode = \"round-robin\"\naccept_interval = 1\n" + listenHTTP,
			[]string{`web.toml:3:1: accept_interval: want a duration such as "1ms" or "500us", got integer (write "1s")`}},
		{"accept interval in shared mode", "command = [\"/bin/app\"]\naccept_interval = \"1ms\"\n" + listenHTTP,
			[]string{`web.toml:2:1: accept_interval applies only to mode = "round-robin": in mode = "shared" the workers accept on their own`}},
		{"weighted without weights", "command = [\"/bin/app\"]\nbalance = \"weighted\"\n" + listenHTTP,
			[]string{`web.toml:2:1: balance = "weighted" needs weights = [...], one per worker slot`}},
		{"round-robin knob types", "command = [\"/bin/app\"]\nmax_pending = \"64\"\nbalance = 1\nmax_pendng = 3\n" + listenHTTP,
			[]string{
				`web.toml:2:1: max_pending: want a number from 1 to 65535, got "64"`,
				`web.toml:3:1: balance: want a string, got integer`,
				`web.toml:4:1: unknown key "max_pendng" (did you mean "max_pending"?)`,
			}},
		{"ack_timeout range", "command = [\"/bin/app\"]\nack_timeout = \"50ms\"\n" + listenHTTP,
			[]string{`web.toml:2:1: ack_timeout: want a duration from 100ms to 1h0m0s, got 50ms`}},
		{"ack_timeout type", "command = [\"/bin/app\"]\nack_timeout = 5\nack_timout = \"1s\"\n" + listenHTTP,
			[]string{
				`web.toml:2:1: ack_timeout: want a duration such as "30s" or "1min 30s", got integer (write "5s")`,
				`web.toml:3:1: unknown key "ack_timout" (did you mean "ack_timeout"?)`,
			}},
		{"unknown table key", "command = [\"/bin/app\"]\n[restart]\nmin_uptim = \"1s\"\n" + listenHTTP,
			[]string{`web.toml:3:1: unknown key "min_uptim" (did you mean "min_uptime"?)`}},
		{"log rate limit", `command = ["/bin/app"]
log_rate_limit_interval = "500ms"
log_rate_limit_burst = -1
` + listenHTTP,
			[]string{
				`web.toml:2:1: log_rate_limit_interval: want "0s" (no limit) or a duration from 1s to 1h0m0s, got "500ms"`,
				`web.toml:3:1: log_rate_limit_burst: want a number of lines from 0 (no limit) to 1000000, got integer -1`,
			}},
		{"log rate limit types", "command = [\"/bin/app\"]\nlog_rate_limit_interval = 30\nlog_rate_limit_burst = \"10k\"\n" + listenHTTP,
			[]string{
				`web.toml:2:1: log_rate_limit_interval: want a duration such as "30s" or "0s" (no limit), got integer`,
				`web.toml:3:1: log_rate_limit_burst: want a number of lines from 0 (no limit) to 1000000, got "10k"`,
			}},
		{"dotted key position", "command = [\"/bin/app\"]\nrestart.intial = \"1s\"\n" + listenHTTP,
			[]string{`web.toml:2:1: unknown key "intial" (did you mean "initial"?)`}},
		{"inline table position", "command = [\"/bin/app\"]\nrestart = { max = \"1s\", intial = \"1s\" }\n" + listenHTTP,
			[]string{`web.toml:2:25: unknown key "intial" (did you mean "initial"?)`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app, err := Parse("/etc/cohort/web.toml", []byte(tt.src))
			if err == nil {
				t.Fatalf("Parse accepted it: %+v", app)
			}
			var errs Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error is %T, want Errors: %v", err, err)
			}
			if len(errs) != len(tt.want) {
				t.Fatalf("got %d errors, want %d:\n%v", len(errs), len(tt.want), err)
			}
			for i, e := range errs {
				if got := e.Error(); !strings.HasPrefix(got, "/etc/cohort/"+tt.want[i]) {
					t.Errorf("error %d:\n got %s\nwant /etc/cohort/%s…", i, got, tt.want[i])
				}
			}
		})
	}
}

const listenHTTP = "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n"

func TestAppNames(t *testing.T) {
	for name, ok := range map[string]bool{
		"web": true, "my-app_2.v1": true, "a:b": true,
		"": false, "web@1": false, "-web": false, ".web": false, "we b": false, strings.Repeat("x", 201): false,
	} {
		if err := CheckAppName(name); (err == nil) != ok {
			t.Errorf("CheckAppName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
	_, err := Parse("/etc/cohort/web@1.toml", []byte(minimal))
	if err == nil || !strings.Contains(err.Error(), `app name "web@1"`) {
		t.Errorf("bad app name not reported: %v", err)
	}
}

func TestParseDuration(t *testing.T) {
	good := map[string]time.Duration{
		"500ms": 500 * time.Millisecond, "1m30s": 90 * time.Second, "1min 30s": 90 * time.Second,
		"90": 90 * time.Second, "2 h": 2 * time.Hour, "1.5s": 1500 * time.Millisecond, "1d": 24 * time.Hour,
		"100 msec": 100 * time.Millisecond, "3 minutes": 3 * time.Minute, "5us": 5 * time.Microsecond, "1w 1d": 8 * 24 * time.Hour,
	}
	for in, want := range good {
		if got, err := ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1s", "5x", "s", "1 parsec", "5sx", "--1"} {
		if got, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) = %v, want an error", in, got)
		}
	}
}

func TestSuggest(t *testing.T) {
	known := []string{"workers", "mode", "command", "ready_timeout"}
	for word, want := range map[string]string{
		"wokers": "workers", "mdoe": "mode", "comand": "command", "ready_timout": "ready_timeout", "xyz": "", "banana": "",
	} {
		if got := suggest(word, known); got != want {
			t.Errorf("suggest(%q) = %q, want %q", word, got, want)
		}
	}
}

func TestDiscover(t *testing.T) {
	etc, run, lib := t.TempDir(), t.TempDir(), t.TempDir()
	write := func(dir, name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(etc, "web.toml", minimal)
	write(run, "web.toml", "overridden")
	write(lib, "api.toml", minimal)
	write(lib, "masked.toml", minimal)
	write(etc, "notes.txt", "not an app")
	write(etc, ".#web.toml", "editor backup")
	if err := os.Symlink(os.DevNull, filepath.Join(run, "masked.toml")); err != nil {
		t.Fatal(err)
	}
	got, err := Discover([]string{etc, run, lib, filepath.Join(etc, "missing")})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(lib, "api.toml"), filepath.Join(etc, "web.toml")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Discover = %q, want %q", got, want)
	}
}

func TestParseSlotFDName(t *testing.T) {
	for _, tc := range []struct {
		name     string
		listener string
		slot     int
		ok       bool
	}{
		{"http.0", "http", 0, true},
		{"http.12", "http", 12, true},
		{"v1.admin.3", "v1.admin", 3, true},
		{"http", "", 0, false},
		{"http.", "", 0, false},
		{".1", "", 0, false},
		{"http.01", "", 0, false},
		{"http.-1", "", 0, false},
		{"http.1x", "", 0, false},
		{"http.99999", "", 0, false},
	} {
		l, slot, ok := ParseSlotFDName(tc.name)
		if l != tc.listener || slot != tc.slot || ok != tc.ok {
			t.Errorf("ParseSlotFDName(%q) = %q, %d, %v; want %q, %d, %v", tc.name, l, slot, ok, tc.listener, tc.slot, tc.ok)
		}
		if ok && SlotFDName(l, slot) != tc.name {
			t.Errorf("SlotFDName(%q, %d) = %q; want %q", l, slot, SlotFDName(l, slot), tc.name)
		}
	}
}

func TestNodeProgram(t *testing.T) {
	for cmd, want := range map[string]bool{
		"node": true, "/usr/bin/node": true, "nodejs": true, "node20": true, "/opt/node-22/bin/node": true,
		"/bin/sh": false, "npm": false, "nodemon": false, "deno": false, "": false,
	} {
		if got := NodeProgram([]string{cmd, "x.js"}); got != want {
			t.Errorf("NodeProgram(%q) = %v, want %v", cmd, got, want)
		}
	}
	if NodeProgram(nil) {
		t.Error("NodeProgram(nil)")
	}
}
