package dispatcher

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"

	"github.com/cohort-dev/cohort/activation/rr"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/balance"
	"github.com/cohort-dev/cohort/dispatcher/internal/probe"
)

// roundRobin is round-robin mode: the balancer (internal/balance) accepts
// on the listeners and hands connections to the workers over a channel
// each, fd 3 of the worker, named rr.FDName. This type only maps the
// mode's calls onto the balancer's.
type roundRobin struct {
	cfg balance.Config
	b   *balance.Balancer // nil until open
}

func newRoundRobin(app *appfile.App, listeners []*os.File, names []string, out *output) *roundRobin {
	ackTimeout := app.AckTimeout
	if ackTimeout <= 0 {
		ackTimeout = appfile.DefaultAckTimeout
	}
	return &roundRobin{cfg: balance.Config{
		Listeners:      listeners,
		Names:          names,
		MaxPending:     app.MaxPending,
		AckTimeout:     ackTimeout,
		Policy:         policyOf(app),
		Sticky:         app.Sticky == appfile.StickyClientIP,
		ProxyProtocol:  app.Sticky == appfile.StickyProxyProtocol,
		AcceptThreads:  app.AcceptThreads,
		AcceptInterval: app.AcceptInterval,
		Warnf:          out.warnf,
		Infof:          out.infof,
	}}
}

// workersPerAcceptThread is how many workers one event loop keeps up
// with: a loop spends about a quarter of what a request on a new
// connection costs a worker (docs/config.md, Round-robin's cost), so it
// saturates a core of its own when about 4 cores of workers are busy.
const workersPerAcceptThread = 4

// autoAcceptThreads is accept_threads when the app file does not say:
// one event loop per 4 workers, at least 1.
func autoAcceptThreads(workers int) int {
	return min(max(1, (workers+workersPerAcceptThread-1)/workersPerAcceptThread), appfile.MaxAcceptThreads)
}

// policyOf maps balance = and sticky = to the balancer's Policy.
func policyOf(app *appfile.App) balance.Policy {
	var policy balance.Policy = balance.RoundRobin{}
	switch app.Balance {
	case appfile.BalanceLeastConnections:
		policy = balance.LeastConnections{}
	case appfile.BalanceP2C:
		policy = balance.NewP2C(rand.Uint64())
	case appfile.BalanceWeighted:
		policy = balance.NewWeighted(app.Weights)
	}
	if app.Sticky != appfile.StickyNone {
		policy = &balance.Sticky{LoadFactor: balance.DefaultLoadFactor, Fallback: policy}
	}
	return policy
}

func (m *roundRobin) open(ctx context.Context, workers int) error {
	cfg := m.cfg
	cfg.MaxHandoffs = 2 * workers // a connection back this often is closed
	if cfg.AcceptThreads <= 0 {
		cfg.AcceptThreads = autoAcceptThreads(workers)
	}
	b, err := balance.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("round-robin: %w", err)
	}
	m.b = b
	return nil
}

func (m *roundRobin) start(slot int) (workerStart, error) {
	st, err := m.b.NewChannel(slot)
	if err != nil {
		return workerStart{}, err
	}
	ws := workerStart{
		args:   forkArgs{fds: []uintptr{st.End.Fd()}, names: rr.FDName, env: m.b.Env()},
		forked: st.Forked,
	}
	if st.EndIno != 0 {
		// ready = "listening" watches the worker's end of the channel.
		ws.probe = probe.Targets{Inodes: []uint64{st.EndIno}, Channel: true}
	}
	return ws, nil
}

func (m *roundRobin) ready(pid int)                { m.b.Ready(pid) }
func (m *roundRobin) drain(pid int, retiring bool) { m.b.Drain(pid, retiring) }
func (m *roundRobin) exited(pid int)               { m.b.Exited(pid) }
func (m *roundRobin) stop()                        { m.b.Stop() }
func (m *roundRobin) status(slots int) string      { return m.b.Status(slots) }
func (m *roundRobin) conns(pid int) (uint64, int)  { return m.b.Counts(pid) }
func (m *roundRobin) faults() <-chan struct{}      { return m.b.Faults() }
func (m *roundRobin) accepted() []uint64           { return m.b.Accepted() }
func (m *roundRobin) fixedWorkers() fixedCount     { return fixedCount{} }

func (m *roundRobin) takeFaults(serving func(pid int) bool) []modeFault {
	fs := m.b.TakeFaults(serving)
	out := make([]modeFault, len(fs))
	for i, f := range fs {
		out[i] = modeFault{pid: f.PID, why: f.Why, silent: f.Silent, note: "what it did not acknowledge goes to the other workers"}
	}
	return out
}

func (m *roundRobin) close() {
	if m.b != nil {
		m.b.Close()
	}
}
