package dispatcher

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/internal/envfile"
)

// privateEnv are variables of the dispatcher's own environment that
// describe the dispatcher, not its workers; they are never passed on.
var privateEnv = map[string]bool{
	"LISTEN_PID":          true,
	"LISTEN_FDS":          true,
	"LISTEN_FDNAMES":      true,
	"NOTIFY_SOCKET":       true,
	"WATCHDOG_USEC":       true,
	"WATCHDOG_PID":        true,
	"JOURNAL_STREAM":      true, // the workers' stdout is a pipe to the dispatcher
	"SYSTEMD_EXEC_PID":    true,
	"COHORT_RR_LISTENERS": true, // round-robin mode sets the workers' own
	"COHORT_CPUS":         true, // the dispatcher sets its workers' own
	ListenPortsEnv:        true, // socket modes set their workers' own
	WorkerPIDEnv:          true, // the trampoline sets each worker's own
	trampolineCgroupEnv:   true, // the trampoline's, never the command's
}

// baseEnv is the environment every worker of app starts from: inherited
// (without privateEnv), then app.Environment, then the environment files.
// It returns an error naming the file for an environment file that cannot
// be read, unless its name starts with "-" (systemd's "optional") and it
// does not exist or may not be read. A file that is not a regular file or
// holds more than appfile.MaxFileSize is an error even when optional
// (envfile.Read).
func baseEnv(inherited []string, app *appfile.App) ([]string, error) {
	env := newEnvList()
	for _, kv := range inherited {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || privateEnv[k] {
			continue
		}
		env.set(kv)
	}
	for k, v := range app.Environment {
		env.set(k + "=" + v)
	}
	dir := ""
	if app.Path != "" {
		dir = filepath.Dir(app.Path)
	}
	for _, name := range app.EnvironmentFiles {
		kvs, err := envfile.Read(name, dir)
		if err != nil {
			return nil, fmt.Errorf("environment_file: %w", err)
		}
		for _, kv := range kvs {
			env.set(kv)
		}
	}
	return env.list(), nil
}

// envList is an environment with unique keys that keeps first-set order.
type envList struct {
	idx map[string]int
	kvs []string
}

func newEnvList() *envList { return &envList{idx: map[string]int{}} }

func (e *envList) set(kv string) {
	k, _, _ := strings.Cut(kv, "=")
	if i, ok := e.idx[k]; ok {
		e.kvs[i] = kv
		return
	}
	e.idx[k] = len(e.kvs)
	e.kvs = append(e.kvs, kv)
}

func (e *envList) list() []string { return append([]string(nil), e.kvs...) }

// envValue returns the value of key in env ("" when unset).
func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath resolves a worker's command the way its own environment would:
// a name with a slash is taken relative to dir (the working directory),
// a bare name is searched in path (the worker's PATH).
func lookPath(name, path, dir string) (string, error) {
	if strings.Contains(name, "/") {
		if !filepath.IsAbs(name) {
			abs, err := filepath.Abs(filepath.Join(dir, name))
			if err != nil {
				return "", err
			}
			name = abs
		}
		return name, checkExecutable(name)
	}
	if path == "" {
		path = "/usr/local/bin:/usr/bin:/bin"
	}
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, name)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q: not found in PATH %s", name, path)
}

func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s: %w", p, fs.ErrPermission)
	}
	return nil
}
