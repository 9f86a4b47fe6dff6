package dispatcher

import (
	"fmt"
	"syscall"
	"time"
)

// EventKind says what an Event reports.
type EventKind int

// The events Run reports to Options.Observe.
const (
	WorkerStarted     EventKind = iota + 1 // a worker process was forked
	WorkerReady                            // a worker became ready
	WorkerExited                           // a worker was reaped; RestartIn says when its slot is refilled
	WorkerSpawnFailed                      // a worker could not be forked; Err says why
	WorkerWatchdog                         // a worker missed its watchdog (or sent WATCHDOG=trigger) and was sent SIGABRT
	ForeignNotify                          // a notify datagram from a pid that is no worker was ignored
	Ready                                  // READY=1 was sent to systemd
	Stopping                               // the dispatcher began to stop (STOPPING=1)
	WorkerUnhealthy                        // a ready worker failed its round-robin channel and is being replaced
	Draining                               // asked to stop with a drain_delay: /readyz says 503, the workers serve on (STOPPING=1)
	WorkerRecycled                         // a ready worker is being recycled ([recycle]); Reason says why
)

var kindNames = map[EventKind]string{
	WorkerStarted: "worker-started", WorkerReady: "worker-ready", WorkerExited: "worker-exited",
	WorkerSpawnFailed: "worker-spawn-failed", WorkerWatchdog: "worker-watchdog",
	ForeignNotify: "foreign-notify", Ready: "ready", Stopping: "stopping", WorkerUnhealthy: "worker-unhealthy",
	Draining:       "draining",
	WorkerRecycled: "worker-recycled",
}

// String returns the kind's name, e.g. "worker-exited".
func (k EventKind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one thing that happened in a dispatcher, for observers (tests,
// and later the status protocol). Fields that do not apply are zero.
type Event struct {
	Kind   EventKind
	Time   time.Time
	Worker int // the worker's index (slot)
	PID    int
	Gen    int

	// For WorkerExited: how it ended and what happens next.
	ExitCode  int            // -1 when killed by a signal
	Signal    syscall.Signal // 0 when it exited
	Uptime    time.Duration
	RestartIn time.Duration // 0 when the dispatcher is stopping
	Restarts  int           // total restarts of all slots so far
	Err       error         // for WorkerSpawnFailed

	Foreign int    // for ForeignNotify: datagrams ignored so far
	Status  string // the STATUS= line at the time of the event
	// Reason is, for WorkerRecycled, why ("memory 512M > 400M"); for
	// WorkerExited, "recycled (…)" when the worker was retired by one.
	Reason string
	// Serving is how many slots had a ready current worker when the
	// event happened (a worker being recycled serves until its
	// replacement does).
	Serving int
}
