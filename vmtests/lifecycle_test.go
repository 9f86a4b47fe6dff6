package vmtests

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The life-cycle scenarios run the Go example (ready = "notify", so
// "ready" is the worker's own word) as 2 shared-mode workers, each under an
// app of its own, and act on it under a bounded load of new connections
// from 8 clients.
const (
	lifeWorkers     = 2
	lifeConcurrency = 8
)

// lifeLoad is the load the life-cycle scenarios run through their event.
func lifeLoad(port int) LoadOptions {
	return LoadOptions{
		URL:      fmt.Sprintf("http://127.0.0.1:%d/", port),
		Requests: 200000, Duration: 90 * time.Second,
		Concurrency: lifeConcurrency, Timeout: 15 * time.Second,
	}
}

// installHello copies the Go example (examples/hello, built once) into
// the container at path.
func installHello(t *testing.T, c *Container, path string) {
	t.Helper()
	bin, err := helloBin()
	if err != nil {
		t.Fatal(err)
	}
	c.WriteFile(t, path, bin, 0o755)
}

// lifeSettings are the readiness and timeouts of the scenarios' apps.
const lifeSettings = `ready = "notify"
ready_timeout = "20s"
stop_timeout = "10s"
`

// appFile is an app file of the scenarios: command (a TOML array), workers
// on line 2, then settings (whole lines), then one [[listen]] "http" on
// 127.0.0.1:port.
func appFile(command string, workers int, settings string, port int) string {
	return fmt.Sprintf("command = %s\nworkers = %d\n%s\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:%d\"\n",
		command, workers, settings, port)
}

// startApp writes the app file of app, runs daemon-reload and starts its
// socket and service.
func startApp(t *testing.T, c *Container, app, file string) {
	t.Helper()
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(file), 0o644)
	c.Run(t, "systemctl", "daemon-reload")
	c.Run(t, "systemctl", "start", app+".socket", app+".service")
}

// startHelloApp installs the Go example as app with lifeWorkers workers
// at worker (a path of its own, so that `ps` can tell this app's workers
// from other scenarios'), starts its socket and service and waits until
// every worker is ready. It returns the port.
func startHelloApp(t *testing.T, c *Container, app, worker string) int {
	t.Helper()
	installHello(t, c, worker)
	port := FreePort(t)
	startApp(t, c, app, appFile(fmt.Sprintf("[%q]", worker), lifeWorkers, lifeSettings, port))
	waitWorkersReady(t, c, app, lifeWorkers, 20*time.Second)
	return port
}

// appStatusJSON is what the life-cycle scenarios read of
// `cohort status --json`.
type appStatusJSON struct {
	Generation int `json:"generation"`
	Workers    []struct {
		Index    int    `json:"index"`
		PID      int    `json:"pid"`
		State    string `json:"state"`
		Restarts int    `json:"restarts"`
	} `json:"workers"`
}

// appStatus is `cohort status --json app`.
func appStatus(t *testing.T, c *Container, app string) appStatusJSON {
	t.Helper()
	var st appStatusJSON
	out := c.Run(t, "cohort", "status", "--json", app)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("cohort status --json %s: %v\n%s", app, err, out)
	}
	return st
}

// waitWorkersReady waits until the dispatcher reports n workers, all
// ready, and systemd reports the service active/running, and returns the
// status.
func waitWorkersReady(t *testing.T, c *Container, app string, n int, timeout time.Duration) appStatusJSON {
	t.Helper()
	var st appStatusJSON
	Eventually(t, timeout, app+": all workers ready", func() error {
		if state := c.Property(t, app+".service", "ActiveState") + "/" + c.Property(t, app+".service", "SubState"); state != "active/running" {
			return fmt.Errorf("%s.service is %s", app, state)
		}
		res := c.Exec(t, "cohort", "status", "--json", app)
		if res.Code != 0 {
			return fmt.Errorf("cohort status: %s", res)
		}
		st = appStatusJSON{}
		if err := json.Unmarshal([]byte(res.Stdout), &st); err != nil {
			return fmt.Errorf("cohort status --json: %v", err)
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
		return nil
	})
	return st
}

// mainPID is systemd's MainPID of the service.
func mainPID(t *testing.T, c *Container, app string) int {
	t.Helper()
	pid, err := strconv.Atoi(c.Property(t, app+".service", "MainPID"))
	if err != nil {
		t.Fatalf("%s.service MainPID: %v", app, err)
	}
	return pid
}

// alive reports whether pid exists in the container and runs cmd (its
// argv[0]), so that a reused pid does not count.
func alive(t *testing.T, c *Container, pid int, cmd string) bool {
	t.Helper()
	res := c.Exec(t, "cat", fmt.Sprintf("/proc/%d/cmdline", pid))
	return res.Code == 0 && strings.HasPrefix(res.Stdout, cmd+"\x00")
}

// checkLoss asserts the figures a SIGKILL of killed processes may cost: no
// connection refused (systemd holds the socket), no timeout, no non-2xx,
// and no more lost requests (reset, or closed before an answer) than the
// killed processes can have had in flight: one per client and process, as
// each client has one request in flight and the processes die one after
// the other.
func checkLoss(t *testing.T, what string, killed int, res LoadResult, kinds FailureKinds) {
	t.Helper()
	t.Logf("%s: %v; failures: %v", what, res, kinds)
	if res.OK == 0 || res.Non2xx != 0 || kinds.Refused != 0 || kinds.Timeout != 0 || kinds.Other != 0 {
		t.Errorf("%s: %v (%v); want 2xx answers, 0 non-2xx, 0 refused, 0 timeouts, 0 other errors", what, res, kinds)
	}
	if lost, bound := kinds.Reset+kinds.Closed, killed*lifeConcurrency; lost > bound {
		t.Errorf("%s: %d requests reset or closed; want at most %d (%d clients × %d killed processes)", what, lost, bound, lifeConcurrency, killed)
	}
}

// testRestart: `systemctl restart` under load loses nothing. systemd keeps
// the listening socket through the restart, the old dispatcher stops its
// workers gracefully (they answer what they accepted), and connections
// that arrive meanwhile wait in the backlog for the new workers.
func testRestart(t *testing.T, c *Container) {
	const app = "life-restart"
	c.Watch(t, app+".socket", app+".service")
	port := startHelloApp(t, c, app, "/usr/local/lib/cohort-vmtest/life-restart-worker")
	before := mainPID(t, c, app)

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)
	start := time.Now()
	c.Run(t, "systemctl", "restart", app)
	took := time.Since(start)
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("systemctl restart %s: %v", app, took.Round(time.Millisecond))
	t.Logf("load through the restart: %v; failures: %v", res, kinds)
	if res.OK == 0 || res.Errors != 0 || res.Non2xx != 0 || kinds.Refused != 0 {
		t.Errorf("load through systemctl restart: %v (%v); want 0 refused, 0 errors, 0 non-2xx", res, kinds)
	}
	if after := mainPID(t, c, app); after == before || after == 0 {
		t.Errorf("MainPID %d → %d: the service was not restarted", before, after)
	}
	if st := appStatus(t, c, app); len(st.Workers) != lifeWorkers || st.Generation != 1 {
		t.Errorf("after the restart: %+v; want %d workers of generation 1", st, lifeWorkers)
	}
}

// testKillWorker: a worker killed with SIGKILL is replaced by the
// dispatcher (a new pid in its slot) while the service keeps answering;
// systemd sees nothing (same MainPID, no restart of the service).
func testKillWorker(t *testing.T, c *Container) {
	const app = "life-killworker"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/life-killworker-worker"
	port := startHelloApp(t, c, app, worker)
	before := appStatus(t, c, app)
	dispatcher := mainPID(t, c, app)
	victim := before.Workers[0]

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)
	killed := time.Now()
	c.Run(t, "kill", "-9", strconv.Itoa(victim.PID))
	var replaced time.Duration
	Eventually(t, 20*time.Second, "worker 0 replaced", func() error {
		st := appStatus(t, c, app)
		w := st.Workers[0]
		if w.PID == victim.PID || w.PID == 0 || w.State != "ready" {
			return fmt.Errorf("worker 0: %+v (killed pid %d)", w, victim.PID)
		}
		replaced = time.Since(killed)
		return nil
	})
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("worker 0 (pid %d) killed with SIGKILL, ready again within %v", victim.PID, replaced.Round(time.Millisecond))
	checkLoss(t, "load through the worker's SIGKILL", 1, res, kinds)

	after := appStatus(t, c, app)
	if w := after.Workers[0]; w.Restarts != victim.Restarts+1 {
		t.Errorf("worker 0 after the kill: %+v; want restarts %d", w, victim.Restarts+1)
	}
	if w := after.Workers[1]; w.PID != before.Workers[1].PID {
		t.Errorf("worker 1 changed from pid %d to %d; only worker 0 was killed", before.Workers[1].PID, w.PID)
	}
	if got := mainPID(t, c, app); got != dispatcher {
		t.Errorf("MainPID %d → %d: systemd restarted the service for a worker's death", dispatcher, got)
	}
	if alive(t, c, victim.PID, worker) {
		t.Errorf("the killed worker (pid %d) still runs", victim.PID)
	}
	c.WaitJournal(t, 10*time.Second, fmt.Sprintf("worker 0 (pid %d) was killed by signal 9", victim.PID), "-u", app+".service")

	// And the service answers every request afterwards.
	ld := StartLoad(t, LoadOptions{URL: fmt.Sprintf("http://127.0.0.1:%d/", port), Requests: 200, Duration: 30 * time.Second, Concurrency: 4, Timeout: 10 * time.Second})
	ld.WaitOK(t, 200, 30*time.Second)
	if res, kinds := ld.Stop(); res.OK != 200 || res.Failed() != 0 {
		t.Errorf("after the kill: %v (%v); want 200 ok", res, kinds)
	}
}

// testKillDispatcher: the dispatcher (MainPID) killed with SIGKILL under
// load. systemd kills what is left in the cgroup (the workers) and
// restarts the service (Restart=on-failure); the socket stays open
// throughout, so not one connection is refused. Requests that a killed
// worker had accepted are lost (reset or closed), at most one per client
// and worker. (The workers die of PR_SET_PDEATHSIG=SIGKILL with the
// dispatcher, or of systemd's SIGKILL to the cgroup, whichever is first.)
func testKillDispatcher(t *testing.T, c *Container) {
	const app = "life-killdispatcher"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/life-killdispatcher-worker"
	port := startHelloApp(t, c, app, worker)
	before := appStatus(t, c, app)
	dispatcher := mainPID(t, c, app)
	nrestarts := c.Property(t, app+".service", "NRestarts")

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)
	killed := time.Now()
	c.Run(t, "kill", "-9", strconv.Itoa(dispatcher))
	Eventually(t, 30*time.Second, "a new dispatcher", func() error {
		if pid := mainPID(t, c, app); pid == dispatcher || pid == 0 {
			return fmt.Errorf("MainPID is %d (killed: %d)", pid, dispatcher)
		}
		return nil
	})
	after := waitWorkersReady(t, c, app, lifeWorkers, 30*time.Second)
	back := time.Since(killed)
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	t.Logf("dispatcher (pid %d) killed with SIGKILL; %d workers ready again within %v", dispatcher, lifeWorkers, back.Round(time.Millisecond))
	checkLoss(t, "load through the dispatcher's SIGKILL", lifeWorkers, res, kinds)

	n, _ := strconv.Atoi(nrestarts)
	if got := c.Property(t, app+".service", "NRestarts"); got != strconv.Itoa(n+1) {
		t.Errorf("NRestarts %s → %s; want one automatic restart", nrestarts, got)
	}
	c.WaitJournal(t, 10*time.Second, "status=9/KILL", "-u", app+".service")
	for i, w := range before.Workers {
		if alive(t, c, w.PID, worker) {
			t.Errorf("worker %d of the killed dispatcher (pid %d) still runs", i, w.PID)
		}
		if after.Workers[i].PID == w.PID {
			t.Errorf("worker %d has the pid it had before the restart (%d)", i, w.PID)
		}
	}
	if state := c.Property(t, app+".socket", "ActiveState"); state != "active" {
		t.Errorf("%s.socket is %s after the restart; want active", app, state)
	}
}
