package main

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
)

// TestMonitEvents: what changed between two polls becomes one event each:
// a reload (generation), a crash (restarts), a replacement (pid), scaling,
// a dispatcher that went away or came back; the CPU history follows the
// slots that exist.
func TestMonitEvents(t *testing.T) {
	at := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	st := func(gen, pid int, ws ...control.Worker) *control.Status {
		return &control.Status{App: "web", Generation: gen, PID: pid, State: "ready", Line: "ok", Workers: ws}
	}
	w := func(i, pid, gen, restarts int, cpu float64) control.Worker {
		return control.Worker{Index: i, PID: pid, Generation: gen, Restarts: restarts, State: "ready", CPUPercent: cpu}
	}
	m := newMonitModel()
	steps := []struct {
		apps []monitApp
		want []string
	}{
		{[]monitApp{{name: "web", st: st(1, 10, w(0, 11, 1, 0, 5), w(1, 12, 1, 0, 7))}}, []string{"web: ok"}},
		{[]monitApp{{name: "web", st: st(1, 10, w(0, 11, 1, 0, 5), w(1, 13, 1, 1, 9))}}, []string{"web.1 crashed and restarted (pid 12 → 13, 1 restarts)"}},
		{[]monitApp{{name: "web", st: st(2, 10, w(0, 21, 2, 0, 1), w(1, 22, 2, 1, 1), w(2, 23, 2, 0, 0))}}, []string{"web: generation 1 → 2 (reload)", "web: 2 → 3 workers", "web.0 replaced (pid 11 → 21, gen 2)", "web.1 replaced (pid 13 → 22, gen 2)"}},
		{[]monitApp{{name: "web", problem: "not running"}}, []string{"web: dispatcher gone (not running)"}},
		{[]monitApp{{name: "web", st: st(1, 30, w(0, 31, 1, 0, 0))}}, []string{"web: dispatcher up (pid 30)", "web: dispatcher restarted (pid 10 → 30)"}},
		// A poll the dispatcher did not answer, and a crash meanwhile:
		// still told, against the last status that answered.
		{[]monitApp{{name: "web", problem: "timeout"}}, []string{"web: dispatcher gone (timeout)"}},
		{[]monitApp{{name: "web", st: st(1, 30, w(0, 32, 1, 1, 0))}}, []string{"web: dispatcher up (pid 30)", "web.0 crashed and restarted (pid 31 → 32, 1 restarts)"}},
	}
	for i, s := range steps {
		n := len(m.events)
		m.update(at.Add(time.Duration(i)*time.Second), s.apps)
		var got []string
		for _, e := range m.events[n:] {
			got = append(got, e[len("10:00:00 "):])
		}
		if !slices.Equal(got, s.want) {
			t.Errorf("step %d: events %q, want %q", i, got, s.want)
		}
		if h := m.hist[monitKey{"web", 0}]; i == 2 && !slices.Equal(h, []float64{5, 5, 1}) {
			t.Errorf("worker 0's CPU history after 3 polls: %v", h)
		}
	}
	// The dispatcher went away and came back: its workers start afresh.
	if h := m.hist[monitKey{"web", 0}]; len(h) != 1 || h[0] != 0 {
		t.Errorf("worker 0's history %v", h)
	}
	if _, ok := m.hist[monitKey{"web", 2}]; ok {
		t.Error("the history of a slot that went away stays")
	}
	// During a replacement the candidate (listed after the retiring
	// worker of the same index) is the slot's current one.
	old, cand := w(0, 5, 1, 0, 0), w(0, 6, 1, 0, 0)
	old.Started, cand.Started = at, at.Add(time.Second)
	for _, order := range [][]control.Worker{{old, cand}, {cand, old}} {
		if c := current(st(1, 1, append(order, w(1, 7, 1, 0, 0))...)); len(c) != 2 || c[0].PID != 6 {
			t.Errorf("current of %v: %+v", order, c)
		}
	}
}

func TestSparkline(t *testing.T) {
	if got := sparkline([]float64{0, 5, 10, 100}, 6); got != "  ▁▁▁█" {
		t.Errorf("sparkline = %q", got)
	}
	if got := sparkline([]float64{0, 5, 10}, 3); got != "▁▄█" {
		t.Errorf("idle scale: %q", got)
	}
	if got := sparkline(nil, 2); got != strings.Repeat(" ", 2) {
		t.Errorf("empty: %q", got)
	}
}
