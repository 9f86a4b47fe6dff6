package layout

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"path"
	"strings"
	"testing"
)

const module = "github.com/cohort-dev/cohort/"

// rule says which of cohort's packages a group of packages may import.
// Patterns are module-relative; "x/..." is x and everything below it.
type rule struct {
	pkgs  []string // the packages the rule is for
	may   []string // what they may import
	tests []string // what their tests may import besides
}

// testSupport is what any package's tests may import.
var testSupport = []string{"internal/testtool", "internal/testsock", "internal/testproc", "internal/testsync", "internal/testcgroup", "internal/testnpm", "internal/testterm"}

// rules are ARCHITECTURE.md's "Who may import whom", first match wins.
// A package no rule names fails the test: a new part must be placed.
var rules = []rule{
	// The leaves: the app model and unit files know nothing of processes.
	{pkgs: []string{"appfile"}},
	{pkgs: []string{"units"}},
	// The worker-side library users import: nothing of cohort's inside.
	{pkgs: []string{"activation/..."}, may: []string{"activation/..."}},
	// Round-robin mode's balancer is the dispatcher's, behind its mode
	// interface (internal so that users cannot import it), and speaks the
	// worker protocol of activation/rr.
	{pkgs: []string{"dispatcher/internal/balance"}, may: []string{"activation/...", "dispatcher/internal/...", "internal/..."}},
	// Plumbing: small packages of one job each, which know no app.
	{pkgs: []string{"internal/testtool", "internal/testsock", "internal/testproc", "internal/testsync", "internal/testcgroup", "internal/testnpm", "internal/testterm"}, may: []string{"internal/..."}},
	{pkgs: []string{"internal/layout"}},
	// Matching the fds socket activation passed to [[listen]] entries
	// needs activation's name for an unnamed fd; activation imports
	// nothing of cohort, so this makes no cycle.
	{pkgs: []string{"internal/sockets"}, may: []string{"appfile", "activation"}},
	// cgroup v2 files: a worker's cgroup with the app's [limits], and
	// what the kernel counts in it. It needs no other plumbing.
	{pkgs: []string{"internal/cgroup"}, may: []string{"appfile"}},
	{pkgs: []string{"internal/...", "dispatcher/internal/..."}, may: []string{"internal/...", "dispatcher/internal/...", "appfile"}},
	// The generator turns app files into units; it runs no worker.
	{pkgs: []string{"generator/..."}, may: []string{"appfile", "units", "generator/...", "internal/..."}, tests: []string{"activation/..."}},
	// The dispatcher runs workers; it writes no unit and is no command.
	{pkgs: []string{"dispatcher", "dispatcher/..."}, may: []string{"appfile", "activation/...", "dispatcher/...", "internal/..."}, tests: []string{"generator/running"}},
	// The binaries put the parts together.
	{pkgs: []string{"cmd/..."}, may: []string{"appfile", "units", "generator/...", "dispatcher", "dispatcher/control", "activation/...", "internal/..."}},
	// Outside the product: examples and benchmarks use what users use.
	{pkgs: []string{"examples/..."}, may: []string{"activation/..."}},
	{pkgs: []string{"bench/..."}, may: []string{"bench/...", "activation/..."}},
	// The guest agent of vmtests' QEMU backend: its protocol and command.
	{pkgs: []string{"vmtests/internal/..."}, may: []string{"vmtests/internal/..."}},
	{pkgs: []string{"vmtests"}, may: []string{"internal/...", "vmtests/internal/..."}, tests: []string{"appfile", "units", "generator/...", "activation/..."}},
	{pkgs: []string{"packaging", "packaging/..."}},
}

func match(pattern, pkg string) bool {
	if p, ok := strings.CutSuffix(pattern, "/..."); ok {
		return pkg == p || strings.HasPrefix(pkg, p+"/")
	}
	return pkg == pattern
}

func matchAny(patterns []string, pkg string) bool {
	for _, p := range patterns {
		if match(p, pkg) {
			return true
		}
	}
	return false
}

type goPackage struct {
	ImportPath   string
	Imports      []string
	TestImports  []string
	XTestImports []string
}

// TestImportDirections: every import between cohort's packages follows
// rules, and every package is placed by one.
func TestImportDirections(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go: %v", err) // the test runs under `go test`: go is there
	}
	cmd := exec.Command(goBin, "list", "-e", "-json", module+"...")
	cmd.Dir = "../.."
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	dec := json.NewDecoder(bytes.NewReader(out))
	n := 0
	for {
		var p goPackage
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		pkg, ok := strings.CutPrefix(p.ImportPath, module)
		if !ok {
			continue // the module root has no package
		}
		n++
		r, ok := ruleFor(pkg)
		if !ok {
			t.Errorf("%s: no rule places it: add it to rules and to ARCHITECTURE.md", pkg)
			continue
		}
		check := func(imports []string, allowed []string, what string) {
			for _, imp := range imports {
				dep, own := strings.CutPrefix(imp, module)
				if !own || dep == pkg {
					continue
				}
				if !matchAny(allowed, dep) {
					t.Errorf("%s: %s import %s, which ARCHITECTURE.md does not allow", pkg, what, dep)
				}
			}
		}
		check(p.Imports, r.may, "code may not")
		testAllowed := append(append(append([]string{}, r.may...), r.tests...), testSupport...)
		testAllowed = append(testAllowed, path.Dir(pkg)+"/...") // a package's tests may use its parent's helpers
		check(append(p.TestImports, p.XTestImports...), testAllowed, "tests may not")
		for _, imp := range p.Imports {
			if dep, own := strings.CutPrefix(imp, module); own && matchAny(testSupport, dep) && !matchAny(testSupport, pkg) {
				t.Errorf("%s: code imports %s, which is for tests only", pkg, dep)
			}
		}
	}
	if n < 10 {
		t.Fatalf("go list found %d of cohort's packages; want them all", n)
	}
}

func ruleFor(pkg string) (rule, bool) {
	for _, r := range rules {
		if matchAny(r.pkgs, pkg) {
			return r, true
		}
	}
	return rule{}, false
}

// TestRulesMatch keeps the matcher honest.
func TestRulesMatch(t *testing.T) {
	for _, tt := range []struct {
		pattern, pkg string
		want         bool
	}{
		{"dispatcher/...", "dispatcher", true},
		{"dispatcher/...", "dispatcher/control", true},
		{"dispatcher/...", "dispatcherx", false},
		{"appfile", "appfile", true},
		{"appfile", "appfile/x", false},
	} {
		if got := match(tt.pattern, tt.pkg); got != tt.want {
			t.Errorf("match(%q, %q) = %v", tt.pattern, tt.pkg, got)
		}
	}
}
