package packaging

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// repoRoot is the repository's top directory (the test runs in packaging/).
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// need ends t as testtool.Need does unless every tool is installed.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		testtool.Need(t, tool)
	}
}

func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return string(out)
}

func TestDebianVersion(t *testing.T) {
	need(t, "git")
	script := filepath.Join(repoRoot(t), "packaging", "build-deb.sh")
	cases := []struct{ describe, want string }{
		{"v1.2.0", "1.2.0"},
		{"1.2.0", "1.2.0"},
		{"v1.2.0-rc1", "1.2.0~rc1"},
		{"v1.2.0-3-gabc1234", "1.2.0+git3.abc1234"},
		{"v1.2.0-rc1-3-gabc1234-dirty", "1.2.0~rc1+git3.abc1234+dirty"},
		{"v1.2.0-dirty", "1.2.0+dirty"},
		{"0.0.0-dev", "0.0.0~dev"},
	}
	for _, c := range cases {
		got := strings.TrimSpace(run(t, ".", script, "--debian-version", c.describe))
		if got != c.want {
			t.Errorf("Debian version of %q = %q, want %q", c.describe, got, c.want)
		}
	}

	// No tag yet: 0.0.0~git<commits on HEAD>.<hash>.
	count := strings.TrimSpace(run(t, ".", "git", "rev-list", "--count", "HEAD"))
	got := strings.TrimSpace(run(t, ".", script, "--debian-version", "abc1234-dirty"))
	if want := "0.0.0~git" + count + ".abc1234+dirty"; got != want {
		t.Errorf("Debian version of an untagged hash = %q, want %q", got, want)
	}

	cmd := exec.Command(script, "--debian-version", "not a version")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "cannot make a Debian version") {
		t.Errorf("a describe string with blanks: err %v, output %q; want a clear failure", err, out)
	}

	// The mapping must keep git's order in dpkg's eyes.
	t.Run("dpkg-order", func(t *testing.T) {
		need(t, "dpkg")
		order := []string{"0.0.0~dev", "0.0.0~git9.ffff", "0.0.0~git10.0000", "1.2.0~rc1", "1.2.0~rc1+git3.abc", "1.2.0", "1.2.0+dirty", "1.2.0+git3.abc1234", "1.2.0+git3.abc1234+dirty", "1.2.1~rc1"}
		for i := 1; i < len(order); i++ {
			if err := exec.Command("dpkg", "--compare-versions", order[i-1], "lt", order[i]).Run(); err != nil {
				t.Errorf("dpkg does not sort %s before %s", order[i-1], order[i])
			}
		}
	})
}

// built is one package built by build-deb.sh.
type built struct {
	path    string
	version string // the Debian version build-deb.sh derived
	err     error
}

var (
	buildOnce = map[string]*sync.Once{"amd64": {}, "arm64": {}}
	builds    = map[string]*built{}
	buildMu   sync.Mutex
)

// buildDeb runs build-deb.sh for arch once per test binary and returns the
// package. Go's build cache keeps the tools and binaries, so after the
// first run this takes seconds.
func buildDeb(t *testing.T, arch string) *built {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the .deb; skipped with -short")
	}
	need(t, "git", "dpkg-deb", "gzip")
	root := repoRoot(t)
	buildOnce[arch].Do(func() {
		b := &built{}
		describe := strings.TrimSpace(run(t, root, "sh", "-c", "git describe --tags --always --dirty 2>/dev/null || echo 0.0.0-dev"))
		b.version = strings.TrimSpace(run(t, root, "packaging/build-deb.sh", "--debian-version", describe))
		cmd := exec.Command("packaging/build-deb.sh", describe, arch)
		cmd.Dir = root
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		b.path = lines[len(lines)-1]
		if err != nil {
			b.err = fmt.Errorf("packaging/build-deb.sh %s %s: %v\n%s%s", describe, arch, err, out, stderr.Bytes())
		}
		buildMu.Lock()
		builds[arch] = b
		buildMu.Unlock()
	})
	buildMu.Lock()
	b := builds[arch]
	buildMu.Unlock()
	if b == nil || b.err != nil {
		if b == nil {
			t.Fatal("the build failed in an earlier test")
		}
		t.Fatal(b.err)
	}
	return b
}

// entry is one line of `dpkg-deb -c`.
type entry struct {
	mode  string // "-rwxr-xr-x"
	owner string // "root/root"
	size  string
}

func contents(t *testing.T, deb string) map[string]entry {
	t.Helper()
	files := map[string]entry{}
	sc := bufio.NewScanner(strings.NewReader(run(t, ".", "dpkg-deb", "-c", deb)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// -rw-r--r-- root/root 1517 2026-11-24 17:21 ./etc/cohort/example.toml.sample
		if len(f) < 6 {
			t.Fatalf("dpkg-deb -c: odd line %q", sc.Text())
		}
		name := strings.TrimPrefix(f[5], ".")
		files[strings.TrimSuffix(name, "/")] = entry{mode: f[0], owner: f[1], size: f[2]}
	}
	return files
}

// payload returns the package's files as a path → content map (regular
// files only), read from `dpkg-deb --fsys-tarfile`.
func payload(t *testing.T, deb string) map[string][]byte {
	t.Helper()
	return readTar(t, run(t, ".", "dpkg-deb", "--fsys-tarfile", deb))
}

func control(t *testing.T, deb string) map[string][]byte {
	t.Helper()
	return readTar(t, run(t, ".", "dpkg-deb", "--ctrl-tarfile", deb))
}

func readTar(t *testing.T, data string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(strings.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[strings.TrimPrefix(h.Name, ".")] = b
	}
}

func gunzip(t *testing.T, name string, b []byte) string {
	t.Helper()
	r, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("%s: not gzip: %v", name, err)
	}
	if r.Name != "" || !r.ModTime.IsZero() {
		t.Errorf("%s: gzip header keeps name %q / time %v; want gzip -n", name, r.Name, r.ModTime)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return string(out)
}

func TestDebContents(t *testing.T) {
	b := buildDeb(t, "amd64")
	if want := "cohort_" + b.version + "_amd64.deb"; filepath.Base(b.path) != want {
		t.Errorf("package file %s, want dist/%s", b.path, want)
	}
	files := contents(t, b.path)

	want := map[string]string{
		"/usr/bin/cohort": "-rwxr-xr-x",
		"/usr/lib/systemd/system-generators/cohort-generator": "-rwxr-xr-x",
		"/etc/cohort":                                   "drwxr-xr-x",
		"/etc/cohort/example.toml.sample":               "-rw-r--r--",
		"/usr/share/man/man1/cohort.1.gz":               "-rw-r--r--",
		"/usr/share/man/man5/cohort.toml.5.gz":          "-rw-r--r--",
		"/usr/share/man/man8/cohort-generator.8.gz":     "-rw-r--r--",
		"/usr/share/bash-completion/completions/cohort": "-rw-r--r--",
		"/usr/share/cohort/node-preload.js":             "-rw-r--r--",
		"/usr/share/doc/cohort/copyright":               "-rw-r--r--",
		"/usr/share/doc/cohort/changelog.gz":            "-rw-r--r--",
		"/usr/share/lintian/overrides/cohort":           "-rw-r--r--",
	}
	for path, mode := range want {
		e, ok := files[path]
		if !ok {
			t.Errorf("%s is not in the package", path)
			continue
		}
		if e.mode != mode {
			t.Errorf("%s: mode %s, want %s", path, e.mode, mode)
		}
	}
	for path, e := range files {
		if e.owner != "root/root" {
			t.Errorf("%s: owner %s, want root/root", path, e.owner)
		}
		if strings.HasPrefix(path, "/etc/cohort/") && strings.HasSuffix(path, ".toml") {
			t.Errorf("%s would be read by the generator: the example must not be active", path)
		}
		if strings.HasPrefix(e.mode, "-") && want[path] == "" {
			t.Errorf("unexpected file %s in the package", path)
		}
		if len(e.mode) == 10 && (e.mode[5] == 'w' || e.mode[8] == 'w') {
			t.Errorf("%s: mode %s is group- or world-writable", path, e.mode)
		}
	}

	data := payload(t, b.path)
	for _, page := range []struct{ path, th string }{
		{"/usr/share/man/man1/cohort.1.gz", `.TH "COHORT" "1"`},
		{"/usr/share/man/man5/cohort.toml.5.gz", `.TH "COHORT.TOML" "5"`},
		{"/usr/share/man/man8/cohort-generator.8.gz", `.TH "COHORT-GENERATOR" "8"`},
	} {
		roff := gunzip(t, page.path, data[page.path])
		if !strings.HasPrefix(strings.TrimSpace(roff), page.th) && !strings.Contains(roff, "\n"+page.th) {
			t.Errorf("%s: no title line %s", page.path, page.th)
		}
		if !strings.Contains(roff, ".SH NAME") || !strings.Contains(roff, `\- `) {
			t.Errorf("%s: no NAME section with a whatis line (name \\- description)", page.path)
		}
		if !strings.Contains(roff, "cohort "+b.version) {
			t.Errorf("%s: title line does not carry the version %s", page.path, b.version)
		}
	}

	changelog := gunzip(t, "changelog.gz", data["/usr/share/doc/cohort/changelog.gz"])
	if first := strings.SplitN(changelog, "\n", 2)[0]; !regexp.MustCompile(`^cohort \(` + regexp.QuoteMeta(b.version) + `\) [a-z-]+; urgency=[a-z]+$`).MatchString(first) {
		t.Errorf("changelog starts with %q, want a Debian changelog entry for %s", first, b.version)
	}
	if !regexp.MustCompile(`(?m)^ -- .+ <.+@.+>  \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$`).MatchString(changelog) {
		t.Errorf("changelog has no valid trailer line:\n%s", changelog)
	}

	copyright := string(data["/usr/share/doc/cohort/copyright"])
	if !strings.HasPrefix(copyright, "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n") {
		t.Error("copyright is not a machine-readable (DEP-5) file")
	}
	if !strings.Contains(copyright, "Files: *\nCopyright: ") || !regexp.MustCompile(`(?m)^Files: \*\n.*\nLicense: Apache-2.0$`).MatchString(copyright) {
		t.Error("copyright: cohort itself (Files: *) is not Apache-2.0")
	}

	completion := string(data["/usr/share/bash-completion/completions/cohort"])
	if !strings.Contains(completion, "complete -F _cohort cohort") {
		t.Error("bash completion does not register _cohort for cohort")
	}

	for _, bin := range []string{"/usr/bin/cohort", "/usr/lib/systemd/system-generators/cohort-generator"} {
		f, err := elf.NewFile(bytes.NewReader(data[bin]))
		if err != nil {
			t.Errorf("%s: not ELF: %v", bin, err)
			continue
		}
		if f.Machine != elf.EM_X86_64 {
			t.Errorf("%s: machine %v in the amd64 package", bin, f.Machine)
		}
		if f.Section(".symtab") != nil {
			t.Errorf("%s: not stripped (.symtab present)", bin)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s: dynamically linked; want CGO_ENABLED=0", bin)
			}
		}
	}
}

func TestDebControl(t *testing.T) {
	b := buildDeb(t, "amd64")
	fields := map[string]string{}
	for _, f := range []string{"Package", "Version", "Architecture", "Depends", "Maintainer", "Section", "Priority", "Homepage", "Description"} {
		fields[f] = strings.TrimSpace(run(t, ".", "dpkg-deb", "-f", b.path, f))
	}
	for f, want := range map[string]string{
		"Package":      "cohort",
		"Version":      b.version,
		"Architecture": "amd64",
		"Depends":      "systemd (>= 252)",
	} {
		if fields[f] != want {
			t.Errorf("%s: %q, want %q", f, fields[f], want)
		}
	}
	for _, f := range []string{"Maintainer", "Section", "Priority", "Homepage", "Description"} {
		if fields[f] == "" {
			t.Errorf("control field %s is empty", f)
		}
	}

	ctrl := control(t, b.path)
	if got := strings.TrimSpace(string(ctrl["/conffiles"])); got != "/etc/cohort/example.toml.sample" {
		t.Errorf("conffiles = %q, want only the example", got)
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		body := string(ctrl["/"+s])
		if !strings.HasPrefix(body, "#!/bin/sh\n") || !regexp.MustCompile(`(?m)^set -e`).MatchString(body) {
			t.Errorf("%s: want a POSIX sh script with set -e", s)
		}
		if !strings.Contains(body, "[ -d /run/systemd/system ]") {
			t.Errorf("%s: calls systemctl without checking that systemd runs", s)
		}
	}
	if !strings.Contains(string(ctrl["/postrm"]), "/etc/cohort") || strings.Contains(string(ctrl["/postrm"]), "rm -rf /etc/cohort") {
		t.Error("postrm must keep users' app files in /etc/cohort on purge")
	}
}

// TestCopyrightCoversModules fails when a module linked into the binaries
// is missing from the copyright file: go.mod gained a dependency and
// packaging/copyright was not told.
func TestCopyrightCoversModules(t *testing.T) {
	b := buildDeb(t, "amd64")
	data := payload(t, b.path)
	copyright := string(data["/usr/share/doc/cohort/copyright"])
	for _, bin := range []string{"/usr/bin/cohort", "/usr/lib/systemd/system-generators/cohort-generator"} {
		info, err := buildinfo.Read(bytes.NewReader(data[bin]))
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		for _, dep := range info.Deps {
			path := dep.Path
			if dep.Replace != nil {
				path = dep.Replace.Path
			}
			// "github.com/coreos/go-systemd/v22" is listed as
			// "github.com/coreos/go-systemd/*".
			base := regexp.MustCompile(`/v\d+$`).ReplaceAllString(path, "")
			if !strings.Contains(copyright, "Files: "+base+"/*") && !strings.Contains(copyright, " "+base+"/*") {
				t.Errorf("%s links %s, which packaging/copyright does not cover (add a Files: %s/* paragraph)", bin, dep.Path, base)
			}
		}
	}
}

// TestExampleIsValid uncomments the example app file and runs the packaged
// cohort check on it, so that the example cannot drift from the format.
func TestExampleIsValid(t *testing.T) {
	if runtime.GOARCH != "amd64" || runtime.GOOS != "linux" {
		t.Skip("runs the amd64 binary")
	}
	b := buildDeb(t, "amd64")
	data := payload(t, b.path)
	dir := t.TempDir()
	bin := filepath.Join(dir, "cohort")
	if err := os.WriteFile(bin, data["/usr/bin/cohort"], 0o755); err != nil {
		t.Fatal(err)
	}
	var app strings.Builder
	keys := 0
	for _, line := range strings.Split(string(data["/etc/cohort/example.toml.sample"]), "\n") {
		// "#key = value" and "#[[table]]" are settings; "# text" is prose.
		if strings.HasPrefix(line, "#") && len(line) > 1 && line[1] != ' ' && line[1] != '#' {
			line = line[1:]
			keys++
		}
		app.WriteString(line + "\n")
	}
	if keys < 3 {
		t.Fatalf("the example has only %d commented settings", keys)
	}
	file := filepath.Join(dir, "example.toml")
	if err := os.WriteFile(file, []byte(app.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// --offline: the example names /srv/web/server.js and node, which
	// are not on the machine that builds the package.
	out, err := exec.Command(bin, "check", "--offline", file).CombinedOutput()
	if err != nil {
		t.Errorf("cohort check on the uncommented example: %v\n%s\n%s", err, out, app.String())
	}
}

func TestLintian(t *testing.T) {
	need(t, "lintian")
	b := buildDeb(t, "amd64")
	// Errors and warnings fail; the overrides in packaging/lintian-overrides
	// carry their reasons.
	out, err := exec.Command("lintian", "--fail-on", "error,warning", b.path).CombinedOutput()
	if err != nil {
		t.Errorf("lintian %s: %v\n%s", b.path, err, out)
	}
}

func TestMaintainerScriptsShellcheck(t *testing.T) {
	need(t, "shellcheck")
	out, err := exec.Command("shellcheck", "-s", "sh", "postinst", "prerm", "postrm", "build-deb.sh").CombinedOutput()
	if err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
	out, err = exec.Command("shellcheck", "-s", "bash", "bash-completion/cohort").CombinedOutput()
	if err != nil {
		t.Errorf("shellcheck bash-completion/cohort: %v\n%s", err, out)
	}
}

func TestArm64(t *testing.T) {
	b := buildDeb(t, "arm64")
	if got := strings.TrimSpace(run(t, ".", "dpkg-deb", "-f", b.path, "Architecture")); got != "arm64" {
		t.Errorf("Architecture: %q, want arm64", got)
	}
	if !strings.HasSuffix(b.path, "_arm64.deb") {
		t.Errorf("package file %s, want …_arm64.deb", b.path)
	}
	data := payload(t, b.path)
	for _, bin := range []string{"/usr/bin/cohort", "/usr/lib/systemd/system-generators/cohort-generator"} {
		f, err := elf.NewFile(bytes.NewReader(data[bin]))
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		if f.Machine != elf.EM_AARCH64 {
			t.Errorf("%s: machine %v in the arm64 package", bin, f.Machine)
		}
	}
}
