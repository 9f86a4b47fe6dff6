package vmtests

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/testnpm"
	"github.com/cohort-dev/cohort/internal/testterm"
)

// testNodeUnchanged: issue 20's first steps under systemd. An unchanged
// Express app (app.listen(PORT)) goes from nothing to serving from 2
// workers with one `cohort init`, and so does an unchanged Fastify app in
// reuseport mode; both come from npm, run on the release's own nodejs
// through the .deb's preload module, and go through `systemctl reload`
// under load with no failed request. `cohort logs` reads their lines back
// labelled, `cohort signal` reaches one worker, and `cohort logs -f` in a
// real terminal (tmux) shows the reload and the signal as they happen.
func testNodeUnchanged(t *testing.T, c *Container) {
	t.Logf("%s: node %s", c.Release.Name, strings.TrimSpace(c.Run(t, "node", "--version")))
	modules := testnpm.Modules(t, testnpm.Express, testnpm.Fastify)
	tarball := filepath.Join(t.TempDir(), "node_modules.tar")
	if out, err := exec.Command("tar", "-C", filepath.Dir(modules), "-cf", tarball, "node_modules").CombinedOutput(); err != nil {
		t.Fatalf("tar node_modules: %v\n%s", err, out)
	}
	data, err := os.ReadFile(tarball)
	if err != nil {
		t.Fatal(err)
	}
	inside := c.Share(t, "node_modules.tar", data)

	type nodeApp struct {
		name, mode, script string
	}
	expressPort, fastifyPort := FreePort(t), FreePort(t)
	apps := []nodeApp{
		{"nexpress", "shared", fmt.Sprintf(`const express = require('express');
const app = express();
app.get('/', (req, res) => res.send('express worker ' + process.env.COHORT_WORKER + ' gen ' + process.env.COHORT_GENERATION + '\n'));
const server = app.listen(%d, () => console.log('express listening on ' + JSON.stringify(server.address())));
process.on('SIGUSR2', () => console.log('express got SIGUSR2'));
process.on('SIGTERM', () => { server.close(() => process.exit(0)); server.closeIdleConnections(); });
`, expressPort)},
		{"nfastify", "reuseport", fmt.Sprintf(`// return503OnClosing: false: Fastify's default answers 503 to what a
// closing server accepted; a graceful stop serves it.
const fastify = require('fastify')({ return503OnClosing: false });
fastify.get('/', async () => 'fastify worker ' + process.env.COHORT_WORKER + ' gen ' + process.env.COHORT_GENERATION + '\n');
fastify.listen({ port: %d }).then((a) => console.log('fastify listening on ' + a));
process.on('SIGTERM', () => fastify.close().then(() => process.exit(0)));
`, fastifyPort)},
	}
	ports := map[string]int{"nexpress": expressPort, "nfastify": fastifyPort}
	for _, a := range apps {
		dir := "/srv/" + a.name
		c.Watch(t, a.name+".socket", a.name+".service")
		c.Run(t, "mkdir", "-p", dir)
		c.Run(t, "tar", "-C", dir, "-xf", inside)
		c.WriteFile(t, dir+"/server.js", []byte(a.script), 0o644)
		out := c.Sh(t, fmt.Sprintf("cd %s && cohort init %s --listen 127.0.0.1:%d --workers 2 --mode %s -- node server.js", dir, a.name, ports[a.name], a.mode))
		t.Logf("cohort init %s:\n%s", a.name, out)
		for _, want := range []string{"wrote /etc/cohort/" + a.name + ".toml", "started " + a.name + ".socket and " + a.name + ".service", "WORKER  PID"} {
			if !strings.Contains(out, want) {
				t.Errorf("cohort init %s printed no %q", a.name, want)
			}
		}
		if res := c.Exec(t, "sh", "-c", fmt.Sprintf("cd %s && cohort init %s --listen 127.0.0.1:%d -- node server.js", dir, a.name, ports[a.name])); res.Code != 1 || !strings.Contains(res.Stderr, "exists already") {
			t.Errorf("a second cohort init %s: %s", a.name, res)
		}
		waitWorkersReady(t, c, a.name, 2, 90*time.Second)
		url := fmt.Sprintf("http://127.0.0.1:%d/", ports[a.name])
		answer := regexp.MustCompile(`^\w+ worker (\d) gen 1\n$`)
		seen := answersFrom(t, url, answer)
		if !seen["0"] || !seen["1"] {
			t.Errorf("%s: answers from workers %v, want 0 and 1", a.name, seen)
		}

		load := StartLoad(t, LoadOptions{URL: url, Requests: 1 << 20, Duration: 3 * time.Minute, Concurrency: 4})
		load.WaitOK(t, 100, 30*time.Second)
		c.Run(t, "systemctl", "reload", a.name)
		load.WaitOK(t, 100, 30*time.Second)
		res, kinds := load.Stop()
		t.Logf("%s (%s mode): systemctl reload under load: %s", a.name, a.mode, res)
		if res.Failed() != 0 {
			t.Errorf("%s: %d requests failed across the reload (%s): %v", a.name, res.Failed(), kinds, res.Samples)
		}
		if st := waitWorkersReady(t, c, a.name, 2, 30*time.Second); st.Generation != 2 {
			t.Errorf("%s after the reload: generation %d, want 2", a.name, st.Generation)
		}
	}

	// cohort logs: the journal, labelled.
	out := c.Run(t, "cohort", "logs", "nexpress", "-n", "all")
	for _, want := range []string{"nexpress.0 | express listening on {\"address\":\"127.0.0.1\",\"family\":\"IPv4\",\"port\":" + strconv.Itoa(expressPort), "nexpress.cohort | ", "nexpress.systemd | "} {
		if !strings.Contains(out, want) {
			t.Errorf("cohort logs nexpress lacks %q:\n%s", want, out)
		}
	}
	out = c.Run(t, "cohort", "logs", "nfastify", "--worker", "1", "-n", "all")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if !strings.HasPrefix(l, "nfastify.1 | ") {
			t.Errorf("cohort logs nfastify --worker 1 printed %q", l)
		}
	}
	if !strings.Contains(out, "nfastify.1 | fastify listening on http://127.0.0.1:"+strconv.Itoa(fastifyPort)) {
		t.Errorf("cohort logs nfastify --worker 1:\n%s", out)
	}

	// cohort logs -f in a real terminal, on every app: a reload and a
	// signal to one worker show up as they happen.
	pane := testterm.Start(t, 160, 40, nil, "nsenter", "--target", strconv.Itoa(c.InitPID), "--all", "--", "env", "TERM=xterm-256color", "cohort", "logs", "-f", "-n", "3")
	pane.WaitFor(t, 20*time.Second, "nfastify.")
	c.Run(t, "systemctl", "reload", "nexpress")
	before := waitWorkersReady(t, c, "nexpress", 2, 30*time.Second)
	out = c.Run(t, "cohort", "signal", "nexpress", "USR2", "--worker", "1")
	if want := fmt.Sprintf("nexpress: sent SIGUSR2 to 1 worker process(es): %d\n", before.Workers[1].PID); out != want {
		t.Errorf("cohort signal: %q, want %q", out, want)
	}
	screen := pane.WaitFor(t, 30*time.Second, "nexpress.cohort | reloading", "nexpress.cohort | sent SIGUSR2 to worker 1", "nexpress.1 | express got SIGUSR2")
	t.Logf("cohort logs -f in tmux (%s):\n%s", c.Release.Name, screen)
	if st := waitWorkersReady(t, c, "nexpress", 2, 30*time.Second); st.Workers[1].PID != before.Workers[1].PID || st.Workers[1].Restarts != 0 {
		t.Errorf("after SIGUSR2 worker 1 is %+v, was %+v", st.Workers[1], before.Workers[1])
	}

	// cohort monit in a real terminal on a generated service: the
	// selected worker's journal lines, and r reloads through systemd.
	monit := testterm.Start(t, 160, 40, nil, "nsenter", "--target", strconv.Itoa(c.InitPID), "--all", "--", "env", "TERM=xterm-256color", "cohort", "monit", "nexpress")
	monit.WaitFor(t, 20*time.Second, "nexpress.0", "nexpress.1", "2/2 ready · gen 3 · shared")
	monit.Keys(t, "Down", "Down")
	monit.WaitFor(t, 20*time.Second, "log: nexpress.1", "express got SIGUSR2")
	monit.Keys(t, "r")
	screen = monit.WaitFor(t, 60*time.Second, "nexpress: reload done", "nexpress: generation 3 → 4 (reload)")
	t.Logf("cohort monit in tmux (%s):\n%s", c.Release.Name, screen)
	monit.Keys(t, "q")

	for _, a := range apps {
		c.Run(t, "systemctl", "stop", a.name+".socket", a.name+".service")
		c.Run(t, "rm", "-rf", "/etc/cohort/"+a.name+".toml", "/srv/"+a.name)
	}
	c.Run(t, "systemctl", "daemon-reload")
}

// answersFrom asks url in rounds of 8 parallel requests (a new connection
// each) until two workers answered or 30 rounds, and returns which
// workers (answer's first group) did; a failed request fails t.
func answersFrom(t *testing.T, url string, answer *regexp.Regexp) map[string]bool {
	t.Helper()
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	var mu sync.Mutex
	seen := map[string]bool{}
	for round := 0; len(seen) < 2 && round < 30; round++ {
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				body, code, err := fetch(client, url)
				m := answer.FindStringSubmatch(body)
				mu.Lock()
				defer mu.Unlock()
				if err != nil || code != 200 || m == nil {
					t.Errorf("GET %s: %d %q %v", url, code, body, err)
					return
				}
				seen[m[1]] = true
			})
		}
		wg.Wait()
	}
	return seen
}
