package vmtests

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// testHostileFiles: app files that on 57c59ff stopped the generator for
// every app (a FIFO blocked it until systemd killed it, after which no
// cohort unit existed; a symlink to /dev/zero grew it past 2 GB; nested
// inline tables took seconds and gigabytes) lie next to a good app. Under
// the real systemd, `systemctl daemon-reload` returns within seconds, the
// journal names each refusal with its reason, and the good app's units are
// there and serve.
func testHostileFiles(t *testing.T, c *Container) {
	const app = "hgood"
	hostile := map[string]string{
		"hfifo":   "/etc/cohort/hfifo.toml: not a regular file (a FIFO)",
		"hzero":   "/etc/cohort/hzero.toml: not a regular file (a character device)",
		"hnest":   "/etc/cohort/hnest.toml:1:53: arrays and inline tables nested more than 16 deep",
		"hdots":   "/etc/cohort/hdots.toml:1:32: dotted key or table name with more than 16 parts",
		"hlisten": "/etc/cohort/hlisten.toml: … and ",
	}
	// Registered before Watch, so that it runs after the diagnostics.
	t.Cleanup(func() {
		c.Exec(t, "rm", "-f", "/etc/cohort/hfifo.toml", "/etc/cohort/hzero.toml", "/etc/cohort/hnest.toml", "/etc/cohort/hdots.toml", "/etc/cohort/hlisten.toml")
		removeApp(t, c, app)
	})
	c.Watch(t, app+".socket", app+".service")
	worker := "/usr/local/lib/cohort-vmtest/hgood-worker"
	installHello(t, c, worker)
	port := FreePort(t)
	c.WriteFile(t, "/etc/cohort/"+app+".toml", []byte(fmt.Sprintf(`command = [%q]
workers = 2
ready = "notify"

[[listen]]
name = "http"
address = "127.0.0.1:%d"
`, worker, port)), 0o644)
	// The baseline: daemon-reload with the good app alone, in the same
	// container, so that the figure below can be read on a busy machine.
	start := time.Now()
	c.Run(t, "systemctl", "daemon-reload")
	baseline := time.Since(start)

	c.Run(t, "mkfifo", "/etc/cohort/hfifo.toml")
	c.Run(t, "ln", "-s", "/dev/zero", "/etc/cohort/hzero.toml")
	c.WriteFile(t, "/etc/cohort/hnest.toml", []byte("a = "+strings.Repeat("{b=", 8<<10)+"1"+strings.Repeat("}", 8<<10)+"\n"), 0o644)
	c.WriteFile(t, "/etc/cohort/hdots.toml", []byte(strings.Repeat("a.", 20000)+"a = 1\n"), 0o644)
	// 1,000 unknown keys: the journal gets 20 of them and a count.
	var keys strings.Builder
	keys.WriteString("command = [\"/bin/true\"]\n")
	for i := range 1000 {
		fmt.Fprintf(&keys, "unknown%d = 1\n", i)
	}
	c.WriteFile(t, "/etc/cohort/hlisten.toml", []byte(keys.String()), 0o644)

	since := c.Run(t, "date", "+%Y-%m-%d %H:%M:%S")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start = time.Now()
	res, err := c.ExecContext(ctx, "systemctl", "daemon-reload")
	took := time.Since(start)
	if err != nil || res.Code != 0 {
		t.Fatalf("systemctl daemon-reload with hostile files: %v %s (after %v)", err, res, took)
	}
	t.Logf("systemctl daemon-reload with a FIFO, a /dev/zero symlink, a nesting bomb, a dotted-key bomb and 1,000 unknown keys beside a good app: %v; with the good app alone: %v",
		took.Round(time.Millisecond), baseline.Round(time.Millisecond))
	// On 57c59ff the FIFO held daemon-reload until systemd killed the
	// generator after 90 s. The bound leaves room for a busy machine,
	// where even the baseline can take seconds.
	if took > 15*time.Second {
		t.Errorf("daemon-reload took %v (%v with the good app alone); want a few seconds", took, baseline)
	}

	for name, want := range hostile {
		line, err := c.FindJournal(t, 10*time.Second, want, "--since", strings.TrimSpace(since))
		if err != nil {
			t.Errorf("the journal does not name %s's refusal %q: %v", name, want, err)
			continue
		}
		t.Logf("journal: %s", line)
		if got := c.Property(t, name+".service", "LoadState"); got != "not-found" {
			t.Errorf("%s.service: LoadState=%s; want not-found", name, got)
		}
	}
	journal := c.Journal(t, "--since", strings.TrimSpace(since), "-o", "cat")
	if n := len(regexp.MustCompile(`/etc/cohort/hlisten\.toml:[0-9]+:[0-9]+: `).FindAllString(journal, -1)); n != 20 {
		t.Errorf("the journal has %d lines about hlisten.toml's unknown keys; want 20 and a count", n)
	}
	if !strings.Contains(journal, "/etc/cohort/hlisten.toml: … and 981 more errors") {
		t.Errorf("the journal does not count the rest of hlisten.toml's errors")
	}

	// The good app is generated and serves.
	for _, u := range []string{app + ".socket", app + ".service"} {
		if got := c.Property(t, u, "LoadState"); got != "loaded" {
			t.Fatalf("%s: LoadState=%s; want loaded", u, got)
		}
	}
	c.Run(t, "systemctl", "start", app+".socket")
	ld := StartLoad(t, LoadOptions{URL: fmt.Sprintf("http://127.0.0.1:%d/", port), Requests: 500, Duration: 30 * time.Second, Concurrency: 4, Timeout: 10 * time.Second})
	ld.WaitOK(t, 500, 30*time.Second)
	if res, kinds := ld.Stop(); res.OK != 500 || res.Failed() != 0 {
		t.Errorf("the good app beside the hostile files: %v (%v); want 500 ok", res, kinds)
	} else {
		t.Logf("the good app beside the hostile files: %v", res)
	}
}
