package vmtests

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// escapeDaemon is the argv of the daemon each worker of the escape
// scenario leaves behind: a sleep no other scenario runs.
const escapeDaemon = "sleep 4242"

// escapedDaemon is one process running escapeDaemon.
type escapedDaemon struct {
	pid, ppid, owner int // owner: the worker pid its COHORT_WORKER_PID names
	socket           string
}

// escapedDaemons lists the daemons of the escape scenario in c.
func escapedDaemons(t *testing.T, c *Container) []escapedDaemon {
	t.Helper()
	var out []escapedDaemon
	for _, line := range strings.Split(c.Run(t, "ps", "-eo", "pid=,ppid=,args="), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || strings.Join(f[2:], " ") != escapeDaemon {
			continue
		}
		d := escapedDaemon{}
		d.pid, _ = strconv.Atoi(f[0])
		d.ppid, _ = strconv.Atoi(f[1])
		env := c.Exec(t, "cat", fmt.Sprintf("/proc/%d/environ", d.pid)).Stdout
		for _, kv := range strings.Split(env, "\x00") {
			if v, ok := strings.CutPrefix(kv, "COHORT_WORKER_PID="); ok {
				d.owner, _ = strconv.Atoi(v)
			}
		}
		d.socket = strings.TrimSpace(c.Exec(t, "readlink", fmt.Sprintf("/proc/%d/fd/3", d.pid)).Stdout)
		out = append(out, d)
	}
	return out
}

// testEscape (issue 14.7): every worker double-forks a setsid daemon that
// keeps the listening socket (fd 3), as a program that daemonizes a
// helper would. The dispatcher is a subreaper, so the daemons are its
// children; when a worker is killed with kill -9 (no systemctl: systemd's
// cgroup kill only comes at a service stop) its daemon is killed with it,
// the slot is refilled, the other worker's daemon lives on, and the app
// serves throughout. After the stop no daemon is left.
func testEscape(t *testing.T, c *Container) {
	const app = "escape"
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/escape-worker"
	installHello(t, c, worker)
	port := FreePort(t)
	script := fmt.Sprintf("(setsid %s &); exec %s", escapeDaemon, worker)
	startApp(t, c, app, appFile(fmt.Sprintf(`["/bin/sh", "-c", %q]`, script), lifeWorkers, lifeSettings, port))
	t.Cleanup(func() { c.Exec(t, "systemctl", "stop", app+".socket", app+".service") })
	before := waitWorkersReady(t, c, app, lifeWorkers, 20*time.Second)
	dispatcher := mainPID(t, c, app)

	var daemons []escapedDaemon
	Eventually(t, 10*time.Second, "a daemon per worker", func() error {
		daemons = escapedDaemons(t, c)
		if len(daemons) != lifeWorkers {
			return fmt.Errorf("%d daemons: %+v", len(daemons), daemons)
		}
		return nil
	})
	byOwner := map[int]escapedDaemon{}
	for _, d := range daemons {
		if d.ppid != dispatcher {
			t.Errorf("daemon %d has parent %d, want the dispatcher %d (a subreaper)", d.pid, d.ppid, dispatcher)
		}
		if !strings.HasPrefix(d.socket, "socket:[") {
			t.Errorf("daemon %d: fd 3 is %q, want the listening socket", d.pid, d.socket)
		}
		byOwner[d.owner] = d
	}
	victim := before.Workers[0]
	gone, ok := byOwner[victim.PID]
	kept, ok2 := byOwner[before.Workers[1].PID]
	if !ok || !ok2 {
		t.Fatalf("daemons %+v: want one per worker %+v", daemons, before.Workers)
	}

	load := StartLoad(t, lifeLoad(port))
	load.WaitOK(t, 200, 30*time.Second)
	c.Run(t, "kill", "-9", strconv.Itoa(victim.PID))
	Eventually(t, 20*time.Second, "worker 0 replaced", func() error {
		w := appStatus(t, c, app).Workers[0]
		if w.PID == victim.PID || w.PID == 0 || w.State != "ready" {
			return fmt.Errorf("worker 0: %+v (killed pid %d)", w, victim.PID)
		}
		return nil
	})
	Eventually(t, 10*time.Second, "the killed worker's daemon gone, a new one for its replacement", func() error {
		now := escapedDaemons(t, c)
		pids := map[int]bool{}
		for _, d := range now {
			pids[d.pid] = true
		}
		switch {
		case pids[gone.pid]:
			return fmt.Errorf("daemon %d of the killed worker %d still runs: %+v", gone.pid, victim.PID, now)
		case !pids[kept.pid]:
			return fmt.Errorf("daemon %d of the live worker %d was killed: %+v", kept.pid, kept.owner, now)
		case len(now) != lifeWorkers:
			return fmt.Errorf("%d daemons, want %d: %+v", len(now), lifeWorkers, now)
		}
		return nil
	})
	load.WaitOK(t, 200, 30*time.Second)
	res, kinds := load.Stop()
	checkLoss(t, "load through the kill of a worker with a daemon", 1, res, kinds)
	c.WaitJournal(t, 10*time.Second, fmt.Sprintf("worker 0 (pid %d) was killed by signal 9", victim.PID), "-u", app+".service")
	if got := mainPID(t, c, app); got != dispatcher {
		t.Errorf("MainPID %d → %d: systemd restarted the service for a worker's death", dispatcher, got)
	}

	c.Run(t, "systemctl", "stop", app+".socket", app+".service")
	Eventually(t, 10*time.Second, "no daemon after the stop", func() error {
		if now := escapedDaemons(t, c); len(now) != 0 {
			return fmt.Errorf("daemons left: %+v", now)
		}
		return nil
	})
}
