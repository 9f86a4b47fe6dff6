// Package appfile is cohort's app model: one TOML file per app, decoded
// strictly, validated, and reported as file:line:col errors.
//
// Both the generator (which renders units from an App) and the dispatcher
// (which runs workers from an App, and re-reads it on reload) use this
// package; it knows nothing of unit files or processes.
package appfile

import (
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Mode is how connections reach workers.
type Mode string

// The modes. See docs/config.md.
const (
	// ModeShared hands every worker the same listening sockets; workers
	// accept on their own.
	ModeShared Mode = "shared"
	// ModeRoundRobin has the dispatcher accept and pass each connection fd
	// to the next ready worker over a unix socket (SCM_RIGHTS).
	ModeRoundRobin Mode = "round-robin"
	// ModeReusePort gives every worker its own listening sockets, all
	// bound to the same address with SO_REUSEPORT: the kernel spreads
	// connections over them, with no hop through the dispatcher.
	ModeReusePort Mode = "reuseport"
)

// The policies of round-robin mode (App.Balance).
const (
	// BalanceRoundRobin hands connections to the ready workers in turn.
	BalanceRoundRobin = "round-robin"
	// BalanceLeastConnections hands each connection to the ready worker
	// with the fewest open (and unacknowledged) connections.
	BalanceLeastConnections = "least-connections"
	// BalanceP2C (power of two choices) draws two ready workers at random
	// and hands the connection to the one with fewer open connections.
	BalanceP2C = "p2c"
	// BalanceWeighted is smooth weighted round-robin over App.Weights.
	BalanceWeighted = "weighted"
)

// The sticky-session kinds of round-robin mode (App.Sticky).
const (
	// StickyNone: the balance policy alone picks the worker.
	StickyNone = ""
	// StickyClientIP sends the connections of one client address to one
	// worker slot (a consistent hash over the slots, with bounded load).
	StickyClientIP = "client-ip"
	// StickyProxyProtocol is StickyClientIP with the client address of
	// a PROXY protocol v1 or v2 header, read without consuming it.
	StickyProxyProtocol = "proxy-protocol"
)

// ReadyKind says when a freshly started worker counts as ready.
type ReadyKind string

// The readiness kinds.
const (
	// ReadyListening: the worker (or a process it forked) waits for
	// connections on one of its sockets (accept, poll, select or epoll,
	// seen in /proc); then it must stay up for App.ReadySettle.
	ReadyListening ReadyKind = "listening"
	ReadyNotify    ReadyKind = "notify" // the worker sends READY=1 to NOTIFY_SOCKET
	ReadyExec      ReadyKind = "exec"   // ready as soon as the command was exec'd
	ReadyDelay     ReadyKind = "delay"  // ready after a fixed delay (Ready.Delay)
)

// Kill modes: who gets stop_signal (docs/config.md, kill_mode).
const (
	KillModeGroup = "group" // the worker's whole process group (the default)
	KillModeMixed = "mixed" // the worker's main process; SIGKILL after stop_timeout to the group
)

// Hardening profiles for the generated service.
const (
	HardeningDefault = "default" // safe for Node.js, Python, Go; see docs/config.md
	HardeningStrict  = "strict"  // default plus MemoryDenyWriteExecute and friends
	HardeningNone    = "none"    // no sandboxing directives at all
)

// App is one validated app file. Every field is filled: defaults are applied
// by Parse, so consumers never re-derive them.
type App struct {
	Name string // the file stem; a valid unit-name prefix
	Path string // the file the App was read from (SourcePath= of the units)

	Command          []string
	Environment      map[string]string
	EnvironmentFiles []string // systemd's "-" prefix (optional file) is kept
	WorkingDirectory string
	User             string // empty: DynamicUser=yes
	Group            string

	Workers     Workers
	Mode        Mode
	CPUAffinity bool
	// NodePreload: the workers' NODE_OPTIONS get --require of cohort's
	// preload module, which turns a listen on a port cohort was given
	// into the inherited socket (shared and reuseport mode). The default
	// is NodeProgram(Command); node_preload sets it.
	NodePreload bool

	Ready Readiness
	// ReadySettle is, for ReadyListening, how long a worker must stay up
	// after it was seen accepting (or sent READY=1) before it counts as
	// ready: a program that crashes just after it starts listening fails
	// a reload instead of replacing a good worker. Zero means at once.
	ReadySettle  time.Duration
	ReadyTimeout time.Duration
	StopSignal   syscall.Signal
	// KillMode is who gets StopSignal: KillModeGroup (the worker's whole
	// process group) or KillModeMixed (its main process only; the final
	// SIGKILL still goes to the group), like systemd's KillMode=.
	KillMode    string
	StopTimeout time.Duration
	// DrainDelay is how long a stopping dispatcher answers 503 on
	// /readyz ([metrics]), its workers still serving, before it stops
	// them (StopSignal, StopTimeout). Zero: it stops them at once.
	DrainDelay time.Duration
	Restart    Restart
	// Watchdog is the per-worker watchdog: a worker that sent WATCHDOG=1
	// once and then stays silent this long is killed. Zero disables it.
	Watchdog time.Duration

	// ReloadBatch is how many worker slots a rolling reload replaces at once.
	ReloadBatch int
	// MaxPending is, in round-robin mode, how many passed connections a
	// worker may have unacknowledged before it is skipped (1..MaxMaxPending).
	MaxPending int
	// AckTimeout is, in round-robin mode, how long a passed connection may
	// wait for its worker's acknowledgement (MinAckTimeout..MaxAckTimeout):
	// then the dispatcher takes back what that worker has not
	// acknowledged, hands it to other workers and replaces the worker.
	AckTimeout time.Duration
	// Balance is the round-robin mode's policy: BalanceRoundRobin,
	// BalanceLeastConnections, BalanceP2C or BalanceWeighted.
	Balance string
	// Weights are BalanceWeighted's weight of each worker slot, in slot
	// order (1..MaxWeight); slots past the list weigh 1.
	Weights []int
	// Sticky is StickyNone, StickyClientIP or StickyProxyProtocol.
	Sticky string
	// AcceptThreads is, in round-robin mode, how many event loops accept
	// and hand connections on at the same time (1..MaxAcceptThreads); 0
	// (unset) lets the dispatcher choose from the number of workers.
	AcceptThreads int
	// AcceptInterval is, in round-robin mode, the least time between two
	// accept rounds of an event loop while connections keep coming
	// (0..MaxAcceptInterval; 0: accept each connection as it comes).
	AcceptInterval time.Duration

	// LogRateLimit is the dispatcher's budget of each worker slot's
	// output lines (log_rate_limit_interval, log_rate_limit_burst); the
	// generator sizes journald's per-unit limit from it.
	LogRateLimit LogRateLimit

	// Limits are each worker's cgroup limits ([limits]); the zero value
	// sets none.
	Limits Limits
	// Recycle is when a serving worker is replaced by a fresh one, the
	// way a reload replaces a slot ([recycle]); zero values are off.
	Recycle Recycle

	Enable    bool
	Hardening string

	Listen []Listener

	// Metrics is the [metrics] table: the dispatcher's own listener for
	// /metrics, /readyz and /livez; Metrics.Listen.Address is "" when it
	// is off.
	Metrics Metrics

	// Pass-through directives, validated only for syntax, rendered verbatim
	// into the [Unit], [Service] and [Socket] sections. Order is the file's.
	Unit    []Directive
	Service []Directive
	Socket  []Directive

	// workingDirAt is where working_directory is written, for CheckHost;
	// zero when it is not.
	workingDirAt position
}

// NodeProgram reports whether command runs Node.js itself: its program
// is node or nodejs (node20, /usr/bin/node…), not a shell or npm that
// would start it (those set node_preload = true, and the preload module
// works in the process whose LISTEN_PID it is).
func NodeProgram(command []string) bool {
	if len(command) == 0 {
		return false
	}
	base := command[0]
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		base = base[i+1:]
	}
	base = strings.TrimRight(base, "0123456789.-")
	return base == "node" || base == "nodejs"
}

// Workers is the worker count: Auto means one per CPU the dispatcher may
// use (its affinity mask, cgroup cpuset and CPU quota: cpuset.Limit, read
// when it starts).
type Workers struct {
	Auto bool
	N    int // 1..1024 when !Auto
}

// Count is the number of workers on a machine where cpus CPUs are
// available.
func (w Workers) Count(cpus int) int {
	if w.Auto {
		return cpus
	}
	return w.N
}

// LogRateLimit is how many lines each worker slot may log per interval;
// the rest of the interval's lines are dropped and counted. A zero
// Interval or Burst means no limit.
type LogRateLimit struct {
	Interval time.Duration
	Burst    int
}

// Off says whether there is no limit.
func (l LogRateLimit) Off() bool { return l.Interval == 0 || l.Burst == 0 }

// Limits are the cgroup v2 limits of each worker's own cgroup, written
// before the worker starts. A zero field sets nothing (the kernel's
// default, no limit), except where said.
type Limits struct {
	// MemoryHigh is memory.high in bytes: above it the worker's tree is
	// throttled and reclaimed hard, not killed.
	MemoryHigh int64
	// MemoryMax is memory.max in bytes: the tree cannot use more; the
	// kernel's OOM killer ends it (all of it: memory.oom.group) when
	// reclaim fails.
	MemoryMax int64
	// MemorySwapMax is memory.swap.max in bytes; SwapNone writes 0 (no
	// swap at all).
	MemorySwapMax int64
	// CPUWeight is cpu.weight (1..10000; the kernel's default is 100).
	CPUWeight int
	// CPUQuota is cpu.max as a percentage of one CPU per worker (150:
	// one and a half CPUs' worth of time per 100 ms period).
	CPUQuota int
	// TasksMax is pids.max: processes and threads of the tree.
	TasksMax int
}

// SupervisorCgroup is the dispatcher's own leaf in its service's
// delegated cgroup, beside the workers' cgroups: the generator's
// DelegateSubgroup= and where the dispatcher moves itself where systemd
// did not put it (a contract of the two, like the fd names).
const SupervisorCgroup = "supervisor"

// SwapNone is Limits.MemorySwapMax for memory_swap_max = 0.
const SwapNone = -1

// Any says whether l sets some limit.
func (l Limits) Any() bool { return l != Limits{} }

// Bounds of [limits].
const (
	MinMemoryLimit = 1 << 20 // memory_high, memory_max: a smaller one is a unit typo ("512" for "512M")
	MaxCPUWeight   = 10000
	MaxCPUQuota    = 100 * MaxWorkers // percent
	MaxTasks       = 4194304          // the kernel's PID_MAX_LIMIT
)

// Recycle is the [recycle] table: the policies that replace a worker
// that has grown, aged or served enough, without dropping a request (a
// new worker starts and is ready before the old one drains). Zero
// fields are off.
type Recycle struct {
	// Memory recycles a worker whose memory (its cgroup's
	// memory.current, else its process tree's RSS) is above this many
	// bytes; MemoryInterval is how often it is sampled.
	Memory         uint64
	MemoryInterval time.Duration
	// MaxLifetime recycles a worker that has run this long, plus a
	// random part of LifetimeJitter drawn for each worker, so that
	// workers started together do not all go at once.
	MaxLifetime    time.Duration
	LifetimeJitter time.Duration
	// MaxConnections recycles, in round-robin mode (the only one where
	// the dispatcher hands the connections and can count them), a worker
	// that was handed this many connections, plus a random part of
	// ConnectionsJitter drawn for each worker.
	MaxConnections    int
	ConnectionsJitter int
	// MinInterval is the least time from the end of one recycle to the
	// start of the next. Recycles run one at a time in any case.
	MinInterval time.Duration
}

// On says whether any recycle policy is set.
func (r Recycle) On() bool { return r.Memory > 0 || r.MaxLifetime > 0 || r.MaxConnections > 0 }

// Readiness says when a worker counts as ready.
type Readiness struct {
	Kind  ReadyKind
	Delay time.Duration // only for ReadyDelay
}

// Restart is the backoff policy for workers that exit.
type Restart struct {
	Initial   time.Duration // first delay before a restart
	Max       time.Duration // the delay doubles up to this
	MinUptime time.Duration // a worker that ran this long resets the delay
}

// ListenKind is the address family of a listener.
type ListenKind string

// The listener kinds.
const (
	ListenTCP      ListenKind = "tcp"      // host:port, [v6]:port, :port
	ListenUnix     ListenKind = "unix"     // /path.sock
	ListenAbstract ListenKind = "abstract" // @name
)

// Listener is one [[listen]] entry: a stream socket systemd binds.
type Listener struct {
	Name    string     // FileDescriptorName=; unique within the app
	Address string     // as written, normalised for ListenStream=
	Kind    ListenKind // derived from Address
	Backlog int        // 0: systemd's default

	ReusePort bool
	NoDelay   bool
	KeepAlive bool

	// Only for ListenUnix.
	SocketUser  string
	SocketGroup string
	SocketMode  uint32 // 0: systemd's default (0666)
}

// MetricsFDName is the FileDescriptorName= of the metrics listener's
// socket unit. Listener names may not start with "cohort-", so it is
// never a [[listen]]'s.
const MetricsFDName = "cohort-metrics"

// Metrics is the [metrics] table (docs/config.md).
type Metrics struct {
	// Listen is the metrics listener: Name is MetricsFDName, Address ""
	// means no metrics listener.
	Listen Listener
	// MinReady is how many workers must be ready for /readyz to answer
	// 200; 0 means the default, ReadyNeeded's.
	MinReady int
}

// On says whether the app has a metrics listener.
func (m Metrics) On() bool { return m.Listen.Address != "" }

// ReadyNeeded is how many ready workers /readyz needs when workers
// slots run: min_ready when set (at most workers, so that `cohort scale`
// down does not leave an instance unready for good), else all but one,
// at least one. All but one because a single crash or a slot in backoff
// is what a cluster of workers is there to absorb: taking the whole
// instance out of its load balancer for it would move all its traffic
// onto the other instances, which is how one bad request becomes an
// outage; two slots down at once is no longer noise.
func (m Metrics) ReadyNeeded(workers int) int {
	if m.MinReady > 0 {
		return min(m.MinReady, max(workers, 1))
	}
	return max(workers-1, 1)
}

// SlotFDName is, in reuseport mode, the FileDescriptorName= of worker
// slot's socket for a listener: "http.0", "http.1"… The generator names
// the sockets so and the dispatcher takes them apart with ParseSlotFDName.
func SlotFDName(listener string, slot int) string {
	return listener + "." + strconv.Itoa(slot)
}

// ParseSlotFDName splits a name made by SlotFDName. The slot is what
// follows the last dot, so listener names that contain dots stay
// unambiguous.
func ParseSlotFDName(name string) (listener string, slot int, ok bool) {
	i := strings.LastIndexByte(name, '.')
	if i <= 0 {
		return "", 0, false
	}
	digits := name[i+1:]
	if digits == "" || len(digits) > 4 || strings.TrimLeft(digits, "0123456789") != "" || len(digits) > 1 && digits[0] == '0' {
		return "", 0, false
	}
	slot, err := strconv.Atoi(digits)
	if err != nil {
		return "", 0, false
	}
	return name[:i], slot, true
}

// Directive is one pass-through key = value for a unit section. A TOML array
// becomes several directives with the same key.
type Directive struct {
	Key   string
	Value string
}

// Defaults for keys an app file leaves out. Documented in docs/config.md.
const (
	DefaultReadyTimeout   = 30 * time.Second
	DefaultReadySettle    = time.Second
	DefaultStopTimeout    = 30 * time.Second
	DefaultRestartInitial = 100 * time.Millisecond
	DefaultRestartMax     = 10 * time.Second
	DefaultMinUptime      = 5 * time.Second
	DefaultMaxPending     = 64
	MaxMaxPending         = 65535
	MaxWeight             = 100
	MaxWeights            = 1024
	MaxAcceptThreads      = 64
	MaxAcceptInterval     = 10 * time.Millisecond
	DefaultAckTimeout     = 10 * time.Second
	MinAckTimeout         = 100 * time.Millisecond
	MaxAckTimeout         = time.Hour
	MaxWorkers            = 1024
	// DefaultLogRateLimitInterval and DefaultLogRateLimitBurst are
	// journald's own defaults for a unit (journald.conf(5)), given here
	// to each worker: a one-worker app logs as any service does.
	DefaultLogRateLimitInterval = 30 * time.Second
	DefaultLogRateLimitBurst    = 10000
	// MaxLogRateLimitInterval bounds log_rate_limit_interval; 0 is
	// allowed (no limit), otherwise at least MinLogRateLimitInterval.
	MinLogRateLimitInterval = time.Second
	MaxLogRateLimitInterval = time.Hour
	// MaxLogRateLimitBurst keeps the unit's LogRateLimitBurst=, twice the
	// sum of all workers' budgets, within systemd's unsigned int.
	MaxLogRateLimitBurst = 1000000
	// MaxListeners is how many [[listen]] tables an app may have: each
	// is a socket unit (per worker in reuseport mode) and an fd in
	// every worker.
	MaxListeners = 32
	// MaxReusePortSockets bounds workers × listeners in reuseport mode,
	// where the generator writes one socket unit for each: 1024 is a
	// worker per CPU on a 256-CPU machine with four listeners, and keeps
	// a generator run (and systemd's load of the units) well under a
	// second.
	MaxReusePortSockets = 1024
	// DefaultRecycleMemoryInterval is how often [recycle] memory is
	// sampled; MinRecycleMemoryInterval bounds it below (each sample
	// reads every worker's /proc or cgroup files).
	DefaultRecycleMemoryInterval = 5 * time.Second
	MinRecycleMemoryInterval     = 100 * time.Millisecond
	// DefaultRecycleMinInterval is the least time between two recycles.
	DefaultRecycleMinInterval = 10 * time.Second
	// MaxRecycleConnections bounds [recycle] max_connections and its
	// jitter.
	MaxRecycleConnections = 1 << 40
	// MaxDirectives is how many directives one pass-through table
	// ([unit], [service], [socket]) may add, counting array items.
	MaxDirectives = 256
	// MaxDrainDelay bounds drain_delay: a load balancer's
	// readiness period is seconds, and systemd waits drain_delay +
	// stop_timeout for a stop.
	MaxDrainDelay = 10 * time.Minute
)

// New returns an App named name with every default applied and no command
// or listeners. `cohort run --listen … -- CMD` builds its App from it.
func New(name string) *App {
	return &App{
		Name:         name,
		Environment:  map[string]string{},
		Workers:      Workers{Auto: true},
		Mode:         ModeShared,
		Ready:        Readiness{Kind: ReadyListening},
		ReadySettle:  DefaultReadySettle,
		ReadyTimeout: DefaultReadyTimeout,
		StopSignal:   syscall.SIGTERM,
		KillMode:     KillModeGroup,
		StopTimeout:  DefaultStopTimeout,
		Restart: Restart{
			Initial:   DefaultRestartInitial,
			Max:       DefaultRestartMax,
			MinUptime: DefaultMinUptime,
		},
		ReloadBatch: 1,
		MaxPending:  DefaultMaxPending,
		AckTimeout:  DefaultAckTimeout,
		Balance:     BalanceRoundRobin,
		Hardening:   HardeningDefault,
		Recycle: Recycle{
			MemoryInterval: DefaultRecycleMemoryInterval,
			MinInterval:    DefaultRecycleMinInterval,
		},
		LogRateLimit: LogRateLimit{
			Interval: DefaultLogRateLimitInterval,
			Burst:    DefaultLogRateLimitBurst,
		},
	}
}
