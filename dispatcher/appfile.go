package dispatcher

import (
	"context"
	"os"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/appfile"
)

// The app file watch: the dispatcher runs the configuration it was
// started or last reloaded with, and under systemd that is a recorded copy
// (see package running), so an edit that breaks the app file changes
// nothing that runs. It is still worth saying: a goroutine of Run checks
// the file every appFileInterval, off the supervision loop, and the loop
// puts its first problem into the status line (STATUS=, `systemctl
// status`, `cohort status`) until the file validates again.

// appFileInterval is how often the app file is checked; it is re-read
// only when its size, times or inode changed.
const appFileInterval = 2 * time.Second

// fileIdentity is what tells a changed file from an unchanged one without
// reading it.
type fileIdentity struct {
	ok           bool
	dev, ino     uint64
	size         int64
	mtime, ctime syscall.Timespec
}

func identify(path string) fileIdentity {
	fi, err := os.Stat(path)
	if err != nil {
		return fileIdentity{}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileIdentity{ok: true, size: fi.Size()}
	}
	return fileIdentity{ok: true, dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// checkAppFile returns the first problem of the app file at path, "" when
// it validates. Reads are bounded (appfile.ParseFile).
func checkAppFile(path string) string {
	_, err := appfile.ParseFile(path)
	return appfile.Summary(err)
}

// watchAppFile sends the app file's first problem ("" when it validates)
// on out whenever it changes, starting with the state at start, until ctx
// is done. Run owns the goroutine that runs it.
func watchAppFile(ctx context.Context, path string, out chan<- string) {
	tick := time.NewTicker(appFileInterval)
	defer tick.Stop()
	var seen fileIdentity
	last, first := "", true
	for {
		if id := identify(path); first || id != seen {
			seen = id
			problem := checkAppFile(path)
			if first || problem != last {
				select {
				case out <- problem:
				case <-ctx.Done():
					return
				}
				last, first = problem, false
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

// appFileStatus is what the status line says about a broken app file.
func (d *dispatcher) appFileStatus() string {
	if d.fileProblem == "" {
		return ""
	}
	return " · config: " + d.fileProblem + "; running the last good configuration"
}
