package dispatcher

import (
	"fmt"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
)

// checkSpawnable refuses, before any worker is forked, a spec whose every
// fork would fail: a working directory that does not exist (or that this
// user cannot enter), and a NUL byte in an argument or an environment
// entry (execve cannot pass one; an environment_file can hold one). Such
// an error cannot heal by retrying, so Run fails at start and a reload
// fails with the old workers serving, instead of the slots retrying the
// fork forever with backoff.
func checkSpawnable(app *appfile.App, env []string) error {
	if err := appfile.CheckHost(app); err != nil {
		return err
	}
	for i, arg := range app.Command {
		if strings.IndexByte(arg, 0) >= 0 {
			return fmt.Errorf("command[%d] %q holds a NUL byte, which no program can be passed", i, arg)
		}
	}
	for _, kv := range env {
		if strings.IndexByte(kv, 0) >= 0 {
			k, _, _ := strings.Cut(kv, "=")
			return fmt.Errorf("environment variable %q holds a NUL byte, which no program can be passed (from an environment_file?)", k)
		}
	}
	return nil
}

// notifyName is the file name of the dispatcher's notify socket in its
// runtime directory, for a dispatcher with pid pid; r makes it unique.
// appfile.MaxAppName is derived from its longest form.
func notifyName(pid int, r uint32) string {
	return fmt.Sprintf("notify-%d-%08x.sock", pid, r)
}
