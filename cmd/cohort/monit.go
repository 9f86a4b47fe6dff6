package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gdamore/tcell/v2"
	"github.com/rivo/tview"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/logline"
)

// `cohort monit`: a live view of every app's workers, PM2's `pm2 monit`
// without its cost (pm2 #2793: it keeps a CPU busy). The terminal UI is
// rivo/tview on tcell, drawn only when something changed: once per poll
// and at a key. A poll is one status request per app over its control
// socket, the same `cohort status` makes, so a dispatcher pays for monit
// what it pays for a status a second (the /proc reads of its workers,
// off its supervision loop).

const monitAbout = `Show every app's workers live: state, CPU%, a CPU sparkline, memory,
restarts, connections, uptime; reloads, restarts and crashes as they
happen; the last log lines of the selected worker (from the journal).
Keys: ↑/↓ select, r reload the app, R restart the worker gracefully,
+/- one worker more/less, q quit.`

// monitLogLines is how many of the selected worker's lines monit keeps.
const monitLogLines = 200

func cmdMonit(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "monit", "[--interval DURATION] [APP…]", monitAbout)
	interval := fs.Duration("interval", time.Second, "how often to ask the dispatchers")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *interval < 100*time.Millisecond {
		fmt.Fprintln(env.stderr, "cohort monit: --interval must be at least 100ms")
		return 2
	}
	only := map[string]bool{}
	for _, a := range fs.Args() {
		if err := appfile.CheckAppName(a); err != nil {
			fmt.Fprintf(env.stderr, "cohort monit: %v\n", err)
			return 2
		}
		only[a] = true
	}
	m := newMonitUI(env, only, *interval)
	if err := m.run(ctx); err != nil {
		fmt.Fprintf(env.stderr, "cohort monit: %v\n", err)
		return 1
	}
	return 0
}

// monitRow is what a table row shows: an app (index -1) or a worker.
type monitRow struct {
	app    monitApp
	worker control.Worker
	index  int
}

// monitUI is the terminal and what it shows. The model and the rows are
// touched only in tview's event goroutine (QueueUpdateDraw and key
// handlers); the poller and the log tail hand their results to it there.
type monitUI struct {
	env      *environment
	only     map[string]bool
	interval time.Duration

	app    *tview.Application
	header *tview.TextView
	table  *tview.Table
	events *tview.TextView
	logs   *tview.TextView

	model *monitModel
	rows  []monitRow

	ctx  context.Context
	wg   sync.WaitGroup // the poller, the log tail, the actions
	tail struct {
		key    monitKey
		cancel context.CancelFunc
		lines  []string
	}
}

func newMonitUI(env *environment, only map[string]bool, interval time.Duration) *monitUI {
	m := &monitUI{env: env, only: only, interval: interval, model: newMonitModel()}
	m.app = tview.NewApplication()
	m.header = tview.NewTextView().SetDynamicColors(true)
	m.header.SetText(fmt.Sprintf("[::b]cohort monit[::-]  every %v   ↑↓ select  [::b]r[::-] reload app  [::b]R[::-] restart worker  [::b]+[::-]/[::b]-[::-] scale  [::b]q[::-] quit", interval))
	m.table = tview.NewTable().SetSelectable(true, false).SetFixed(1, 0)
	m.table.SetBorder(true).SetTitle(" workers ")
	m.events = tview.NewTextView().SetDynamicColors(false)
	m.events.SetBorder(true).SetTitle(" events ")
	m.logs = tview.NewTextView().SetDynamicColors(false)
	m.logs.SetBorder(true).SetTitle(" log ")
	bottom := tview.NewFlex().AddItem(m.events, 0, 1, false).AddItem(m.logs, 0, 1, false)
	root := tview.NewFlex().SetDirection(tview.FlexRow).
		AddItem(m.header, 1, 0, false).
		AddItem(m.table, 0, 3, true).
		AddItem(bottom, 0, 2, false)
	m.app.SetRoot(root, true)
	m.table.SetSelectionChangedFunc(func(row, _ int) { m.selected(row) })
	m.app.SetInputCapture(m.key)
	return m
}

// run shows the view until q, Ctrl-C or ctx ends; every goroutine it
// started has ended when it returns.
func (m *monitUI) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	m.ctx = ctx
	defer func() {
		cancel()
		m.wg.Wait()
	}()
	stop := context.AfterFunc(ctx, m.app.Stop)
	defer stop()
	m.wg.Go(func() { m.poll(ctx) })
	return m.app.Run()
}

// poll asks every app for its status each interval and hands the result
// to the UI.
func (m *monitUI) poll(ctx context.Context) {
	t := time.NewTicker(m.interval)
	defer t.Stop()
	for {
		apps := m.fetch(ctx)
		now := time.Now()
		m.app.QueueUpdateDraw(func() {
			m.model.update(now, apps)
			m.render(now)
		})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// fetch is one status of every known app, in parallel, bounded.
func (m *monitUI) fetch(ctx context.Context) []monitApp {
	var known []knownApp
	for _, a := range m.env.knownApps() {
		if len(m.only) == 0 || m.only[a.Name] {
			known = append(known, a)
		}
	}
	out := make([]monitApp, len(known))
	var wg sync.WaitGroup
	for i, a := range known {
		out[i] = monitApp{name: a.Name, source: a.Source}
		wg.Go(func() {
			c, cancel := context.WithTimeout(ctx, m.interval*3)
			defer cancel()
			rep, err := control.Call(c, a.Socket, control.Request{Cmd: control.CmdStatus})
			switch {
			case err != nil:
				out[i].problem = shortProblem(err)
			case rep.Status == nil:
				out[i].problem = "no status"
			default:
				out[i].st = rep.Status
			}
		})
	}
	wg.Wait()
	return out
}

// shortProblem is why an app did not answer, in a few words (monit does
// not ask systemd for the long story: `cohort status APP` does).
func shortProblem(err error) string {
	switch {
	case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return "needs root"
	case errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED):
		return "not running (or waiting for its first connection)"
	}
	return err.Error()
}

// render redraws the table, the events and the selection from the model.
func (m *monitUI) render(now time.Time) {
	row, _ := m.table.GetSelection()
	var keep monitKey
	if row > 0 && row-1 < len(m.rows) {
		r := m.rows[row-1]
		keep = monitKey{r.app.name, r.index}
	}
	m.table.Clear()
	for i, h := range []string{"WORKER", "PID", "STATE", "CPU%", "CPU (last " + strconv.Itoa(sparkWidth) + ")", "RSS", "RESTARTS", "CONNS", "UPTIME"} {
		m.table.SetCell(0, i, tview.NewTableCell(h).SetSelectable(false).SetAttributes(tcell.AttrBold))
	}
	m.rows = m.rows[:0]
	sel := 0
	for _, a := range m.model.apps {
		m.rows = append(m.rows, monitRow{app: a, index: -1})
		r := len(m.rows)
		if (monitKey{a.name, -1}) == keep {
			sel = r
		}
		cells := []string{a.name, "-", "down", "", a.problem}
		if a.st != nil {
			cells = appCells(a.st, now)
		}
		for i, c := range cells {
			cell := tview.NewTableCell(tview.Escape(c)).SetAttributes(tcell.AttrBold)
			if i == 2 && c != "ready" {
				cell.SetTextColor(tcell.ColorYellow)
			}
			m.table.SetCell(r, i, cell)
		}
		if a.st == nil {
			continue
		}
		rr := a.st.Mode == string(appfile.ModeRoundRobin)
		for _, w := range current(a.st) {
			m.rows = append(m.rows, monitRow{app: a, worker: w, index: w.Index})
			r := len(m.rows)
			pid, uptime := workerTimes(w, now)
			color := sgrColor(logline.WorkerColor(w.Index))
			cells := []string{"  " + logline.Worker(a.name, w.Index), pid, w.State, fmt.Sprintf("%.1f", w.CPUPercent),
				sparkline(m.model.hist[monitKey{a.name, w.Index}], sparkWidth), humanBytes(w.RSS), strconv.Itoa(w.Restarts),
				conns(rr, w.Active, w.Handed), uptime}
			for i, c := range cells {
				cell := tview.NewTableCell(tview.Escape(c))
				if i == 0 {
					cell.SetTextColor(color)
				}
				if i == 2 && w.State != "ready" {
					cell.SetTextColor(tcell.ColorYellow)
				}
				m.table.SetCell(r, i, cell)
			}
			if (monitKey{a.name, w.Index}) == keep {
				sel = r
			}
		}
	}
	if sel == 0 && len(m.rows) > 0 {
		sel = 1
	}
	if sel > 0 {
		m.table.Select(sel, 0)
	}
	m.events.SetText(strings.Join(m.model.events, "\n"))
	m.events.ScrollToEnd()
}

// appCells is an app's row: its dispatcher's pid and state, the sum of
// its workers' CPU and memory, what it runs (generation, mode, file
// problem) where the workers have their sparkline, restarts, uptime.
func appCells(st *control.Status, now time.Time) []string {
	var cpu float64
	var rss int64
	restarts, ready := 0, 0
	ws := current(st)
	for _, w := range ws {
		cpu += w.CPUPercent
		rss += w.RSS
		restarts += w.Restarts
		if w.State == "ready" {
			ready++
		}
	}
	what := fmt.Sprintf("%d/%d ready · gen %d · %s", ready, len(ws), st.Generation, st.Mode)
	if st.ConfigError != "" {
		what += " · file broken: " + st.ConfigError
	}
	uptime := "-"
	if !st.Since.IsZero() {
		uptime = now.Sub(st.Since).Round(time.Second).String()
	}
	return []string{st.App, strconv.Itoa(st.PID), st.State, fmt.Sprintf("%.1f", cpu), what, humanBytes(rss), strconv.Itoa(restarts), "", uptime}
}

// selected follows the selection: the log panel tails the selected
// worker's lines.
func (m *monitUI) selected(row int) {
	if row < 1 || row-1 >= len(m.rows) {
		return
	}
	r := m.rows[row-1]
	key := monitKey{r.app.name, r.index}
	if key == m.tail.key && m.tail.cancel != nil {
		return
	}
	if m.tail.cancel != nil {
		m.tail.cancel()
		m.tail.cancel = nil
	}
	m.tail.key, m.tail.lines = key, nil
	switch {
	case r.index < 0:
		m.logs.SetTitle(" log ")
		m.logs.SetText("select a worker to see its last lines")
		return
	case r.app.source != "unit":
		m.logs.SetTitle(" log: " + logline.Worker(r.app.name, r.index) + " ")
		m.logs.SetText("'cohort run' prints its workers' lines on its own terminal")
		return
	}
	m.logs.SetTitle(" log: " + logline.Worker(r.app.name, r.index) + " ")
	m.logs.SetText("")
	ctx, cancel := context.WithCancel(m.ctx)
	m.tail.cancel = cancel
	m.wg.Go(func() { m.follow(ctx, key) })
}

// follow tails worker key's journal lines with journalctl -f until ctx
// ends (another selection, or monit ends).
func (m *monitUI) follow(ctx context.Context, key monitKey) {
	bin := m.env.journalctl
	if bin == "" {
		bin = "journalctl"
	}
	cmd := exec.CommandContext(ctx, bin, "--output=json", "--all", "--no-pager", "--quiet", "--lines=20", "--follow",
		"--unit="+key.app+".service", "COHORT_WORKER="+strconv.Itoa(key.index))
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		m.app.QueueUpdateDraw(func() { m.logs.SetText("journalctl: " + err.Error()) })
		return
	}
	defer cmd.Wait()
	pr := &logPrinter{units: map[string]string{key.app + ".service": key.app}}
	rd := bufio.NewReaderSize(out, 64<<10)
	for {
		line, tooLong, err := readEntry(rd)
		if len(line) > 0 && !tooLong {
			if _, msg, perr := pr.entry(line); perr == nil {
				text := string(logline.AppendVisible(nil, msg))
				m.app.QueueUpdateDraw(func() {
					if m.tail.key != key {
						return
					}
					m.tail.lines = append(m.tail.lines, text)
					if len(m.tail.lines) > monitLogLines {
						m.tail.lines = m.tail.lines[len(m.tail.lines)-monitLogLines:]
					}
					m.logs.SetText(strings.Join(m.tail.lines, "\n"))
					m.logs.ScrollToEnd()
				})
			}
		}
		if err != nil {
			return
		}
	}
}

// key handles monit's keys; the others go to the table (arrows, paging).
func (m *monitUI) key(ev *tcell.EventKey) *tcell.EventKey {
	if ev.Key() == tcell.KeyEscape {
		m.app.Stop()
		return nil
	}
	if ev.Key() != tcell.KeyRune {
		return ev
	}
	row, _ := m.table.GetSelection()
	var r *monitRow
	if row > 0 && row-1 < len(m.rows) {
		r = &m.rows[row-1]
	}
	switch ev.Rune() {
	case 'q':
		m.app.Stop()
	case 'r':
		if r != nil {
			m.act(r.app, "reload", func(ctx context.Context) error { return m.reload(ctx, r.app) })
		}
	case 'R':
		if r != nil && r.index >= 0 {
			i := r.index
			m.act(r.app, fmt.Sprintf("restart of worker %d", i), func(ctx context.Context) error {
				return m.call(ctx, r.app, control.Request{Cmd: control.CmdRestartWorker, Worker: &i})
			})
		}
	case '+', '-':
		if r != nil && r.app.st != nil {
			n := len(current(r.app.st)) + 1
			if ev.Rune() == '-' {
				n -= 2
			}
			if n >= 1 && n <= appfile.MaxWorkers {
				m.act(r.app, fmt.Sprintf("scale to %d", n), func(ctx context.Context) error {
					return m.call(ctx, r.app, control.Request{Cmd: control.CmdScale, Workers: n})
				})
			}
		}
	default:
		return ev
	}
	return nil
}

// act runs f for app in the background and records its start and end as
// events; the view stays live meanwhile.
func (m *monitUI) act(a monitApp, what string, f func(ctx context.Context) error) {
	m.model.event(time.Now(), "%s: %s requested", a.name, what)
	m.events.SetText(strings.Join(m.model.events, "\n")).ScrollToEnd()
	m.wg.Go(func() {
		err := f(m.ctx)
		m.app.QueueUpdateDraw(func() {
			if err != nil {
				m.model.event(time.Now(), "%s: %s failed: %v", a.name, what, err)
			} else {
				m.model.event(time.Now(), "%s: %s done", a.name, what)
			}
			m.events.SetText(strings.Join(m.model.events, "\n")).ScrollToEnd()
		})
	})
}

// reload reloads a: through systemd for a generated service (so that
// systemd knows, as `cohort reload` does), over its control socket for
// a `cohort run`.
func (m *monitUI) reload(ctx context.Context, a monitApp) error {
	if a.source == "unit" {
		return reloadUnit(ctx, a.name+".service", 10*time.Minute)
	}
	return m.call(ctx, a, control.Request{Cmd: control.CmdReload})
}

// call sends req to a's control socket.
func (m *monitUI) call(ctx context.Context, a monitApp, req control.Request) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	_, err := control.Call(ctx, m.env.socketFor(a.name), req)
	return err
}

// sgrColor is the tcell colour of an SGR foreground colour (30–37,
// 90–97), the same as `cohort logs` gives the worker.
func sgrColor(c logline.Color) tcell.Color {
	switch {
	case c >= 30 && c <= 37:
		return tcell.PaletteColor(int(c) - 30)
	case c >= 90 && c <= 97:
		return tcell.PaletteColor(int(c) - 90 + 8)
	}
	return tcell.ColorDefault
}
