package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

// monitModel is what `cohort monit` knows between two polls: each app's
// last status, each worker's CPU history, and the events seen so far
// (reloads, restarts, crashes, scaling), found by comparing one poll with
// the next. It holds no terminal state, so it is tested without one.
type monitModel struct {
	apps   []monitApp
	prev   map[string]*control.Status // each app's last status that answered
	up     map[string]bool            // whether the app's last poll answered; absent before its first
	hist   map[monitKey][]float64     // CPU% per poll, oldest first, at most sparkWidth
	events []string                   // newest last, at most maxEvents
}

// monitApp is one app as the last poll saw it: its status, or why there
// is none.
type monitApp struct {
	name, source string // source: "unit" or "run"
	st           *control.Status
	problem      string
}

// monitKey names a worker slot of an app.
type monitKey struct {
	app   string
	index int
}

const (
	sparkWidth = 30
	maxEvents  = 200
)

func newMonitModel() *monitModel {
	return &monitModel{prev: map[string]*control.Status{}, up: map[string]bool{}, hist: map[monitKey][]float64{}}
}

// update takes one poll's apps and records what changed since the last.
func (m *monitModel) update(now time.Time, apps []monitApp) {
	seen := map[monitKey]bool{}
	for _, a := range apps {
		// Compared with the last status that answered, not the last
		// poll: a crash while the dispatcher did not answer is still told.
		old := m.prev[a.name]
		wasUp, had := m.up[a.name]
		switch {
		case a.st == nil && wasUp:
			m.event(now, "%s: dispatcher gone (%s)", a.name, a.problem)
		case a.st != nil && had && !wasUp:
			m.event(now, "%s: dispatcher up (pid %d)", a.name, a.st.PID)
		case a.st != nil && !had:
			m.event(now, "%s: %s", a.name, a.st.Line)
		}
		if a.st != nil && old != nil {
			m.diff(now, a.name, old, a.st)
		}
		m.up[a.name] = a.st != nil
		if a.st == nil {
			continue
		}
		m.prev[a.name] = a.st
		for _, w := range current(a.st) {
			k := monitKey{a.name, w.Index}
			seen[k] = true
			h := append(m.hist[k], w.CPUPercent)
			if len(h) > sparkWidth {
				h = h[len(h)-sparkWidth:]
			}
			m.hist[k] = h
		}
	}
	for k := range m.hist {
		if !seen[k] {
			delete(m.hist, k)
		}
	}
	m.apps = apps
}

// current is each slot's newest process: during a replacement the
// status lists the retiring worker and its candidate under one index
// (of one generation when only that worker is restarted), so the one
// started last is the slot's.
func current(st *control.Status) []control.Worker {
	var out []control.Worker
	for _, w := range st.Workers {
		if n := len(out); n > 0 && out[n-1].Index == w.Index {
			if !w.Started.Before(out[n-1].Started) {
				out[n-1] = w
			}
			continue
		}
		out = append(out, w)
	}
	return out
}

// diff records the events between two statuses of app.
func (m *monitModel) diff(now time.Time, app string, old, cur *control.Status) {
	if cur.PID != old.PID {
		m.event(now, "%s: dispatcher restarted (pid %d → %d)", app, old.PID, cur.PID)
		return
	}
	if cur.State != old.State && (cur.State == "reloading" || old.State == "reloading") {
		m.event(now, "%s: %s → %s", app, old.State, cur.State)
	}
	if cur.Generation != old.Generation {
		m.event(now, "%s: generation %d → %d (reload)", app, old.Generation, cur.Generation)
	}
	if cur.ConfigError != old.ConfigError && cur.ConfigError != "" {
		m.event(now, "%s: app file broken: %s", app, cur.ConfigError)
	}
	ow, cw := current(old), current(cur)
	if len(ow) != len(cw) {
		m.event(now, "%s: %d → %d workers", app, len(ow), len(cw))
	}
	byIndex := map[int]control.Worker{}
	for _, w := range ow {
		byIndex[w.Index] = w
	}
	for _, w := range cw {
		o, ok := byIndex[w.Index]
		if !ok {
			continue
		}
		label := fmt.Sprintf("%s.%d", app, w.Index)
		switch {
		case w.Restarts > o.Restarts:
			m.event(now, "%s crashed and restarted (pid %d → %d, %d restarts)", label, o.PID, w.PID, w.Restarts)
		case w.PID != o.PID && w.PID != 0 && o.PID != 0:
			m.event(now, "%s replaced (pid %d → %d, gen %d)", label, o.PID, w.PID, w.Generation)
		case w.State != o.State && (w.State == "backoff" || w.State == "unhealthy" || o.State == "backoff"):
			m.event(now, "%s %s → %s", label, o.State, w.State)
		}
	}
}

func (m *monitModel) event(now time.Time, format string, args ...any) {
	m.events = append(m.events, now.Format("15:04:05")+" "+fmt.Sprintf(format, args...))
	if len(m.events) > maxEvents {
		m.events = m.events[len(m.events)-maxEvents:]
	}
}

// sparkline draws values (CPU%) as block characters, scaled to the
// larger of their maximum and 10 % so that an idle worker's noise stays
// flat, padded on the left to width.
func sparkline(values []float64, width int) string {
	const bars = "▁▂▃▄▅▆▇█"
	top := 10.0
	for _, v := range values {
		top = max(top, v)
	}
	runes := []rune(bars)
	var b strings.Builder
	for range width - len(values) {
		b.WriteByte(' ')
	}
	for _, v := range values {
		i := int(v / top * float64(len(runes)-1))
		b.WriteRune(runes[min(max(i, 0), len(runes)-1)])
	}
	return b.String()
}
