package vmtests

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/internal/testcgroup"
	"github.com/cohort-dev/cohort/internal/testproc"
	"sigs.k8s.io/yaml"
)

// The container example, examples/container/: a Containerfile that
// installs the .deb and runs `cohort run` as PID 1, its app file, and a
// Kubernetes Deployment that probes cohort's health endpoints.

// exampleDir is examples/container in this checkout.
func exampleDir(t testing.TB) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "examples", "container")
}

// k8sProbe is the part of a Kubernetes probe the example uses.
type k8sProbe struct {
	HTTPGet *struct {
		Path string `json:"path"`
		Port any    `json:"port"` // a number or a port's name
	} `json:"httpGet"`
	PeriodSeconds    int `json:"periodSeconds"`
	FailureThreshold int `json:"failureThreshold"`
	TimeoutSeconds   int `json:"timeoutSeconds"`
}

// k8sObject is what the structural check reads of a Deployment (and the
// kind of any other object): a schema-free subset, decoded as Kubernetes
// does (sigs.k8s.io/yaml: YAML to JSON, then JSON field names).
type k8sObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Spec       struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Template struct {
			Metadata struct {
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
			Spec struct {
				TerminationGracePeriodSeconds *int `json:"terminationGracePeriodSeconds"`
				SecurityContext               struct {
					RunAsUser *int `json:"runAsUser"`
				} `json:"securityContext"`
				Containers []struct {
					Name  string `json:"name"`
					Image string `json:"image"`
					Ports []struct {
						Name          string `json:"name"`
						ContainerPort int    `json:"containerPort"`
					} `json:"ports"`
					ReadinessProbe *k8sProbe `json:"readinessProbe"`
					LivenessProbe  *k8sProbe `json:"livenessProbe"`
				} `json:"containers"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

// addrPort is the port of a host:port address.
func addrPort(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return n
}

// TestContainerExampleFiles checks, without running anything, that the
// example's three files agree: the Deployment is well formed, probes
// /readyz and /livez on the port of the app file's [metrics] listen,
// exposes its [[listen]] port, gives a stop more than drain_delay +
// stop_timeout, sees a stop's 503 before the drain ends, and runs as the
// Containerfile's USER; the Containerfile runs cohort run as PID 1 in
// exec form, on the app file it copies in.
func TestContainerExampleFiles(t *testing.T) {
	dir := exampleDir(t)
	var app struct {
		DrainDelay  string `toml:"drain_delay"`
		StopTimeout string `toml:"stop_timeout"`
		Listen      []struct {
			Address string `toml:"address"`
		} `toml:"listen"`
		Metrics struct {
			Listen string `toml:"listen"`
		} `toml:"metrics"`
	}
	// Decoded as plain TOML: appfile's own reading is the running
	// test's (TestContainer); here only the numbers matter.
	if _, err := toml.DecodeFile(filepath.Join(dir, "hello.toml"), &app); err != nil {
		t.Fatal(err)
	}
	drain, err := time.ParseDuration(app.DrainDelay)
	if err != nil {
		t.Fatalf("hello.toml drain_delay: %v", err)
	}
	stop, err := time.ParseDuration(app.StopTimeout)
	if err != nil {
		t.Fatalf("hello.toml stop_timeout: %v", err)
	}
	if len(app.Listen) != 1 || app.Metrics.Listen == "" {
		t.Fatalf("hello.toml: want one [[listen]] and [metrics] listen, got %+v", app)
	}
	httpPort, metricsPort := addrPort(t, app.Listen[0].Address), addrPort(t, app.Metrics.Listen)

	steps, err := ParseContainerfile(filepath.Join(dir, "Containerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var entrypoint, cmd []string
	var user string
	var expose []string
	copies := map[string]string{} // destination → source
	for _, in := range steps {
		switch in.Keyword {
		case "ENTRYPOINT":
			entrypoint, err = in.ExecForm()
		case "CMD":
			cmd, err = in.ExecForm()
		case "USER":
			user = in.Args
		case "EXPOSE":
			expose = append(expose, strings.Fields(in.Args)...)
		case "COPY":
			if f := strings.Fields(in.Args); len(f) == 2 {
				copies[f[1]] = f[0]
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(entrypoint, []string{"cohort", "run"}) {
		t.Errorf("Containerfile ENTRYPOINT %q, want cohort run in exec form (PID 1)", entrypoint)
	}
	if len(cmd) != 1 || copies[cmd[0]] != "examples/container/hello.toml" {
		t.Errorf("Containerfile CMD %q is not where it copies examples/container/hello.toml (%v)", cmd, copies)
	}
	for _, p := range []int{httpPort, metricsPort} {
		if !slices.Contains(expose, strconv.Itoa(p)) {
			t.Errorf("Containerfile EXPOSE %v lacks %d", expose, p)
		}
	}

	b, err := os.ReadFile(filepath.Join(dir, "deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var dep *k8sObject
	for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		var o k8sObject
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("deployment.yaml, document %d: %v", i+1, err)
		}
		if o.APIVersion == "" || o.Kind == "" {
			t.Errorf("deployment.yaml, document %d: no apiVersion or kind", i+1)
		}
		if o.Kind == "Deployment" {
			dep = &o
		}
	}
	if dep == nil {
		t.Fatal("deployment.yaml has no Deployment")
	}
	if dep.APIVersion != "apps/v1" {
		t.Errorf("Deployment apiVersion %q, want apps/v1", dep.APIVersion)
	}
	tmpl := dep.Spec.Template
	if len(dep.Spec.Selector.MatchLabels) == 0 {
		t.Error("Deployment has no selector")
	}
	for k, v := range dep.Spec.Selector.MatchLabels {
		if tmpl.Metadata.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the template's labels %v", k, v, tmpl.Metadata.Labels)
		}
	}
	if len(tmpl.Spec.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(tmpl.Spec.Containers))
	}
	ctr := tmpl.Spec.Containers[0]
	ports := map[string]int{}
	var numbers []int
	for _, p := range ctr.Ports {
		ports[p.Name] = p.ContainerPort
		numbers = append(numbers, p.ContainerPort)
	}
	if !slices.Contains(numbers, httpPort) || !slices.Contains(numbers, metricsPort) {
		t.Errorf("container ports %v, want %d (listen) and %d (metrics)", numbers, httpPort, metricsPort)
	}
	probe := func(what string, p *k8sProbe, path string) {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s: no httpGet probe", what)
			return
		}
		if p.HTTPGet.Path != path {
			t.Errorf("%s: path %q, want %q", what, p.HTTPGet.Path, path)
		}
		port := 0
		switch v := p.HTTPGet.Port.(type) {
		case float64:
			port = int(v)
		case string:
			port = ports[v]
		}
		if port != metricsPort {
			t.Errorf("%s: port %v (%d), want [metrics] listen's %d", what, p.HTTPGet.Port, port, metricsPort)
		}
	}
	probe("readinessProbe", ctr.ReadinessProbe, "/readyz")
	probe("livenessProbe", ctr.LivenessProbe, "/livez")
	if r := ctr.ReadinessProbe; r != nil {
		// Kubernetes' defaults: period 10s, failureThreshold 3.
		period, failures := cmp0(r.PeriodSeconds, 10), cmp0(r.FailureThreshold, 3)
		if seen := time.Duration(period*failures) * time.Second; seen >= drain {
			t.Errorf("readiness sees a stop's 503 after up to %s (periodSeconds × failureThreshold), not within drain_delay %s", seen, drain)
		}
	}
	if g := tmpl.Spec.TerminationGracePeriodSeconds; g == nil || time.Duration(*g)*time.Second <= drain+stop {
		t.Errorf("terminationGracePeriodSeconds %s, want more than drain_delay + stop_timeout = %s", optInt(g), drain+stop)
	}
	if u := tmpl.Spec.SecurityContext.RunAsUser; u == nil || strconv.Itoa(*u) != user {
		t.Errorf("runAsUser %s, want the Containerfile's USER %q", optInt(u), user)
	}
}

func cmp0(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// TestContainer builds the example image from examples/container's
// Containerfile, its steps run for real (BuildImage: the cached Debian
// root for FROM, the .deb from `make deb`), and runs `cohort run` as PID
// 1 of a container under systemd-nspawn without --boot, as a container
// runtime would: it serves and answers its health endpoints, reaps an
// exec session's double-forked orphan, stops on SIGTERM with 0, exits 1
// when the app cannot start, and starts 1 worker under a 1.5 CPU quota.
func TestContainer(t *testing.T) {
	Require(t)
	dir := exampleDir(t)
	if _, err := appfile.ParseFile(filepath.Join(dir, "hello.toml")); err != nil {
		// Or every step below fails with cohort run's exit 2.
		t.Fatalf("examples/container/hello.toml: %v", err)
	}
	deb, err := buildDeb()
	if err != nil {
		t.Fatalf("make deb: %v", err)
	}
	root, _ := RepoRoot()
	rel, err := filepath.Rel(root, deb)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range SelectedReleases() {
		t.Run(r.Name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			img := BuildImage(t, r, filepath.Join(dir, "Containerfile"), root, map[string]string{"DEB": rel})
			t.Logf("built the image in %v", time.Since(start).Round(time.Millisecond))
			// One container at a time: nspawn locks the image's directory.
			t.Run("serve", func(t *testing.T) { testContainerServe(t, img) })
			t.Run("crash", func(t *testing.T) { testContainerCrash(t, img) })
			t.Run("cpuquota", func(t *testing.T) { testContainerCPUQuota(t, img) })
		})
	}
}

// waitStderr waits for PID 1's stderr to match re and returns the match.
func waitStderr(t *testing.T, c *Container, timeout time.Duration, re *regexp.Regexp) []string {
	t.Helper()
	var m []string
	Eventually(t, timeout, "cohort run's line "+re.String(), func() error {
		select {
		case <-c.exited:
			_, stderr := c.Output()
			t.Fatalf("container exited (%v):\n%s", c.cmd.ProcessState, stderr)
		default:
		}
		_, stderr := c.Output()
		if m = re.FindStringSubmatch(stderr); m == nil {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	return m
}

// asUser runs args in c as the image's USER (a kubectl exec).
func asUser(img *Image, args ...string) []string {
	if img.User == "" {
		return args
	}
	return append([]string{"setpriv", "--reuid=" + img.User, "--regid=" + img.User, "--clear-groups", "--"}, args...)
}

// curlCode is the HTTP status of GET url from inside c, "000" when it
// cannot connect.
func curlCode(t *testing.T, c *Container, url string) string {
	t.Helper()
	return c.Exec(t, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url).Stdout
}

// testContainerServe: the app serves on its port, /readyz and /livez
// answer 200, `cohort status` in the container sees it; an exec
// session's orphan is reaped by PID 1; SIGTERM (docker stop) turns
// readiness off, stops the workers, exits 0.
func testContainerServe(t *testing.T, img *Image) {
	c := RunImage(t, img, nil)
	m := waitStderr(t, c, 60*time.Second, regexp.MustCompile(`all (\d+) workers ready`))
	n, _ := strconv.Atoi(m[1])
	if body := c.Run(t, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/"); !strings.HasPrefix(body, "hello from python worker ") {
		t.Errorf("GET / = %q", body)
	}
	for _, path := range []string{"/readyz", "/livez"} {
		if code := curlCode(t, c, "http://127.0.0.1:9464"+path); code != "200" {
			t.Errorf("GET %s = %s, want 200", path, code)
		}
	}
	status := c.Run(t, asUser(img, "cohort", "status", "hello")...)
	if got := strings.Count(status, " ready "); got < n {
		t.Errorf("cohort status shows %d ready workers, want %d:\n%s", got, n, status)
	}

	// The orphan of an exec session (nsenter's child has its parent
	// outside the container) is PID 1's to reap.
	before := testproc.Children(c.InitPID)
	c.Run(t, "/bin/sh", "-c", "sleep 2 </dev/null >/dev/null 2>&1 & exit 0")
	var orphan int
	Eventually(t, 5*time.Second, "the orphan reparented to PID 1", func() error {
		for _, pid := range testproc.Children(c.InitPID) {
			if !slices.Contains(before, pid) {
				orphan = pid
				return nil
			}
		}
		return fmt.Errorf("PID 1's children %v", testproc.Children(c.InitPID))
	})
	Eventually(t, 10*time.Second, fmt.Sprintf("orphan %d reaped", orphan), func() error {
		if st := testproc.State(orphan); st != "" {
			return fmt.Errorf("state %s", st)
		}
		return nil
	})
	if z := c.zombies(); len(z) != 0 {
		t.Errorf("zombies in the container: %v", z)
	}

	// The runtime's stop: SIGTERM to PID 1.
	stopAt := time.Now()
	if err := syscall.Kill(c.InitPID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Readiness is off at once, while the listeners stay open for
	// drain_delay.
	Eventually(t, 3*time.Second, "/readyz 503 after SIGTERM", func() error {
		if code := curlCode(t, c, "http://127.0.0.1:9464/readyz"); code != "503" {
			return fmt.Errorf("GET /readyz = %s", code)
		}
		return nil
	})
	if body := c.Run(t, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/"); !strings.HasPrefix(body, "hello from python worker ") {
		t.Errorf("GET / while draining = %q", body)
	}
	if code := c.Wait(t, 60*time.Second); code != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", code)
	}
	t.Logf("stopped in %v", time.Since(stopAt).Round(time.Millisecond))
	stdout, _ := c.Output()
	for i := range n {
		re := regexp.MustCompile(`(?m)^hello\.` + strconv.Itoa(i) + ` \| python worker ` + strconv.Itoa(i) + ` \(pid \d+\) stopping on SIGTERM$`)
		if !re.MatchString(stdout) {
			t.Errorf("stdout lacks worker %d's stop line %s:\n%s", i, re, stdout)
		}
	}
}

// testContainerCrash: an app whose workers exit at once is not ready
// within ready_timeout: cohort run stops and exits 1, which a runtime
// sees as a failed container (and restarts with its own backoff).
func testContainerCrash(t *testing.T, img *Image) {
	crash := "/srv/hello/crash.toml"
	app := `command = ["python3", "-c", "import sys; print('crashing'); sys.exit(3)"]
workers = 2
ready = "notify"
ready_timeout = "2s"
[[listen]]
name = "http"
address = "127.0.0.1:8080"
`
	if err := os.WriteFile(filepath.Join(img.Dir, crash), []byte(app), 0o644); err != nil {
		t.Fatal(err)
	}
	c := RunImage(t, img, nil, crash)
	if code := c.Wait(t, 60*time.Second); code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	stdout, stderr := c.Output()
	if !strings.Contains(stderr, "cohort run: app crash: no worker ready after ready_timeout (2s)") || !strings.Contains(stdout, "crash.0 | crashing") {
		t.Errorf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
	}
}

// testContainerCPUQuota: the container in a cgroup v1 with a CPU quota of
// 1.5 CPUs: workers = "auto" starts 1 worker, and status says why.
func testContainerCPUQuota(t *testing.T, img *Image) {
	_, self := testcgroup.V1(t, "cpu")
	quota := testcgroup.New(t, self, [][2]string{{"cpu.cfs_period_us", "100000"}, {"cpu.cfs_quota_us", "150000"}})
	c := RunImage(t, img, []string{quota})
	waitStderr(t, c, 60*time.Second, regexp.MustCompile(`all 1 workers ready`))
	status := c.Run(t, asUser(img, "cohort", "status", "hello")...)
	if !regexp.MustCompile(`(?m)^hello: workers auto = 1 \(affinity \d+, cgroup cpu quota 1\.50\)$`).MatchString(status) {
		t.Errorf("cohort status:\n%s", status)
	}
}

// zombies lists the zombies among the container's processes.
func (c *Container) zombies() []int {
	var zs []int
	for _, pid := range c.cg.pids() {
		if testproc.State(pid) == "Z" {
			zs = append(zs, pid)
		}
	}
	return zs
}

// optInt prints an optional number of the manifest.
func optInt(p *int) string {
	if p == nil {
		return "(not set)"
	}
	return strconv.Itoa(*p)
}
