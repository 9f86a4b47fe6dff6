package logrelay

import (
	"strconv"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// One noisy worker must not silence the others, nor the dispatcher
// (issue 15.1). journald limits each unit as a whole (LogRateLimitBurst=
// lines per LogRateLimitIntervalSec=, shared by all the processes of the
// unit and by the dispatcher's own lines), so the dispatcher limits each
// worker slot's lines itself, log_rate_limit_burst per
// log_rate_limit_interval, and the generator sizes journald's limit so
// that all slots' budgets and the dispatcher's lines fit in it: journald's
// limit never decides.
//
// A slot's budget is shared by the processes of the slot (a worker and
// its replacement during a reload, a crash-looping worker's restarts), so
// that restarts do not multiply it. A window begins with a slot's first
// line after the previous one ended and lasts at least the interval: the
// clock is read once per window, when the budget runs out, not per line.
// A slot whose budget ran out gets a timer for the window's end; then it
// says on the dispatcher's log how many lines each of its processes lost
// ("worker 2 (pid 4711): 48,113 lines suppressed in the last 30s"), and so
// does the end of a process's output (it exited) and the dispatcher's end.
// The dispatcher's own lines are never limited here.
//
// Windows are at least the interval long and hold at most burst lines, so
// any span of one interval (journald's window) sees at most 2 × burst
// lines of a slot: the generator's LogRateLimitBurst= counts with that.
//
// No library: golang.org/x/time/rate is a token bucket, which cannot say
// "lines suppressed in this window" nor keep journald's fixed-window
// arithmetic, and costs a clock read per line.

// limiter holds the budgets of all slots.
type limiter struct {
	interval time.Duration
	burst    int
	report   func(format string, args ...any) // the dispatcher's log: never waits, never limited

	mu     sync.Mutex
	slots  map[int]*budget
	closed bool
}

// budget is one slot's window.
type budget struct {
	l     *limiter
	index int

	mu      sync.Mutex
	start   time.Time   // the window's first line
	used    int         // lines passed in the window
	dropped map[int]int // lines suppressed in the window, by pid
	timer   *time.Timer // ends a window whose budget ran out
	closed  bool
}

// newLimiter returns the limiter for lim; nil (no limit) when lim is off.
func newLimiter(lim appfile.LogRateLimit, report func(format string, args ...any)) *limiter {
	if lim.Off() {
		return nil
	}
	return &limiter{interval: lim.Interval, burst: lim.Burst, report: report, slots: map[int]*budget{}}
}

// slot returns the budget of a worker slot; nil (no limit) for a nil l.
func (l *limiter) slot(index int) *budget {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.slots[index]
	if b == nil {
		b = &budget{l: l, index: index, dropped: map[int]int{}, closed: l.closed}
		l.slots[index] = b
	}
	return b
}

// allow says whether one more line of process pid may pass, and counts it.
func (b *budget) allow(pid int) bool {
	if b == nil {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used < b.l.burst {
		if b.used == 0 {
			b.start = time.Now()
		}
		b.used++
		return true
	}
	if b.timer == nil && !b.closed {
		now := time.Now()
		end := b.start.Add(b.l.interval)
		if !now.Before(end) { // the budget lasted the whole window: a new one
			b.start, b.used = now, 1
			return true
		}
		b.timer = time.AfterFunc(end.Sub(now), b.endWindow)
	}
	b.dropped[pid]++
	return false
}

// endWindow is the timer: it reports the window's suppressed lines and
// opens the next window.
func (b *budget) endWindow() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	took := time.Since(b.start)
	dropped := b.dropped
	b.dropped, b.used, b.timer = map[int]int{}, 0, nil
	b.mu.Unlock()
	for pid, n := range dropped {
		b.say(pid, n, "in the last "+roundSeconds(took).String())
	}
}

// exited reports what process pid lost in the current window: its output
// ended (it exited), so no timer would name it.
func (b *budget) exited(pid int) {
	if b == nil {
		return
	}
	b.mu.Lock()
	n := b.dropped[pid]
	delete(b.dropped, pid)
	took := time.Since(b.start)
	b.mu.Unlock()
	if n > 0 {
		b.say(pid, n, "in its last "+roundSeconds(took).String()+", before it exited")
	}
}

func (b *budget) say(pid, n int, when string) {
	b.l.report("worker %d (pid %d): %s line%s suppressed %s (log_rate_limit_burst = %d lines per %s per worker)",
		b.index, pid, thousands(n), plural(n), when, b.l.burst, b.l.interval)
}

// close stops the timers and reports every count not reported yet.
func (l *limiter) close() {
	if l == nil {
		return
	}
	l.mu.Lock()
	l.closed = true
	slots := make([]*budget, 0, len(l.slots))
	for _, b := range l.slots {
		slots = append(slots, b)
	}
	l.mu.Unlock()
	for _, b := range slots {
		b.mu.Lock()
		b.closed = true
		if b.timer != nil {
			b.timer.Stop()
			b.timer = nil
		}
		dropped, took := b.dropped, time.Since(b.start)
		b.dropped = map[int]int{}
		b.mu.Unlock()
		for pid, n := range dropped {
			if n > 0 {
				b.say(pid, n, "in the last "+roundSeconds(took).String())
			}
		}
	}
}

// roundSeconds rounds d to seconds, keeping at least a millisecond's
// precision below one second.
func roundSeconds(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Second)
}

// thousands writes n with commas between groups of three digits.
func thousands(n int) string {
	s := strconv.Itoa(n)
	neg := n < 0
	if neg {
		s = s[1:]
	}
	out := make([]byte, 0, len(s)+len(s)/3+1)
	if neg {
		out = append(out, '-')
	}
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
