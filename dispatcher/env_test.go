package dispatcher

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/appfile"
)

func TestBaseEnv(t *testing.T) {
	dir := t.TempDir()
	envFile := filepath.Join(dir, "env")
	os.WriteFile(envFile, []byte("# comment\nA=from-file\nQ=\"quoted \\\"x\\\"\"\n; also comment\nLONG=one \\\ntwo\n"), 0o644)
	app := appfile.New("e")
	app.Environment = map[string]string{"A": "from-toml", "B": "b"}
	app.EnvironmentFiles = []string{envFile, "-" + filepath.Join(dir, "missing")}
	env, err := baseEnv([]string{"PATH=/bin", "NOTIFY_SOCKET=/x", "LISTEN_FDS=1", "A=inherited", "WATCHDOG_USEC=1"}, app)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"PATH": "/bin", "A": "from-file", "B": "b", "Q": `quoted "x"`, "LONG": "one two"}
	for k, v := range want {
		if got := envValue(env, k); got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC"} {
		if envValue(env, k) != "" {
			t.Errorf("%s leaked", k)
		}
	}
	app.EnvironmentFiles = []string{filepath.Join(dir, "missing")}
	if _, err := baseEnv(nil, app); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing required file: %v", err)
	}
}
