// Package control is the dispatcher's control socket: a unix stream socket
// in the app's runtime directory that speaks JSON lines, one request and
// one reply per line. `cohort status`, `cohort scale` and the service's
// ExecReload= use it.
//
//	→ {"cmd":"status"}
//	← {"ok":true,"status":{"app":"web","generation":1,…}}
//	→ {"cmd":"scale","workers":8}
//	← {"ok":false,"error":"…"}
//
// # Who may do what
//
// Only root and the user the dispatcher runs as may connect at all
// (SO_PEERCRED on every connection, whatever the socket file's mode says).
// That is not enough: the workers run as that user too and can find the
// socket next to their $NOTIFY_SOCKET. So the server also asks where the
// connecting process sits in the process tree. A process that descends
// from the dispatcher (a worker, anything a worker forked, and the
// daemons a worker double-forks and detaches with setsid, which the
// dispatcher adopts as the child subreaper) gets read-only commands only:
// status. Everything else (reload, scale, restart-worker and any command
// added later) needs a peer outside the worker trees: root, `cohort
// status`/`cohort scale` in an operator's shell, and the service's
// ExecReload= (`cohort dispatch-reload`), which systemd forks and which is
// therefore no descendant of the dispatcher. Root talking to a dispatcher
// that is not root is outside without a walk: the workers run as the
// dispatcher's uid and, in the generated units, can gain no other
// (NoNewPrivileges=, no capabilities). A peer whose place cannot be
// established (it exited before it was identified, its /proc entry
// cannot be read, it is in another pid namespace) counts as a worker.
//
// The process tree rather than a second, root-only socket for the
// commands that change state: the tree works the same under DynamicUser=,
// under a fixed User= and for `cohort run` started by an ordinary user,
// where there is no privilege to separate on; and the ExecReload= of units
// generated before (as the service's user) keeps working. identify's doc
// says why a reused pid cannot fool the check.
//
// # Bounds
//
// A connection must send a complete request line within the idle bound
// (DefaultIdle) of connecting or of its last reply, and read each reply
// within the same bound, or it is closed. Connection slots are counted
// per process (per worker tree for workers), workers draw from a small
// pool of their own, and root has slots that others cannot take, so
// neither a worker nor any single process can lock the operator out.
// A malformed or oversized request gets an error reply; it never takes
// the dispatcher down.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Commands.
const (
	CmdStatus        = "status"
	CmdReload        = "reload"
	CmdScale         = "scale"
	CmdRestartWorker = "restart-worker"
	CmdSignal        = "signal"
)

// MaxRequest is the longest request line accepted, newline included.
const MaxRequest = 4096

// SocketName is the control socket's file name in the runtime directory.
const SocketName = "control.sock"

// Request is one line a client sends.
type Request struct {
	Cmd     string `json:"cmd"`
	Workers int    `json:"workers,omitempty"` // scale
	Worker  *int   `json:"worker,omitempty"`  // restart-worker; signal: one worker only
	Signal  string `json:"signal,omitempty"`  // signal: a name, "SIGUSR2" (see SignalByName)
}

// Reply is the line the server answers with.
type Reply struct {
	OK     bool    `json:"ok"`
	Error  string  `json:"error,omitempty"`
	Status *Status `json:"status,omitempty"`
	// PIDs are the worker processes a signal request reached.
	PIDs []int `json:"pids,omitempty"`
}

// Status is the dispatcher's view of its app.
type Status struct {
	App        string    `json:"app"`
	Mode       string    `json:"mode"`
	Generation int       `json:"generation"`
	State      string    `json:"state"` // "starting", "ready", "reloading", "draining", "stopping"
	Line       string    `json:"line"`  // the STATUS= line systemd shows
	Since      time.Time `json:"since"` // when the dispatcher started
	PID        int       `json:"pid"`   // the dispatcher's
	// ConfigError is the app file's first problem while it does not
	// validate (the dispatcher runs the last configuration that did).
	ConfigError string `json:"config_error,omitempty"`
	// CPUs is what workers = "auto" counts and how it was reached.
	CPUs CPUs `json:"cpus"`
	// ReadyWorkers is how many slots' current workers are ready;
	// MinReady how many /readyz needs ([metrics] min_ready, or all
	// workers but one). Serving is what /readyz answers: true while
	// ReadyWorkers ≥ MinReady and the dispatcher is neither draining nor
	// stopping.
	ReadyWorkers int  `json:"ready_workers"`
	MinReady     int  `json:"min_ready"`
	Serving      bool `json:"serving"`
	// Live is what /livez answers besides the loop answering at all:
	// false while every slot's worker has missed its watchdog (and is
	// being replaced for it).
	Live bool `json:"live"`
	// Reloads counts the rolling reloads since the dispatcher started.
	Reloads Reloads `json:"reloads"`
	// Listeners are the app's listening sockets, in [[listen]] order (in
	// reuseport mode each worker's own, by worker for each listener).
	Listeners []Listener `json:"listeners"`
	// Recycles counts the workers replaced by a [recycle] policy, apart
	// from Restarts (crashes); RecycleMemory says what memory figure the
	// memory policy compares, when it is set.
	Recycles      int      `json:"recycles"`
	RecycleMemory string   `json:"recycle_memory,omitempty"`
	Workers       []Worker `json:"workers"`
}

// Reloads counts rolling reloads (SIGHUP, systemctl reload, the control
// socket's "reload") by result: a reload refused before it began (one was
// running, the dispatcher was stopping) is not counted; one whose app
// file did not load, or whose new workers failed, is Failed.
type Reloads struct {
	OK     int `json:"ok"`
	Failed int `json:"failed"`
	// The last finished reload: its result ("ok", "failed"; "" before
	// the first), when it began and how long it took.
	LastResult  string    `json:"last_result,omitempty"`
	LastStarted time.Time `json:"last_started"`
	LastSeconds float64   `json:"last_seconds"`
}

// Listener is one listening socket of the app.
type Listener struct {
	Name string `json:"name"` // the [[listen]] name
	// Worker is, in reuseport mode, the worker slot whose own socket
	// this is; -1 for a socket all workers share (shared, round-robin).
	Worker int `json:"worker"`
	// Queue and QueueLimit are its accept queue as the kernel reports
	// it (sock_diag; what `ss -lt` shows as Recv-Q and Send-Q):
	// connections completed and waiting to be accepted, and the backlog
	// that bounds them. Both are -1 when the kernel could not be asked.
	Queue      int `json:"queue"`
	QueueLimit int `json:"queue_limit"`
	// Accepted counts the connections the dispatcher accepted on it:
	// round-robin mode only (the workers accept in the other modes).
	Accepted uint64 `json:"accepted"`
}

// CPUs is the CPU count of the dispatcher's service, read when it
// started: what workers = "auto" means and what every worker gets as
// COHORT_CPUS.
type CPUs struct {
	Count int `json:"count"`
	// How names what decided it: "affinity 2, cgroup cpu quota 1.50".
	How string `json:"how"`
	// WorkersAuto is whether the app file says workers = "auto" (else
	// the count sizes nothing but COHORT_CPUS).
	WorkersAuto bool `json:"workers_auto"`
}

// Worker is one worker slot's current process.
type Worker struct {
	Index int `json:"index"`
	PID   int `json:"pid"` // 0 while waiting to restart
	// Generation is the process's; for a slot in backoff (no process),
	// that of the slot's last process.
	Generation int       `json:"generation"`
	State      string    `json:"state"` // "starting", "ready", "draining", "exited", "unhealthy", "backoff"
	Started    time.Time `json:"started"`
	Restarts   int       `json:"restarts"` // restarts after its process ended on its own (crashes), not recycles
	// RestartCauses counts the slot's restarts by why its worker ended:
	// "exited" (on its own), "crashed" (a signal cohort did not send),
	// "oom_killed" (the kernel's OOM killer, as its cgroup counted),
	// "watchdog", "ready_timeout", "unhealthy" (its round-robin channel
	// failed), "spawn_failed"; they add up to Restarts.
	RestartCauses map[string]int `json:"restart_causes,omitempty"`
	// Recycles counts the slot's workers replaced by a [recycle]
	// policy; LastRecycle says why the last one was ("memory 512M >
	// 400M").
	Recycles    int    `json:"recycles"`
	LastRecycle string `json:"last_recycle,omitempty"`
	Handed      uint64 `json:"handed"` // round-robin: connections passed to it
	Active      int    `json:"active"` // round-robin: passed and not yet closed
	// RSS and CPUPercent are those of the worker's whole process tree
	// (its process group, what it forked and the orphans it left):
	// resident memory summed over the processes, and CPU time over the
	// last CPUWindow seconds as a percentage of one CPU (200 is two CPUs
	// busy). CPUWindow is 0 when there was nothing to measure.
	RSS        int64   `json:"rss_bytes"`
	CPUPercent float64 `json:"cpu_percent"`
	CPUWindow  float64 `json:"cpu_window_seconds"`
	// CPUSeconds is the CPU time the tree has used so far (user and
	// system, with its reaped children's): a counter, which drops only
	// when adopted orphans that used CPU are reaped outside it.
	CPUSeconds float64 `json:"cpu_seconds"`
	Status     string  `json:"status,omitempty"` // the worker's own STATUS=
	// Cgroup is what the kernel counts in the worker's own cgroup; nil
	// when it has none (per-worker cgroups off or impossible here).
	Cgroup *Cgroup `json:"cgroup,omitempty"`
}

// Cgroup is a worker's own cgroup and what its files say, its whole
// process tree included.
type Cgroup struct {
	Path string `json:"path"`
	// MemoryCurrent is memory.current (bytes); nil without the memory
	// controller. MemoryHigh and MemoryMax are the limits written
	// ([limits]), 0 for none.
	MemoryCurrent *uint64 `json:"memory_current_bytes,omitempty"`
	MemoryHigh    int64   `json:"memory_high_bytes,omitempty"`
	MemoryMax     int64   `json:"memory_max_bytes,omitempty"`
	// MemoryHighEvents is memory.events "high": how often the worker
	// went over memory.high and was throttled.
	MemoryHighEvents uint64 `json:"memory_high_events"`
	// OOMKills counts the worker slot's kills by the kernel's OOM killer
	// (memory.events "oom_kill" of this and the slot's earlier cgroups).
	OOMKills uint64 `json:"oom_kills"`
	// CPUUsageUsec is cpu.stat usage_usec, the tree's CPU time since
	// the worker started; CPUThrottledUsec how long cpu.max held it back.
	CPUUsageUsec     uint64 `json:"cpu_usage_usec"`
	CPUThrottledUsec uint64 `json:"cpu_throttled_usec"`
	// MemoryPressure and CPUPressure are PSI (memory.pressure,
	// cpu.pressure); nil when the kernel has none.
	MemoryPressure *Pressure `json:"memory_pressure,omitempty"`
	CPUPressure    *Pressure `json:"cpu_pressure,omitempty"`
}

// Pressure is a PSI file's "some" averages: the share of the last 10 and
// 60 seconds (percent) in which some of the cgroup's tasks stalled on
// the resource.
type Pressure struct {
	Some10 float64 `json:"some_avg10"`
	Some60 float64 `json:"some_avg60"`
}

// Handler carries out requests. The server calls it from one goroutine per
// connection, so implementations serialize as they need. Reload returns
// when the reload has finished, with an error when it failed.
type Handler interface {
	Status(ctx context.Context) (*Status, error)
	Reload(ctx context.Context) error
	Scale(ctx context.Context, workers int) error
	RestartWorker(ctx context.Context, index int) error
	// Signal sends sig to the main process of every live worker, or of
	// the workers of slot *worker only, never to the dispatcher, and
	// returns the pids it reached.
	Signal(ctx context.Context, sig syscall.Signal, worker *int) ([]int, error)
}

// ChangesState reports whether r asks the dispatcher to change something.
// It lists the read-only commands rather than the others, so that a
// command added later counts as state-changing until someone decides
// otherwise.
func (r Request) ChangesState() bool {
	return r.Cmd != CmdStatus
}

// ParseRequest decodes and checks one request line (without its newline).
func ParseRequest(line []byte) (Request, error) {
	var r Request
	if len(line) > MaxRequest {
		return r, fmt.Errorf("request longer than %d bytes", MaxRequest)
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return r, fmt.Errorf("malformed request: %v", err)
	}
	switch r.Cmd {
	case CmdStatus, CmdReload:
	case CmdScale:
		if r.Workers < 1 || r.Workers > 1024 {
			return r, fmt.Errorf("scale: workers must be 1..1024, got %d", r.Workers)
		}
	case CmdRestartWorker:
		if r.Worker == nil || *r.Worker < 0 {
			return r, errors.New("restart-worker: needs \"worker\": the index of a worker")
		}
	case CmdSignal:
		if _, err := SignalByName(r.Signal); err != nil {
			return r, fmt.Errorf("signal: %w", err)
		}
		if r.Worker != nil && *r.Worker < 0 {
			return r, errors.New("signal: \"worker\" must be the index of a worker")
		}
	case "":
		return r, errors.New("request has no \"cmd\"")
	default:
		return r, fmt.Errorf("unknown command %q (known: status, reload, scale, restart-worker, signal)", r.Cmd)
	}
	return r, nil
}

// signalNames are the signals a signal request may carry: the ones
// programs handle themselves (PM2's sendSignal and Node's
// process.on('SIGUSR2') are about these), and the ones that stop, pause
// or end a worker (the dispatcher then sees it exit or stop answering as
// it would for any other cause). Numbers are refused: they differ
// between architectures.
var signalNames = []string{
	"SIGHUP", "SIGINT", "SIGQUIT", "SIGABRT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM",
	"SIGTERM", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGWINCH",
	"SIGPROF", "SIGPWR",
}

// SignalByName returns the signal named name ("SIGUSR2", "USR2", any
// case), one of those a signal request may carry.
func SignalByName(name string) (syscall.Signal, error) {
	up := strings.ToUpper(name)
	if !strings.HasPrefix(up, "SIG") {
		up = "SIG" + up
	}
	for _, n := range signalNames {
		if n == up {
			return unix.SignalNum(n), nil
		}
	}
	return 0, fmt.Errorf("unknown signal %q (known: %s)", name, strings.Join(signalNames, " "))
}
