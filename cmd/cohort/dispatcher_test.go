package main

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testtool"
)

var controlRE = regexp.MustCompile(`control socket: (\S+)`)

// TestControlRealDispatcher: status, scale and dispatch-reload against
// the dispatcher of `cohort run`, through the control socket it prints.
func TestControlRealDispatcher(t *testing.T) {
	py := testtool.Need(t, "python3")
	script := filepath.Join("..", "..", "examples", "python", "shared_worker.py")
	_, stderr, _ := startCohortRun(t, "--listen", "http=127.0.0.1:0", "--workers", "2", "--ready", "notify", "--name", "py", "--", py, script)
	waitListening(t, stderr, "all 2 workers ready")
	m := controlRE.FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("cohort run did not print its control socket:\n%s", stderr)
	}
	sock := m[1]

	code, out, errOut := runCohort(t, nil, "status", "--socket", sock)
	if code != 0 || !strings.HasPrefix(out, "py: 2/2 workers ready · gen 1 · shared · 0 restarts\n") || !regexp.MustCompile(`(?m)^1\s+\d+\s+1\s+ready\s`).MatchString(out) {
		t.Fatalf("status: %d %s\n%s", code, errOut, out)
	}
	status := func() control.Status {
		t.Helper()
		code, out, errOut := runCohort(t, nil, "status", "--json", "--socket", sock)
		var st control.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("status --json: %d %s\n%s", code, errOut, out)
		}
		return st
	}
	if st := status(); len(st.Workers) != 2 || st.Workers[0].RSS == 0 || st.Workers[0].Status != "serving" {
		t.Errorf("status --json: %+v", st)
	}

	for _, n := range []int{3, 1} {
		if code, out, errOut := runCohort(t, nil, "scale", "--socket", sock, "py", strconv.Itoa(n)); code != 0 {
			t.Fatalf("scale %d: %d %s %s", n, code, out, errOut)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			st := status()
			ready := 0
			for _, w := range st.Workers {
				if w.State == "ready" {
					ready++
				}
			}
			if len(st.Workers) == n && ready == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after scale %d: %+v", n, st.Workers)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// dispatch-reload validates the file it is given and records it
	// (here it is not the one `cohort run` reloads from: that has none).
	file := writeApp(t, t.TempDir(), "py.toml", goodApp)
	runDir := t.TempDir()
	if code, out, errOut := runCohort(t, nil, "dispatch-reload", "--socket", sock, "--running-dir", runDir, file); code != 0 || !strings.HasPrefix(out, "reloaded in ") {
		t.Fatalf("dispatch-reload: %d %s %s", code, out, errOut)
	}
	if st := status(); st.Generation != 2 || len(st.Workers) != 1 || st.Workers[0].Generation != 2 {
		t.Errorf("after dispatch-reload: %+v", st)
	}
}
