package vmtests

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rpWorkerPy is the reuseport scenario's worker: plain Python that serves
// fd 3 one connection at a time and can kill itself between two
// connections (see the file).
//
//go:embed testdata/rpworker.py
var rpWorkerPy []byte

const (
	rpWorkerPath = "/usr/local/lib/cohort-vmtest/rpworker.py"
	rpWorkers    = 3
	// rpClients is the concurrency of the reuseport scenario's loads:
	// enough clients that every socket always has connections queued.
	rpClients = 64
)

// rpStatusJSON is what the reuseport scenario reads of
// `cohort status --json`.
type rpStatusJSON struct {
	Mode       string `json:"mode"`
	Generation int    `json:"generation"`
	Workers    []struct {
		Index      int    `json:"index"`
		PID        int    `json:"pid"`
		Generation int    `json:"generation"`
		State      string `json:"state"`
		Restarts   int    `json:"restarts"`
	} `json:"workers"`
}

// rpApp writes the app file of a reuseport app running rpworker.py, with
// workers (a number or "\"auto\"") workers on 127.0.0.1:port.
func rpApp(t *testing.T, c *Container, app, workers string, port int) {
	t.Helper()
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = ["/usr/bin/python3", %q, "/run/cohort/%s"]
mode = "reuseport"
workers = %s
ready = "notify"
ready_timeout = "20s"
stop_timeout = "10s"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, rpWorkerPath, app, workers, port)), 0o644)
}

// removeApp stops every unit of app, removes its file and has systemd
// forget the units, so that the later scenarios run on a quiet system.
func removeApp(t *testing.T, c *Container, app string) {
	t.Helper()
	c.Exec(t, "sh", "-c", fmt.Sprintf("systemctl stop %[1]s.service %[1]s.socket '%[1]s-*.socket'; rm -f /etc/cohort/%[1]s.toml; systemctl daemon-reload", app))
}

// rpStatus is `cohort status --json app`, or an error, for polling.
func rpStatus(t *testing.T, c *Container, app string) (rpStatusJSON, error) {
	t.Helper()
	var st rpStatusJSON
	res := c.Exec(t, "cohort", "status", "--json", app)
	if res.Code != 0 {
		return st, fmt.Errorf("cohort status --json %s: %s", app, res)
	}
	if err := json.Unmarshal([]byte(res.Stdout), &st); err != nil {
		return st, fmt.Errorf("cohort status --json %s: %v\n%s", app, err, res.Stdout)
	}
	return st, nil
}

// waitRPReady waits until systemd reports the service active/running and
// the dispatcher n ready workers that also pass check (nil: any), and
// returns the status.
func waitRPReady(t *testing.T, c *Container, app string, n int, timeout time.Duration, check func(rpStatusJSON) error) rpStatusJSON {
	t.Helper()
	var st rpStatusJSON
	Eventually(t, timeout, fmt.Sprintf("%s: %d workers ready", app, n), func() error {
		if state := c.Property(t, app+".service", "ActiveState") + "/" + c.Property(t, app+".service", "SubState"); state != "active/running" {
			return fmt.Errorf("%s.service is %s", app, state)
		}
		var err error
		if st, err = rpStatus(t, c, app); err != nil {
			return err
		}
		ready := 0
		for _, w := range st.Workers {
			if w.State == "ready" && w.PID > 0 {
				ready++
			}
		}
		if ready != n || len(st.Workers) != n {
			return fmt.Errorf("%d of %d workers ready: %+v", ready, n, st.Workers)
		}
		if check != nil {
			return check(st)
		}
		return nil
	})
	return st
}

// listenInodes are the inodes of the TCP sockets listening on port, as
// the kernel reports them (`ss -ltne`); port 0: on every port.
func listenInodes(t *testing.T, c *Container, port int) []uint64 {
	t.Helper()
	args := []string{"ss", "-Hltne"}
	if port != 0 {
		args = append(args, fmt.Sprintf("sport = :%d", port))
	}
	out := c.Run(t, args...)
	var inodes []uint64
	ino := regexp.MustCompile(`\bino:(\d+)\b`)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		m := ino.FindStringSubmatch(line)
		if !strings.HasPrefix(line, "LISTEN") || m == nil {
			t.Fatalf("%s: unexpected line %q", strings.Join(args, " "), line)
		}
		n, _ := strconv.ParseUint(m[1], 10, 64)
		inodes = append(inodes, n)
	}
	return inodes
}

// socketFDs maps the fds of pid that are sockets to their inodes, as
// /proc/PID/fd shows them ("socket:[1234]").
func socketFDs(t *testing.T, c *Container, pid int) map[int]uint64 {
	t.Helper()
	out := c.Sh(t, fmt.Sprintf(`cd /proc/%d/fd && for f in *; do printf '%%s %%s\n' "$f" "$(readlink "$f")"; done`, pid))
	fds := map[int]uint64{}
	sock := regexp.MustCompile(`^(\d+) socket:\[(\d+)\]$`)
	for _, line := range strings.Split(out, "\n") {
		if m := sock.FindStringSubmatch(line); m != nil {
			fd, _ := strconv.Atoi(m[1])
			ino, _ := strconv.ParseUint(m[2], 10, 64)
			fds[fd] = ino
		}
	}
	return fds
}

// environ is the environment pid started with (/proc/PID/environ).
func environ(t *testing.T, c *Container, pid int) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, kv := range strings.Split(c.Run(t, "cat", fmt.Sprintf("/proc/%d/environ", pid)), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

// testReusePort: an app in reuseport mode under systemd. The generator
// emits one ReusePort=yes socket unit per worker, systemd binds all of
// them to one address, and each worker gets exactly its own socket as
// fd 3, by the standard protocol; the kernel spreads new connections over
// the sockets. A worker that dies leaves its socket to the dispatcher (and
// systemd), so the connections queued in it wait for the replacement
// instead of being reset; a rolling reload drops nothing either. The
// worker count is fixed by the sockets (scale is refused, a changed file
// warns until the sockets are recreated), and workers = "auto" is counted
// by the generator. The worker is rpworker.py: plain Python, serving one
// connection at a time.
func testReusePort(t *testing.T, c *Container) {
	const app = "rp"
	sockets := rpSocketUnits(app, rpWorkers)
	c.WriteFile(t, rpWorkerPath, rpWorkerPy, 0o755)
	port := FreePort(t)
	rpApp(t, c, app, strconv.Itoa(rpWorkers), port)
	// Registered before Watch, so that it runs after the diagnostics.
	t.Cleanup(func() { removeApp(t, c, app) })
	c.Watch(t, append(sockets, app+".service")...)
	c.Run(t, "systemctl", "daemon-reload")
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)

	var inodes []uint64 // the listening sockets on port, from ss
	ok := t.Run("units", func(t *testing.T) {
		inodes = rpCheckUnits(t, c, app, sockets, port)
	})
	ok = ok && t.Run("activation", func(t *testing.T) {
		// The first connection starts the service; systemd holds it in
		// whichever socket the kernel chose until that slot's worker
		// accepts it.
		if _, failed, first := spreadRequests(url, 1, 1); failed > 0 {
			t.Fatalf("first request through %s: %v", app, first)
		}
		st := waitRPReady(t, c, app, rpWorkers, 20*time.Second, nil)
		if st.Mode != "reuseport" || st.Generation != 1 {
			t.Errorf("cohort status --json %s: mode %q, generation %d; want reuseport, 1", app, st.Mode, st.Generation)
		}
		for i, w := range st.Workers {
			if w.Index != i {
				t.Errorf("cohort status --json %s: worker %d has index %d", app, i, w.Index)
			}
		}
	})
	ok = ok && t.Run("fds", func(t *testing.T) { rpCheckFDs(t, c, app, inodes) })
	if !ok {
		return // the rest needs a running app whose workers own their sockets
	}
	t.Run("fairness", func(t *testing.T) {
		const n = 3000
		start := time.Now()
		counts, failed, first := spreadRequests(url, n, rpClients)
		took := time.Since(start)
		var lo, hi int
		for i := range rpWorkers {
			k := counts[strconv.Itoa(i)]
			if i == 0 || k < lo {
				lo = k
			}
			hi = max(hi, k)
		}
		spread := float64(hi) / float64(max(lo, 1))
		t.Logf("%d requests, new connection each, %d clients, in %v: per worker %v, max/min %.3f", n, rpClients, took.Round(time.Millisecond), counts, spread)
		if failed > 0 {
			t.Errorf("%d of %d requests failed, first: %v", failed, n, first)
		}
		if len(counts) != rpWorkers || lo == 0 || spread > 1.5 {
			t.Errorf("answers per worker %v; want all %d workers, max/min ≤ 1.5", counts, rpWorkers)
		}
	})
	t.Run("killworker", func(t *testing.T) { rpKillWorker(t, c, app, port) })
	t.Run("selfkill", func(t *testing.T) { rpSelfKill(t, c, app, url) })
	t.Run("reload", func(t *testing.T) { rpReload(t, c, app, url) })
	t.Run("scale", func(t *testing.T) {
		res := c.Exec(t, "cohort", "scale", app, "4")
		t.Logf("cohort scale %s 4: exit %d: %s", app, res.Code, strings.TrimSpace(res.Stderr+res.Stdout))
		if res.Code == 0 {
			t.Errorf("cohort scale %s 4 succeeded in reuseport mode: %s", app, res)
		}
		if st, err := rpStatus(t, c, app); err != nil || len(st.Workers) != rpWorkers {
			t.Errorf("after cohort scale: %+v (%v); want %d workers", st, err, rpWorkers)
		}
	})

	t.Run("recount", func(t *testing.T) { rpRecount(t, c, app, port) })

	removeApp(t, c, app)
	for _, u := range append(rpSocketUnits(app, rpWorkers+1), app+".service") {
		if got := c.Property(t, u, "LoadState"); got != "not-found" {
			t.Errorf("%s: LoadState=%s after the app file was removed; want not-found", u, got)
		}
	}
	if left := listenInodes(t, c, port); len(left) != 0 {
		t.Errorf("%d sockets still listen on port %d after the app was removed", len(left), port)
	}
	t.Run("auto", func(t *testing.T) { rpAuto(t, c) })
}

// rpAuto: workers = "auto" in reuseport mode is counted by the
// generator, which must emit one socket per CPU the service will run on
// (the CPUs of the container's systemd), and the dispatcher runs one
// worker per socket.
func rpAuto(t *testing.T, c *Container) {
	const app = "rpauto"
	c.WriteFile(t, rpWorkerPath, rpWorkerPy, 0o755)
	port := FreePort(t)
	rpApp(t, c, app, `"auto"`, port)
	t.Cleanup(func() { removeApp(t, c, app) })
	c.Watch(t, app+".socket", app+".service")
	c.Run(t, "systemctl", "daemon-reload")

	// What a service sees (systemd-run under the container's PID 1),
	// and what a command run from outside sees; they should agree.
	nproc, _ := strconv.Atoi(strings.TrimSpace(c.Run(t, "nproc")))
	svcNproc, _ := strconv.Atoi(strings.TrimSpace(c.Run(t, "systemd-run", "--quiet", "--wait", "--pipe", "nproc")))
	if nproc < 1 || svcNproc != nproc {
		t.Errorf("nproc %d inside the container, %d in a service; want equal", nproc, svcNproc)
	}
	files := strings.Fields(c.Run(t, "sh", "-c", fmt.Sprintf("cd /run/systemd/generator && ls %[1]s.socket %[1]s-*.socket", app)))
	t.Logf("nproc %d; generated: %v", svcNproc, files)
	if len(files) != svcNproc {
		t.Fatalf("%d socket units for workers = \"auto\" on %d CPUs: %v", len(files), svcNproc, files)
	}
	var requires []string
	for _, u := range strings.Fields(c.Property(t, app+".service", "Requires")) {
		if strings.HasSuffix(u, ".socket") && (strings.HasPrefix(u, app+".") || strings.HasPrefix(u, app+"-")) {
			requires = append(requires, u)
		}
	}
	sort.Strings(files)
	if sort.Strings(requires); !slices.Equal(requires, files) {
		t.Errorf("%s.service Requires= sockets %v; want %v", app, requires, files)
	}
	c.Run(t, "systemctl", "start", app+".socket", app+".service")
	st := waitRPReady(t, c, app, svcNproc, 20*time.Second, nil)
	if n := len(listenInodes(t, c, port)); n != svcNproc {
		t.Errorf("%d sockets listen on port %d; want %d", n, port, svcNproc)
	}
	t.Logf("%d workers: %+v", len(st.Workers), st.Workers)
}

// rpSocketUnits names the socket units of a reuseport app with one
// listener "http" and n workers.
func rpSocketUnits(app string, n int) []string {
	units := []string{app + ".socket"}
	for i := 1; i < n; i++ {
		units = append(units, fmt.Sprintf("%s-http-%d.socket", app, i))
	}
	return units
}

// rpRecount: a changed worker count in the file cannot be applied by a
// reload or a restart of the service, since systemd binds one socket per
// worker: both keep the 3 workers and say so in the journal. The way the
// warning gives (stop the sockets and the service, daemon-reload, start
// the sockets) then brings up 4 sockets and 4 workers.
func rpRecount(t *testing.T, c *Container, app string, port int) {
	rpApp(t, c, app, strconv.Itoa(rpWorkers+1), port)
	before, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	res := c.Exec(t, "systemctl", "reload", app)
	if res.Code != 0 {
		t.Errorf("systemctl reload %s with workers = %d: %s", app, rpWorkers+1, res)
	}
	line := c.WaitJournal(t, 10*time.Second, fmt.Sprintf("workers changed to %d, but reuseport mode runs one worker per socket set, and there are %d: keeping %d workers", rpWorkers+1, rpWorkers, rpWorkers), "-u", app+".service")
	t.Logf("reload: %s", line)
	waitRPReady(t, c, app, rpWorkers, 20*time.Second, func(st rpStatusJSON) error {
		if st.Generation != before.Generation+1 {
			return fmt.Errorf("generation %d; want %d", st.Generation, before.Generation+1)
		}
		return nil
	})

	// systemctl warns that the app file changed on disk (it is the
	// units' SourcePath=): that is the point here.
	res = c.Exec(t, "systemctl", "restart", app+".service")
	t.Logf("systemctl restart %s.service: exit %d %s", app, res.Code, strings.TrimSpace(res.Stderr))
	if res.Code != 0 {
		t.Fatalf("systemctl restart %s.service: %s", app, res)
	}
	line = c.WaitJournal(t, 10*time.Second, fmt.Sprintf("workers = %d means %d workers here, but there are %d reuseport socket sets: running %d", rpWorkers+1, rpWorkers+1, rpWorkers, rpWorkers), "-u", app+".service")
	t.Logf("restart: %s", line)
	waitRPReady(t, c, app, rpWorkers, 20*time.Second, nil)

	// The way out the message names.
	c.Run(t, "systemctl", "stop", app+".socket", app)
	for _, u := range rpSocketUnits(app, rpWorkers) {
		if state := c.Property(t, u, "ActiveState"); state != "inactive" {
			t.Errorf("%s is %s after systemctl stop %s.socket %s; want inactive (PartOf=)", u, state, app, app)
		}
	}
	if n := len(listenInodes(t, c, port)); n != 0 {
		t.Errorf("%d sockets listen on port %d after systemctl stop; want 0", n, port)
	}
	c.Run(t, "systemctl", "daemon-reload")
	sockets := rpSocketUnits(app, rpWorkers+1)
	c.Run(t, "systemctl", "start", app+".socket")
	for _, u := range sockets {
		if state := c.Property(t, u, "ActiveState") + "/" + c.Property(t, u, "SubState"); state != "active/listening" {
			t.Errorf("%s is %s; want active/listening", u, state)
		}
	}
	inodes := listenInodes(t, c, port)
	if len(inodes) != len(sockets) {
		t.Fatalf("%d sockets listen on port %d; want %d", len(inodes), port, len(sockets))
	}
	if _, failed, first := spreadRequests(fmt.Sprintf("http://127.0.0.1:%d/", port), 1, 1); failed > 0 {
		t.Fatalf("first request after the recount: %v", first)
	}
	waitRPReady(t, c, app, len(sockets), 20*time.Second, nil)
	rpCheckFDs(t, c, app, inodes)
}

// rpCheckUnits checks what systemd loaded for the app and, after
// `systemctl start <app>.socket`, what it and the kernel listen on. It
// returns the inodes of the listening sockets.
func rpCheckUnits(t *testing.T, c *Container, app string, sockets []string, port int) []uint64 {
	listen := fmt.Sprintf("127.0.0.1:%d (Stream)", port)
	files := strings.Fields(c.Run(t, "sh", "-c", fmt.Sprintf("cd /run/systemd/generator && ls %[1]s.socket %[1]s-*.socket", app)))
	sort.Strings(files)
	if want := slices.Sorted(slices.Values(sockets)); !slices.Equal(files, want) {
		t.Errorf("generated socket units %v; want %v", files, want)
	}
	paths := []string{c.Property(t, app+".service", "FragmentPath")}
	for i, u := range sockets {
		props := map[string]string{}
		for _, l := range strings.Split(c.Run(t, "systemctl", "show", u,
			"-p", "LoadState,ActiveState,Listen,ReusePort,FileDescriptorName,Triggers,PartOf,Wants,FragmentPath"), "\n") {
			if k, v, ok := strings.Cut(l, "="); ok {
				props[k] = v
			}
		}
		t.Logf("%s: %v", u, props)
		paths = append(paths, props["FragmentPath"])
		want := map[string]string{
			"LoadState":          "loaded",
			"ActiveState":        "inactive",
			"Listen":             listen,
			"ReusePort":          "yes",
			"FileDescriptorName": fmt.Sprintf("http.%d", i),
			"Triggers":           app + ".service",
		}
		for k, v := range want {
			if props[k] != v {
				t.Errorf("%s: %s=%q; want %q", u, k, props[k], v)
			}
		}
		if i == 0 {
			for _, other := range sockets[1:] {
				if !slices.Contains(strings.Fields(props["Wants"]), other) {
					t.Errorf("%s: Wants=%q lacks %s", u, props["Wants"], other)
				}
			}
		} else if props["PartOf"] != sockets[0] {
			t.Errorf("%s: PartOf=%q; want %s", u, props["PartOf"], sockets[0])
		}
	}
	for _, p := range []string{"Requires", "After", "TriggeredBy"} {
		got := strings.Fields(c.Property(t, app+".service", p))
		for _, u := range sockets {
			if !slices.Contains(got, u) {
				t.Errorf("%s.service: %s=%v lacks %s", app, p, got, u)
			}
		}
	}
	if res := c.Exec(t, append([]string{"systemd-analyze", "verify", "--man=no"}, paths...)...); res.Code != 0 || strings.TrimSpace(res.Stderr) != "" {
		t.Errorf("systemd-analyze verify %s: %s", strings.Join(paths, " "), res)
	}

	// Starting the first socket starts them all (Wants=); the service
	// waits for a connection.
	c.Run(t, "systemctl", "start", sockets[0])
	for _, u := range sockets {
		if state := c.Property(t, u, "ActiveState") + "/" + c.Property(t, u, "SubState"); state != "active/listening" {
			t.Errorf("%s is %s after systemctl start %s; want active/listening", u, state, sockets[0])
		}
	}
	if got := c.Property(t, app+".service", "ActiveState"); got != "inactive" {
		t.Errorf("%s.service is %s before the first connection; want inactive", app, got)
	}
	inodes := listenInodes(t, c, port)
	t.Logf("ss -ltne sport = :%d: %d listening sockets, inodes %v", port, len(inodes), inodes)
	if len(inodes) != len(sockets) {
		t.Fatalf("%d sockets listen on port %d; want %d", len(inodes), port, len(sockets))
	}
	return inodes
}

// rpCheckFDs checks that each worker has exactly its own slot's socket as
// fd 3 and the environment of the socket-activation protocol, and that the
// dispatcher holds every socket.
func rpCheckFDs(t *testing.T, c *Container, app string, inodes []uint64) {
	st, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	listening := map[uint64]bool{}
	for _, ino := range listenInodes(t, c, 0) {
		listening[ino] = true
	}

	// The dispatcher got the sockets from systemd at fds 3.. named by
	// LISTEN_FDNAMES ("http.0:http.1:http.2" in some order): slot i's
	// socket is the one named http.i.
	dispatcher := mainPID(t, c, app)
	denv := environ(t, c, dispatcher)
	dfds := socketFDs(t, c, dispatcher)
	names := strings.Split(denv["LISTEN_FDNAMES"], ":")
	t.Logf("dispatcher (pid %d): LISTEN_FDS=%s LISTEN_FDNAMES=%s, socket fds %v", dispatcher, denv["LISTEN_FDS"], denv["LISTEN_FDNAMES"], dfds)
	slotInode := map[string]uint64{}
	for k, name := range names {
		slotInode[name] = dfds[3+k]
	}
	for _, ino := range inodes {
		if !slices.Contains(slices.Collect(maps.Values(dfds)), ino) {
			t.Errorf("the dispatcher (pid %d) does not hold listening socket %d", dispatcher, ino)
		}
	}

	seen := map[uint64]int{}
	for _, w := range st.Workers {
		fds := socketFDs(t, c, w.PID)
		env := environ(t, c, w.PID)
		ino, want := fds[3], slotInode[fmt.Sprintf("http.%d", w.Index)]
		t.Logf("worker %d (pid %d): fd 3 socket:[%d] (http.%d is %d), LISTEN_FDS=%s LISTEN_FDNAMES=%s LISTEN_PID=%s", w.Index, w.PID, ino, w.Index, want, env["LISTEN_FDS"], env["LISTEN_FDNAMES"], env["LISTEN_PID"])
		if !slices.Contains(inodes, ino) {
			t.Errorf("worker %d (pid %d): fd 3 is socket:[%d], not one of the sockets listening on the port %v", w.Index, w.PID, ino, inodes)
		}
		if ino != want {
			t.Errorf("worker %d (pid %d): fd 3 is socket:[%d]; the dispatcher's http.%d is socket:[%d]", w.Index, w.PID, ino, w.Index, want)
		}
		if prev, dup := seen[ino]; dup {
			t.Errorf("workers %d and %d share socket:[%d]", prev, w.Index, ino)
		}
		seen[ino] = w.Index
		for fd, i := range fds {
			if fd != 3 && listening[i] {
				t.Errorf("worker %d (pid %d): fd %d is listening socket:[%d] too; want only fd 3", w.Index, w.PID, fd, i)
			}
		}
		want3 := map[string]string{"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "LISTEN_PID": strconv.Itoa(w.PID)}
		for k, v := range want3 {
			if env[k] != v {
				t.Errorf("worker %d (pid %d): %s=%q; want %q", w.Index, w.PID, k, env[k], v)
			}
		}
	}
	if len(seen) != len(inodes) {
		t.Errorf("the workers hold %d distinct sockets; want %d", len(seen), len(inodes))
	}
}

// rpKillWorker: worker 1 killed with SIGKILL from outside, under the
// life-cycle scenarios' load (8 clients): the dispatcher starts a new one
// on the same socket, nothing is refused, nothing times out, and at most
// what the worker had accepted is lost (rpworker.py holds at most one
// connection, checkLoss allows one per client).
func rpKillWorker(t *testing.T, c *Container, app string, port int) {
	const slot = 1
	before, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	dispatcher := mainPID(t, c, app)
	victim := before.Workers[slot]

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)
	killed := time.Now()
	c.Run(t, "kill", "-9", strconv.Itoa(victim.PID))
	var replaced time.Duration
	after := waitRPReady(t, c, app, rpWorkers, 20*time.Second, func(st rpStatusJSON) error {
		if w := st.Workers[slot]; w.PID == victim.PID {
			return fmt.Errorf("worker %d still has pid %d", slot, w.PID)
		}
		replaced = time.Since(killed)
		return nil
	})
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("worker %d (pid %d) killed with SIGKILL; pid %d ready in its slot within %v", slot, victim.PID, after.Workers[slot].PID, replaced.Round(time.Millisecond))
	checkLoss(t, "load through the worker's SIGKILL", 1, res, kinds)
	// Tighter than checkLoss: rpworker.py holds one connection at most,
	// and the ones queued in its socket wait for the replacement.
	if lost := kinds.Reset + kinds.Closed; lost > 1 {
		t.Errorf("%d requests reset or closed; rpworker.py had at most 1 in flight", lost)
	}
	if w := after.Workers[slot]; w.Restarts != victim.Restarts+1 {
		t.Errorf("worker %d after the kill: %+v; want restarts %d", slot, w, victim.Restarts+1)
	}
	for i, w := range after.Workers {
		if i != slot && w.PID != before.Workers[i].PID {
			t.Errorf("worker %d changed from pid %d to %d; only worker %d was killed", i, before.Workers[i].PID, w.PID, slot)
		}
	}
	if got := mainPID(t, c, app); got != dispatcher {
		t.Errorf("MainPID %d → %d: systemd restarted the service for a worker's death", dispatcher, got)
	}
	c.WaitJournal(t, 10*time.Second, fmt.Sprintf("worker %d (pid %d) was killed by signal 9", slot, victim.PID), "-u", app+".service")
}

// rpSelfKill: worker 2 kills itself with SIGKILL right after it has closed
// a connection, under a load of rpClients clients. It holds no connection
// then, and its socket stays open in the dispatcher, so the connections
// that the kernel keeps hashing to that socket wait in its queue until the
// replacement accepts them: not one request may fail, of any kind.
func rpSelfKill(t *testing.T, c *Container, app, url string) {
	const slot = 2
	before, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	victim := before.Workers[slot]
	load := startAnswerLoad(t, LoadOptions{URL: url, Requests: 200000, Duration: 60 * time.Second, Concurrency: rpClients, Timeout: 15 * time.Second})
	load.WaitOK(t, 500, 30*time.Second)

	// Atomically (rename), so that the worker never reads half a file.
	trigger := fmt.Sprintf("/run/cohort/%s/kill-%d", app, slot)
	armed := time.Now()
	c.Sh(t, fmt.Sprintf("printf 20 > %[1]s.tmp && mv %[1]s.tmp %[1]s", trigger))
	var replaced time.Duration
	after := waitRPReady(t, c, app, rpWorkers, 20*time.Second, func(st rpStatusJSON) error {
		if w := st.Workers[slot]; w.PID == victim.PID {
			return fmt.Errorf("worker %d still has pid %d", slot, w.PID)
		}
		replaced = time.Since(armed)
		return nil
	})
	newPID := after.Workers[slot].PID
	Eventually(t, 20*time.Second, fmt.Sprintf("answers from worker %d's new pid %d", slot, newPID), func() error {
		if n := load.ByPID()[newPID]; n < 100 {
			return fmt.Errorf("%d answers from pid %d", n, newPID)
		}
		return nil
	})
	res, kinds := load.Stop()
	byPID := load.ByPID()
	t.Logf("load: %v; failures: %v", res, kinds)
	t.Logf("worker %d: pid %d answered %d, killed itself (trigger written %v before pid %d was ready in its slot), which answered %d",
		slot, victim.PID, byPID[victim.PID], replaced.Round(time.Millisecond), newPID, byPID[newPID])
	if res.OK == 0 || res.Failed() != 0 || kinds != (FailureKinds{}) {
		t.Errorf("load through worker %d's SIGKILL between two connections: %v (%v); want 0 failures of any kind", slot, res, kinds)
	}
	if byPID[victim.PID] == 0 || byPID[newPID] == 0 {
		t.Errorf("answers by pid %v; want answers from the killed pid %d and from its replacement %d", byPID, victim.PID, newPID)
	}
	for i, w := range after.Workers {
		if i != slot && w.PID != before.Workers[i].PID {
			t.Errorf("worker %d changed from pid %d to %d; only worker %d died", i, before.Workers[i].PID, w.PID, slot)
		}
	}
	if res := c.Exec(t, "test", "-e", trigger); res.Code == 0 {
		t.Errorf("%s still exists: the worker did not take the trigger", trigger)
	}
	c.WaitJournal(t, 10*time.Second, fmt.Sprintf("rpworker: worker %d (pid %d, gen 1) killing itself with SIGKILL", slot, victim.PID), "-u", app+".service")
	c.WaitJournal(t, 10*time.Second, fmt.Sprintf("worker %d (pid %d) was killed by signal 9", slot, victim.PID), "-u", app+".service")
	// The replacement found the connections that had queued up in the
	// socket while the slot had no worker.
	line := c.WaitJournal(t, 10*time.Second, fmt.Sprintf("rpworker: worker %d (pid %d, gen 1) ready on fd 3", slot, newPID), "-u", app+".service")
	waiting := -1
	if m := regexp.MustCompile(`ready on fd 3, (\d+) connections waiting`).FindStringSubmatch(line); m != nil {
		waiting, _ = strconv.Atoi(m[1])
	}
	t.Logf("pid %d started with %d connections waiting in worker %d's socket", newPID, waiting, slot)
	if waiting < 1 {
		t.Errorf("the replacement found no connection waiting in its socket: %q", line)
	}
}

// rpReload: `systemctl reload` under load replaces every worker, one slot
// at a time, each new worker on its slot's socket; not one request fails.
func rpReload(t *testing.T, c *Container, app, url string) {
	before, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	load := startAnswerLoad(t, LoadOptions{URL: url, Requests: 200000, Duration: 60 * time.Second, Concurrency: rpClients, Timeout: 15 * time.Second})
	load.WaitOK(t, 500, 30*time.Second)
	start := time.Now()
	res := c.Exec(t, "systemctl", "reload", app)
	took := time.Since(start)
	load.WaitOK(t, 500, 30*time.Second)
	ld, kinds := load.Stop()
	t.Logf("systemctl reload %s: exit %d after %v", app, res.Code, took.Round(time.Millisecond))
	t.Logf("load through the reload: %v; failures: %v", ld, kinds)
	if res.Code != 0 {
		t.Errorf("systemctl reload %s: %s", app, res)
	}
	if ld.OK == 0 || ld.Failed() != 0 || kinds != (FailureKinds{}) {
		t.Errorf("load through the reload: %v (%v); want 0 failures", ld, kinds)
	}
	after, err := rpStatus(t, c, app)
	if err != nil {
		t.Fatal(err)
	}
	if after.Generation != before.Generation+1 || len(after.Workers) != rpWorkers {
		t.Errorf("after the reload: %+v; want generation %d, %d workers", after, before.Generation+1, rpWorkers)
	}
	answered := map[int]int{} // by worker, from the new generation
	for a, n := range load.Answers() {
		if a.Gen == after.Generation {
			answered[a.Worker] += n
		}
	}
	for i, w := range after.Workers {
		if w.Generation != after.Generation || w.State != "ready" || w.PID == before.Workers[i].PID {
			t.Errorf("worker %d after the reload: %+v (before: pid %d)", i, w, before.Workers[i].PID)
		}
		if answered[i] == 0 {
			t.Errorf("worker %d of generation %d answered nothing during the load: %v", i, after.Generation, load.Answers())
		}
	}
	t.Logf("answers of generation %d by worker: %v", after.Generation, answered)
	if state := c.Property(t, app+".service", "ActiveState") + "/" + c.Property(t, app+".service", "SubState"); state != "active/running" {
		t.Errorf("%s.service is %s after the reload", app, state)
	}
}

// helloAnswer is what an answer "hello from worker 2 (pid 123, gen 1)"
// says.
type helloAnswer struct{ Worker, PID, Gen int }

// answerLoad is a BackgroundLoad (new connection per request) that also
// counts the answers by worker, pid and generation, from their bodies.
type answerLoad struct {
	*BackgroundLoad
	mu      sync.Mutex
	answers map[helloAnswer]int
}

// startAnswerLoad starts a bounded load like StartLoad (opts.KeepAlive is
// ignored: every request is a new connection) that stops at its bounds, at
// Stop, or when t ends. A 2xx answer that names no worker counts as a
// failure of kind other.
func startAnswerLoad(t testing.TB, opts LoadOptions) *answerLoad {
	t.Helper()
	if err := checkLoopback(opts.URL); err != nil {
		t.Fatal(err)
	}
	if opts.Requests <= 0 || opts.Duration <= 0 || opts.Concurrency <= 0 || opts.Timeout <= 0 {
		t.Fatal("load: Requests, Duration, Concurrency and Timeout must be positive (the load is bounded)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), opts.Duration)
	l := &answerLoad{
		BackgroundLoad: &BackgroundLoad{opts: opts, cancel: cancel, done: make(chan struct{}), res: LoadResult{Status: map[int]int{}}},
		answers:        map[helloAnswer]int{},
	}
	t.Cleanup(func() { l.Stop() })
	transport := &http.Transport{
		Proxy:             nil,
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{Timeout: opts.Timeout}).DialContext,
	}
	client := &http.Client{Transport: transport, Timeout: opts.Timeout}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range opts.Concurrency {
		wg.Go(func() {
			for ctx.Err() == nil && next.Add(1) <= int64(opts.Requests) {
				a, code, err := getAnswer(ctx, client, opts.URL)
				if ctx.Err() != nil && err != nil {
					return // cut off by Stop or the time bound
				}
				if err == nil && code/100 == 2 {
					l.mu.Lock()
					l.answers[a]++
					l.mu.Unlock()
				}
				l.record(code, err)
			}
		})
	}
	go func() {
		wg.Wait()
		transport.CloseIdleConnections()
		l.BackgroundLoad.mu.Lock()
		l.res.Elapsed = time.Since(start)
		l.BackgroundLoad.mu.Unlock()
		close(l.done)
	}()
	return l
}

// getAnswer fetches url and parses a 2xx answer's body.
func getAnswer(ctx context.Context, client *http.Client, url string) (helloAnswer, int, error) {
	var a helloAnswer
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return a, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return a, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return a, 0, fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		return a, resp.StatusCode, nil
	}
	if _, err := fmt.Sscanf(string(b), "hello from worker %d (pid %d, gen %d)", &a.Worker, &a.PID, &a.Gen); err != nil {
		return a, resp.StatusCode, errors.New("answer names no worker: " + strconv.Quote(string(b)))
	}
	return a, resp.StatusCode, nil
}

// Answers is a copy of the counts so far.
func (l *answerLoad) Answers() map[helloAnswer]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[helloAnswer]int, len(l.answers))
	for a, n := range l.answers {
		out[a] = n
	}
	return out
}

// ByPID is the answers so far by worker pid.
func (l *answerLoad) ByPID() map[int]int {
	out := map[int]int{}
	for a, n := range l.Answers() {
		out[a.PID] += n
	}
	return out
}
