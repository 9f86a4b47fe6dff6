package packaging

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/cohort-dev/cohort/internal/testtool"
)

// needOrFail ends t with testtool.Missing (a skip, a failure under CI)
// unless ok: for needs that are not one program on PATH.
func needOrFail(t *testing.T, why string, ok bool) {
	t.Helper()
	if !ok {
		testtool.Missing(t, "%s", why)
	}
}

func lookPath(name string) bool {
	_, err := exec.LookPath(name)
	return err == nil
}

// TestManPages renders the three man pages with packaging/build-man.sh,
// the script build-deb.sh packages them with, and reads each through
// `MANWIDTH=80 man --warnings -l`: troff must not warn (on e0fea87 the
// key tables of cohort.toml(5) gave "can't break line"), and no table may
// be wider than the 80 columns (tbl says nothing when one is).
func TestManPages(t *testing.T) {
	needOrFail(t, "man and groff are needed (apt-get install man-db groff-base)", lookPath("man") && lookPath("tbl") && lookPath("nroff"))
	root := repoRoot(t)
	out := t.TempDir()
	run(t, root, filepath.Join(root, "packaging", "build-man.sh"), out, "test")
	for _, page := range []string{"cohort.1", "cohort-generator.8", "cohort.toml.5"} {
		t.Run(page, func(t *testing.T) {
			cmd := exec.Command("man", "--warnings", "-l", filepath.Join(out, page))
			cmd.Env = append(os.Environ(), "MANWIDTH=80", "MAN_KEEP_FORMATTING=", "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "MANPAGER=cat", "PAGER=cat")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("man -l %s: %v\n%s", page, err, stderr.String())
			}
			if stderr.Len() > 0 {
				t.Errorf("man --warnings at 80 columns:\n%s", stderr.String())
			}
			if !strings.Contains(stdout.String(), "NAME") {
				t.Fatalf("no NAME section rendered:\n%s", stdout.String())
			}
			for i, line := range strings.Split(stdout.String(), "\n") {
				if strings.ContainsAny(line, "│┌└├") && utf8.RuneCountInString(line) > 80 {
					t.Errorf("line %d: a table %d columns wide: %s", i+1, utf8.RuneCountInString(line), line)
				}
			}
		})
	}
}
