package vmtests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// LoadOptions describe a bounded HTTP load: it stops after Requests
// requests or after Duration, whichever comes first.
type LoadOptions struct {
	URL         string        // http://127.0.0.1:PORT/…; only loopback hosts are accepted
	Requests    int           // upper bound on requests sent; required
	Duration    time.Duration // upper bound on the run's time; required
	Concurrency int           // parallel clients; default 4
	Timeout     time.Duration // per request; default 5 s
	// KeepAlive reuses connections. Off by default, so that every request
	// is a new connection that goes through the accept path (the part
	// cohort's reloads and restarts must not break).
	KeepAlive bool
}

// LoadResult counts what a load run saw.
type LoadResult struct {
	Sent    int         // requests attempted
	OK      int         // 2xx responses
	Non2xx  int         // responses with another status
	Errors  int         // no response: refused, reset, timed out…
	Status  map[int]int // responses by status code
	Samples []string    // the first few errors, for the test log
	Elapsed time.Duration
}

// Failed is the number of requests that did not get a 2xx response.
func (r LoadResult) Failed() int { return r.Non2xx + r.Errors }

func (r LoadResult) String() string {
	rate := 0.0
	if r.Elapsed > 0 {
		rate = float64(r.Sent) / r.Elapsed.Seconds()
	}
	return fmt.Sprintf("%d requests in %v (%.0f/s): %d ok, %d non-2xx %v, %d errors %q",
		r.Sent, r.Elapsed.Round(time.Millisecond), rate, r.OK, r.Non2xx, r.Status, r.Errors, r.Samples)
}

const maxSamples = 5

// add counts one request's outcome: a status code, or err when there was
// no response.
func (r *LoadResult) add(code int, err error) {
	r.Sent++
	switch {
	case err != nil:
		r.Errors++
		if len(r.Samples) < maxSamples {
			r.Samples = append(r.Samples, err.Error())
		}
	case code >= 200 && code < 300:
		r.OK++
	default:
		r.Non2xx++
		r.Status[code]++
	}
}

// Load sends GET requests to opts.URL from the host and counts the
// outcomes. It refuses any target but a loopback address, and it always
// ends: after opts.Requests requests, after opts.Duration, or when ctx is
// done (then it returns what it counted along with ctx's error).
func Load(ctx context.Context, opts LoadOptions) (LoadResult, error) {
	opts, err := checkLoad(opts)
	if err != nil {
		return LoadResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Duration)
	defer cancel()
	var (
		mu    sync.Mutex
		res   = LoadResult{Status: map[int]int{}}
		start = time.Now()
	)
	runLoad(ctx, opts, func(code int, err error) {
		mu.Lock()
		defer mu.Unlock()
		res.add(code, err)
	})
	res.Elapsed = time.Since(start)
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return res, fmt.Errorf("load %s: %w", opts.URL, err)
	}
	return res, nil
}

// checkLoad refuses options that are not a bounded load on loopback and
// fills in the defaults.
func checkLoad(opts LoadOptions) (LoadOptions, error) {
	if err := checkLoopback(opts.URL); err != nil {
		return opts, err
	}
	if opts.Requests <= 0 || opts.Duration <= 0 {
		return opts, errors.New("load: Requests and Duration must both be positive (the load is bounded)")
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 4
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	return opts, nil
}

// runLoad is the load loop of Load and StartLoad: opts.Concurrency clients
// send requests until opts.Requests are sent or ctx is done, and record
// (called from those clients) counts each outcome. A request cut off by
// ctx is not counted: that is not the server's fault. It returns when
// every client has ended.
func runLoad(ctx context.Context, opts LoadOptions, record func(code int, err error)) {
	transport := &http.Transport{
		Proxy:               nil, // never through a proxy: the target is local
		DisableKeepAlives:   !opts.KeepAlive,
		MaxIdleConnsPerHost: opts.Concurrency,
		DialContext:         (&net.Dialer{Timeout: opts.Timeout}).DialContext,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: opts.Timeout}
	var (
		next atomic.Int64
		wg   sync.WaitGroup
	)
	for range opts.Concurrency {
		wg.Go(func() {
			for ctx.Err() == nil && next.Add(1) <= int64(opts.Requests) {
				code, err := get(ctx, client, opts.URL)
				if ctx.Err() != nil && err != nil {
					return
				}
				record(code, err)
			}
		})
	}
	wg.Wait()
}

func get(ctx context.Context, client *http.Client, target string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, io.LimitReader(resp.Body, 16<<20)); err != nil {
		return 0, fmt.Errorf("read body: %w", err)
	}
	return resp.StatusCode, nil
}

// checkLoopback refuses every URL whose host is not a loopback address:
// load is only ever sent to this machine.
func checkLoopback(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("load: parse URL: %w", err)
	}
	if u.Scheme != "http" {
		return fmt.Errorf("load: %q: only http:// is supported", raw)
	}
	host := u.Hostname()
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("load: %q: target must be a loopback address (127.0.0.1, [::1], localhost)", raw)
}
