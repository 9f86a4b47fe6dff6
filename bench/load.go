package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Load describes one load-generator run against a hello app.
type Load struct {
	// Addr is the target, "127.0.0.1:port": the generator refuses any
	// other host.
	Addr string
	// Conns is the number of concurrent connections (each sends its next
	// request when the previous response is complete).
	Conns int
	// KeepAlive reuses each connection; without it every request opens a
	// new connection and sends "Connection: close".
	KeepAlive bool
	// Warmup is run first and not counted; Duration is the measured window.
	Warmup, Duration time.Duration
	// Timeout bounds one request (connect + write + response).
	Timeout time.Duration
	// Total, when > 0, stops the load after this many requests started
	// in the measured window (Duration is then an upper bound): a fixed
	// amount of work, to divide a process's CPU time by.
	Total int64
	// Rate, when > 0, paces the measured window's requests to this many
	// per second over all connections (request k starts no earlier than
	// k/Rate after the window opens); 0 sends as fast as responses come.
	Rate float64
}

// Errors counts failed requests by kind, like wrk's "socket errors".
type Errors struct {
	Connect int64 `json:"connect"`
	Read    int64 `json:"read"`
	Write   int64 `json:"write"`
	Timeout int64 `json:"timeout"`
	Status  int64 `json:"status"` // responses other than 200
	// Retried counts requests on a reused keep-alive connection that the
	// server closed before answering anything, retried once on a new
	// connection as HTTP clients do (Go's net/http, browsers). They are
	// not in Total; a failed retry is.
	Retried int64 `json:"retried"`
}

// Total is the number of failed requests.
func (e Errors) Total() int64 { return e.Connect + e.Read + e.Write + e.Timeout + e.Status }

func (e *Errors) add(o Errors) {
	e.Connect += o.Connect
	e.Read += o.Read
	e.Write += o.Write
	e.Timeout += o.Timeout
	e.Status += o.Status
	e.Retried += o.Retried
}

// String lists the non-zero kinds, "0" if there are none, and the retried
// requests in parentheses.
func (e Errors) String() string {
	var b []byte
	if e.Total() == 0 {
		b = append(b, '0')
	}
	for _, k := range []struct {
		n string
		v int64
	}{{"connect", e.Connect}, {"read", e.Read}, {"write", e.Write}, {"timeout", e.Timeout}, {"status", e.Status}} {
		if k.v == 0 {
			continue
		}
		if len(b) > 0 {
			b = append(b, ' ')
		}
		b = fmt.Appendf(b, "%d %s", k.v, k.n)
	}
	if e.Retried > 0 {
		b = fmt.Appendf(b, " (%d retried)", e.Retried)
	}
	return string(b)
}

// Result is what one Load measured, over its Duration only.
type Result struct {
	Requests int64         `json:"requests"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	RPS      float64       `json:"rps"`
	P50      time.Duration `json:"p50_ns"`
	P99      time.Duration `json:"p99_ns"`
	Max      time.Duration `json:"max_ns"`
	Errors   Errors        `json:"errors"`
	// PerWorker counts successful requests by response body, which the
	// hello apps make "<lang> worker <id> pid <pid>".
	PerWorker map[string]int64 `json:"per_worker"`
}

// Spread is max/min of the requests served per worker, counting expected
// workers that served nothing (then +Inf). It is 0 without requests.
func (r Result) Spread(expected int) float64 {
	if len(r.PerWorker) == 0 {
		return 0
	}
	lo, hi := int64(-1), int64(0)
	for _, n := range r.PerWorker {
		if lo < 0 || n < lo {
			lo = n
		}
		hi = max(hi, n)
	}
	if len(r.PerWorker) < expected || lo == 0 {
		return posInf
	}
	return float64(hi) / float64(lo)
}

// checkAddr accepts only 127.0.0.1:port: the generator never loads another
// host.
func checkAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("load target %q: %w", addr, err)
	}
	if host != "127.0.0.1" {
		return fmt.Errorf("load target %q: only 127.0.0.1 may be loaded", addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
		return fmt.Errorf("load target %q: bad port", addr)
	}
	return nil
}

// Apply applies l and returns what it measured. It returns by itself after
// Warmup+Duration (plus at most one Timeout for requests in flight), or
// earlier with ctx's error when ctx is done.
func Apply(ctx context.Context, l Load) (Result, error) {
	if err := checkAddr(l.Addr); err != nil {
		return Result{}, err
	}
	if l.Conns <= 0 || l.Duration <= 0 {
		return Result{}, fmt.Errorf("load on %s: need conns > 0 and duration > 0", l.Addr)
	}
	if l.Timeout <= 0 {
		l.Timeout = 2 * time.Second
	}
	req := "GET / HTTP/1.1\r\nHost: " + l.Addr + "\r\nUser-Agent: cohort-bench\r\n"
	if !l.KeepAlive {
		req += "Connection: close\r\n"
	}
	req += "\r\n"

	start := time.Now()
	measure := start.Add(l.Warmup)
	end := measure.Add(l.Duration)
	ctx, cancel := context.WithDeadline(ctx, end.Add(l.Timeout))
	defer cancel()

	clients := make([]*client, l.Conns)
	var wg sync.WaitGroup
	var started atomic.Int64 // requests started in the window, for Total and Rate
	for i := range clients {
		c := &client{load: &l, req: []byte(req), measure: measure, end: end, started: &started, perWorker: map[string]*int64{}}
		clients[i] = c
		wg.Add(1)
		go func() { // owned by Run: waited for below
			defer wg.Done()
			c.run(ctx)
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return Result{}, fmt.Errorf("load on %s: %w", l.Addr, err)
	}

	res := Result{Elapsed: l.Duration, PerWorker: map[string]int64{}}
	var lat []time.Duration
	var last time.Time
	for _, c := range clients {
		if c.last.After(last) {
			last = c.last
		}
		res.Requests += c.requests
		res.Errors.add(c.errors)
		lat = append(lat, c.latencies...)
		for k, n := range c.perWorker {
			res.PerWorker[k] += *n
		}
	}
	if l.Total > 0 && last.After(measure) && last.Before(end) {
		res.Elapsed = last.Sub(measure) // the fixed amount ended before the window
	}
	res.RPS = float64(res.Requests) / res.Elapsed.Seconds()
	if len(lat) > 0 {
		slices.Sort(lat)
		res.P50 = percentile(lat, 0.50)
		res.P99 = percentile(lat, 0.99)
		res.Max = lat[len(lat)-1]
	}
	return res, nil
}

// percentile of a sorted sample (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// client is one connection slot of a Run; only its own goroutine touches
// it until Run has waited for it.
type client struct {
	load         *Load
	req          []byte
	measure, end time.Time
	started      *atomic.Int64 // shared by the Load's clients
	last         time.Time     // when the last counted response ended

	conn   net.Conn
	reused bool // conn has served a response
	br     *bufio.Reader
	body   []byte

	requests  int64
	errors    Errors
	latencies []time.Duration
	perWorker map[string]*int64
}

func (c *client) run(ctx context.Context) {
	defer c.close()
	dialer := net.Dialer{Timeout: c.load.Timeout}
	var retry time.Time // the start of a request being retried
	for ctx.Err() == nil {
		t0 := time.Now()
		if !t0.Before(c.end) {
			return
		}
		if !retry.IsZero() {
			t0 = retry
		}
		counted := !t0.Before(c.measure)
		if counted && retry.IsZero() && (c.load.Total > 0 || c.load.Rate > 0) {
			k := c.started.Add(1)
			if c.load.Total > 0 && k > c.load.Total {
				return
			}
			if c.load.Rate > 0 {
				at := c.measure.Add(time.Duration(float64(k-1) / c.load.Rate * float64(time.Second)))
				if d := time.Until(at); d > 0 {
					select {
					case <-time.After(d):
					case <-ctx.Done():
						return
					}
				}
				t0 = time.Now()
			}
		}
		if c.conn == nil {
			conn, err := dialer.DialContext(ctx, "tcp", c.load.Addr)
			if err != nil {
				retry = time.Time{}
				if ctx.Err() != nil {
					return
				}
				if counted {
					if isTimeout(err) {
						c.errors.Timeout++
					} else {
						c.errors.Connect++
					}
				}
				// A refused connect fails at once: do not spin.
				time.Sleep(time.Millisecond)
				continue
			}
			c.conn, c.reused = conn, false
			if c.br == nil {
				c.br = newReader(conn)
			} else {
				c.br.Reset(conn)
			}
		}
		_ = c.conn.SetDeadline(t0.Add(c.load.Timeout))
		var err error
		if _, werr := c.conn.Write(c.req); werr != nil {
			err = fmt.Errorf("%w: %w", errWrite, werr)
		}
		var status int
		keep := false
		if err == nil {
			status, keep, err = c.readResponse()
		}
		if err != nil {
			reused := c.reused
			c.close()
			if ctx.Err() != nil {
				return
			}
			// The server closed an idle keep-alive connection as the
			// request went out: a client retries that once.
			if reused && retry.IsZero() && !isTimeout(err) && (errors.Is(err, errNoResponse) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)) {
				retry = t0
				if counted {
					c.errors.Retried++
				}
				continue
			}
			retry = time.Time{}
			if counted {
				switch {
				case isTimeout(err):
					c.errors.Timeout++
				case errors.Is(err, errWrite):
					c.errors.Write++
				default:
					c.errors.Read++
				}
			}
			continue
		}
		retry = time.Time{}
		c.reused = true
		done := time.Now()
		if !keep || !c.load.KeepAlive {
			c.close()
		}
		if !counted || !done.Before(c.end) {
			continue
		}
		if status != 200 {
			c.errors.Status++
			continue
		}
		c.requests++
		c.last = done
		c.latencies = append(c.latencies, done.Sub(t0))
		if n := c.perWorker[string(c.body)]; n != nil {
			*n++
		} else {
			one := int64(1)
			c.perWorker[string(c.body)] = &one
		}
	}
}

func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

var (
	errResponse   = errors.New("malformed HTTP response")
	errNoResponse = errors.New("connection closed before any response byte")
	errWrite      = errors.New("write request")
)

// readResponse reads one HTTP/1.1 response with a Content-Length body into
// c.body (trailing newline trimmed). keep is false when the server said
// "Connection: close".
func (c *client) readResponse() (status int, keep bool, err error) {
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		if len(line) == 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			return 0, false, fmt.Errorf("%w: %w", errNoResponse, err)
		}
		return 0, false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, false, fmt.Errorf("%w: status line %q", errResponse, line)
	}
	status, err = strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, fmt.Errorf("%w: status line %q", errResponse, line)
	}
	length, keep := -1, true
	for {
		h, err := c.br.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		h = bytes.TrimRight(h, "\r\n")
		if len(h) == 0 {
			break
		}
		name, value, ok := bytes.Cut(h, []byte(":"))
		if !ok {
			return 0, false, fmt.Errorf("%w: header %q", errResponse, h)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			length, err = strconv.Atoi(string(value))
			if err != nil || length < 0 {
				return 0, false, fmt.Errorf("%w: Content-Length %q", errResponse, value)
			}
		case bytes.EqualFold(name, []byte("Connection")):
			if bytes.EqualFold(value, []byte("close")) {
				keep = false
			}
		}
	}
	if length < 0 {
		return 0, false, fmt.Errorf("%w: no Content-Length", errResponse)
	}
	if cap(c.body) < length {
		c.body = make([]byte, length)
	}
	c.body = c.body[:length]
	if _, err := io.ReadFull(c.br, c.body); err != nil {
		return 0, false, err
	}
	c.body = bytes.TrimRight(c.body, "\n")
	return status, keep, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func newReader(r io.Reader) *bufio.Reader { return bufio.NewReaderSize(r, 4096) }

var posInf = math.Inf(1)
