package logrelay

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// Output never blocks supervision (issue 14.4). Each destination (the
// workers' stdout, the dispatcher's log on stderr) is a stream: a bounded
// queue that one writer goroutine empties into the io.Writer. Whoever has
// a line enqueues it and goes on:
//
//   - the supervision loop (the dispatcher's log lines) never waits: a
//     line that does not fit is dropped and counted;
//   - a worker's output reader waits for room while the writer makes
//     progress, so a slow terminal slows a chatty worker down as a pipe
//     would, and drops (counting) once the writer has been stuck in one
//     write for stallAfter: a pipe nobody reads, a stopped terminal.
//
// Each source (a worker process, or the dispatcher) may have at most
// perSourceQueue bytes queued, all together at most streamQueue, so one
// flooding worker cannot crowd the others out. Dropped lines are
// reported on the log stream, per source, when its lines flow again (or
// at the end): "dropped 120 lines of worker 2 (pid 4242)". A write that
// fails (EPIPE: the reader went away) breaks the stream: later lines are
// dropped and counted, once said so on the log.

const (
	perSourceQueue = 256 << 10 // bytes queued per source; one longer line passes when the source has none queued
	streamQueue    = 8 << 20   // bytes queued per stream
	stallAfter     = time.Second
	// flushTimeout bounds how long close waits for a stream's last
	// lines: a write blocked on a pipe nobody reads never returns.
	flushTimeout = 2 * time.Second
)

// logSource is the dispatcher's own lines in drop counts.
var logSource = Tag{Index: -1}

// stream is one destination with its queue and writer goroutine.
type stream struct {
	name   string // "stdout", "stderr", for messages
	w      io.Writer
	notice func(string) // reports drops and a broken stream on the log; must not wait

	mu        sync.Mutex
	queue     []queued
	bytes     int         // queued, all sources
	perSource map[Tag]int // queued bytes by source
	dropped   map[Tag]int // lines dropped since last reported
	writing   time.Time   // when the running write began; zero when idle
	broken    error       // the write error that broke the stream
	closed    bool
	wake      chan struct{} // to the writer: lines queued or closed (capacity 1)
	room      chan struct{} // closed and replaced when the writer took lines
	done      chan struct{} // closed when the writer ends
}

type queued struct {
	src  Tag
	line []byte
}

func newStream(name string, w io.Writer) *stream {
	s := &stream{
		name: name, w: w,
		perSource: map[Tag]int{}, dropped: map[Tag]int{},
		wake: make(chan struct{}, 1), room: make(chan struct{}), done: make(chan struct{}),
	}
	go s.run() // owned by the Relay: close ends it
	return s
}

// put queues line (with its newline) from src. With wait, it waits for
// room while the writer makes progress; without, it never blocks.
func (s *stream) put(src Tag, line []byte, wait bool) {
	s.mu.Lock()
	for !s.fits(src, len(line)) {
		stuck := !s.writing.IsZero() && time.Since(s.writing) >= stallAfter
		if !wait || s.broken != nil || s.closed || stuck {
			first := s.drop(src)
			s.mu.Unlock()
			if first {
				s.reportFirstDrop(src)
			}
			return
		}
		room := s.room
		var left time.Duration
		if !s.writing.IsZero() {
			left = stallAfter - time.Since(s.writing)
		} else {
			left = stallAfter
		}
		s.mu.Unlock()
		t := time.NewTimer(left)
		select {
		case <-room:
		case <-t.C:
		}
		t.Stop()
		s.mu.Lock()
	}
	if s.broken != nil || s.closed {
		first := s.drop(src)
		s.mu.Unlock()
		if first {
			s.reportFirstDrop(src)
		}
		return
	}
	s.queue = append(s.queue, queued{src, line})
	s.bytes += len(line)
	s.perSource[src] += len(line)
	var flowed int
	if n := s.dropped[src]; n > 0 {
		flowed = n
		delete(s.dropped, src)
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	if flowed > 0 {
		s.reportDrops(src, flowed)
	}
}

// fits says whether n more bytes from src may be queued. s.mu is held.
func (s *stream) fits(src Tag, n int) bool {
	have := s.perSource[src]
	if have > 0 && have+n > perSourceQueue {
		return false
	}
	return s.bytes == 0 || s.bytes+n <= streamQueue
}

// drop counts a dropped line of src and says whether it is the first
// since src's lines last got through. s.mu is held.
func (s *stream) drop(src Tag) bool {
	s.dropped[src]++
	return s.dropped[src] == 1 && s.broken == nil
}

// reportFirstDrop says on the log that src's lines are being dropped
// (how many is said when they flow again). The log's own drops can only
// be said once it flows again.
func (s *stream) reportFirstDrop(src Tag) {
	if src != logSource && s.notice != nil {
		s.notice(fmt.Sprintf("%s is not draining: dropping lines of worker %d (pid %d) until it does", s.name, src.Index, src.PID))
	}
}

func (s *stream) reportDrops(src Tag, n int) {
	what := "the dispatcher's log"
	if src != logSource {
		what = fmt.Sprintf("worker %d (pid %d)", src.Index, src.PID)
	}
	msg := fmt.Sprintf("dropped %d line%s of %s: %s was not taking them fast enough", n, plural(n), what, s.name)
	if s.notice != nil {
		s.notice(msg)
	}
}

// run is the writer: it writes everything queued in one write, until
// close, or until a write fails.
func (s *stream) run() {
	defer close(s.done)
	var buf []byte
	for {
		<-s.wake
		s.mu.Lock()
		if len(s.queue) == 0 {
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return
			}
			continue
		}
		buf = buf[:0]
		for _, q := range s.queue {
			buf = append(buf, q.line...)
			s.perSource[q.src] -= len(q.line)
			if s.perSource[q.src] == 0 {
				delete(s.perSource, q.src)
			}
		}
		clear(s.queue)
		s.queue = s.queue[:0]
		s.bytes = 0
		s.writing = time.Now()
		close(s.room)
		s.room = make(chan struct{})
		s.mu.Unlock()

		_, err := s.w.Write(buf)

		s.mu.Lock()
		s.writing = time.Time{}
		if err != nil {
			s.broken = err
		}
		closed := s.closed
		s.mu.Unlock()
		if cap(buf) > streamQueue {
			buf = nil // do not keep a burst's buffer
		}
		if err != nil {
			if s.notice != nil {
				s.notice(fmt.Sprintf("writing to %s failed (%v): its lines are dropped from now on; the workers go on", s.name, err))
			}
			return
		}
		if closed {
			select {
			case s.wake <- struct{}{}: // write what came with close
			default:
			}
		}
	}
}

// close lets the writer finish what is queued, waiting at most timeout,
// and reports drops that were never reported. It returns whether the
// writer ended.
func (s *stream) close(timeout time.Duration) bool {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-s.done:
		return true
	case <-t.C:
		return false
	}
}

// takeDrops returns and clears the drop counts not reported yet.
func (s *stream) takeDrops() map[Tag]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.dropped
	s.dropped = map[Tag]int{}
	for k, n := range d {
		if n == 0 {
			delete(d, k)
		}
	}
	return d
}
