package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/dispatcher/control"
	"golang.org/x/sys/unix"
)

// Where an app's control socket is. A generated service has its
// RuntimeDirectory= at /run/cohort/APP. `cohort run` puts its runtime
// directory (control and notify sockets) at a place that `cohort status
// NAME` finds again without --socket:
//
//   - as root: /run/cohort/NAME, where the service of an app NAME would
//     have it, so that one name means one app on the host;
//   - otherwise: $XDG_RUNTIME_DIR/cohort/NAME (the user's own tmpfs,
//     which logind removes at logout);
//   - otherwise (no XDG_RUNTIME_DIR, as under su or cron):
//     /tmp/cohort-UID/NAME, under a directory that must be the user's
//     own, mode 0700, and no symlink: /tmp is everyone's, and a directory
//     planted there by another user would let them at the sockets.

// systemRoot is where the generated services' runtime directories are:
// appfile.RuntimeRoot, or env.runtimeRoot where a test set one, so that
// it sees none of the host's apps (another test's `cohort run` among
// them).
func (env *environment) systemRoot() string {
	if env.runtimeRoot != "" {
		return env.runtimeRoot
	}
	return filepath.Clean(appfile.RuntimeRoot)
}

// userRoot is the directory under which `cohort run` of the current user
// puts its apps' runtime directories, checked (see above) but not
// created.
func (env *environment) userRoot() (string, error) {
	if env.runtimeRoot != "" {
		return env.runtimeRoot, nil
	}
	if os.Geteuid() == 0 {
		return env.systemRoot(), nil
	}
	if x := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(x) {
		return filepath.Join(x, "cohort"), nil
	}
	return filepath.Join(os.TempDir(), "cohort-"+strconv.Itoa(os.Geteuid())), nil
}

// ensurePrivateDir creates dir (mode 0700) unless it exists, and checks
// that it is a directory of this user that nobody else can enter or
// write: not a symlink, owned by the euid, no group or other bits.
func ensurePrivateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("lstat %s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("%s is not a directory", dir)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s belongs to uid %d, not to this user (%d): remove it or set XDG_RUNTIME_DIR", dir, st.Uid, os.Geteuid())
	case st.Mode&0o077 != 0:
		return fmt.Errorf("%s has mode %04o; it must be 0700 (chmod 700 %s)", dir, st.Mode&0o7777, dir)
	}
	return nil
}

// runLock is the file in its runtime directory that a `cohort run` holds
// locked (flock) while it runs; it also tells its directory from a
// service's.
const runLock = "run.lock"

// runInstance is the runtime directory `cohort run` holds for one app
// name, locked for the life of the run.
type runInstance struct {
	dir     string
	lock    *os.File
	created bool // dir was made by this run: removed at its end
}

// claimRunDir takes the runtime directory of `cohort run` for name. It
// refuses when a dispatcher answers on its control socket there (another
// `cohort run`, or as root the service of the app of that name) or
// another `cohort run` holds its lock.
func (env *environment) claimRunDir(ctx context.Context, name string) (*runInstance, error) {
	root, err := env.userRoot()
	if err != nil {
		return nil, err
	}
	// The host's own root is shared with the services (0755); any other
	// must be private. A test's runtimeRoot is the latter.
	if root == filepath.Clean(appfile.RuntimeRoot) {
		if err := os.MkdirAll(root, 0o755); err != nil {
			return nil, fmt.Errorf("runtime directory: %w", err)
		}
	} else if err := ensurePrivateDir(root); err != nil {
		return nil, fmt.Errorf("runtime directory: %w", err)
	}
	dir := filepath.Join(root, name)
	sock := filepath.Join(dir, control.SocketName)
	if answers(ctx, sock) {
		return nil, fmt.Errorf("an app named %q is running already (its control socket %s answers: 'cohort status %s'); stop it, or choose another name with --name", name, sock, name)
	}
	created := true
	if err := os.Mkdir(dir, 0o700); errors.Is(err, os.ErrExist) {
		created = false
	} else if err != nil {
		return nil, fmt.Errorf("runtime directory: %w", err)
	}
	if err := ensurePrivateDir(dir); err != nil {
		return nil, fmt.Errorf("runtime directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, runLock), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("runtime directory: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("an app named %q is being started by another 'cohort run' (%s is locked); choose another name with --name", name, dir)
	}
	return &runInstance{dir: dir, lock: lock, created: created}, nil
}

// release removes what the run left in its directory: the directory when
// the run made it, else its lock and sockets.
func (r *runInstance) release() {
	if r.created {
		os.RemoveAll(r.dir)
	} else {
		os.Remove(filepath.Join(r.dir, control.SocketName))
		os.Remove(filepath.Join(r.dir, "run.lock"))
	}
	r.lock.Close()
}

// answers reports whether something accepts connections on the unix
// socket at path (within a second).
func answers(ctx context.Context, path string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) // someone's, not ours to take
	}
	c.Close()
	return true
}

// knownApp is an app `cohort status` can name: one with an app file on
// the search path (a generated service), a runtime directory with a
// control socket under /run/cohort, or a `cohort run` of this user.
type knownApp struct {
	Name   string `json:"app"`
	Source string `json:"source"` // "unit" or "run"
	Socket string `json:"socket"`
	File   string `json:"file,omitempty"`
}

// knownApps lists the apps on this host that status can show, by name.
func (env *environment) knownApps() []knownApp {
	byName := map[string]knownApp{}
	files, _ := appFiles(env, nil)
	for _, f := range files {
		n := appfile.AppName(f)
		byName[n] = knownApp{Name: n, Source: "unit", Socket: filepath.Join(env.systemRoot(), n, control.SocketName), File: f}
	}
	roots := []string{env.systemRoot()}
	if r, err := env.userRoot(); err == nil && !slices.Contains(roots, r) {
		roots = append(roots, r)
	}
	for _, root := range roots {
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			n := e.Name()
			sock := filepath.Join(root, n, control.SocketName)
			if !e.IsDir() || appfile.CheckAppName(n) != nil {
				continue
			}
			if _, err := os.Lstat(sock); err != nil {
				continue
			}
			src := "unit"
			if _, err := os.Lstat(filepath.Join(root, n, runLock)); err == nil {
				src = "run"
			}
			a, ok := byName[n]
			if ok && a.Source == "unit" && src == "unit" {
				a.Socket = sock
				byName[n] = a
			} else if !ok {
				byName[n] = knownApp{Name: n, Source: src, Socket: sock}
			}
		}
	}
	apps := make([]knownApp, 0, len(byName))
	for _, a := range byName {
		apps = append(apps, a)
	}
	slices.SortFunc(apps, func(a, b knownApp) int {
		if a.Name < b.Name {
			return -1
		}
		if a.Name > b.Name {
			return 1
		}
		return 0
	})
	return apps
}

// socketFor is where status looks for app's control socket: this user's
// `cohort run` of that name when there is one, else the service's.
func (env *environment) socketFor(app string) string {
	if root, err := env.userRoot(); err == nil {
		p := filepath.Join(root, app, control.SocketName)
		if _, err := os.Lstat(p); err == nil {
			return p
		}
	}
	return filepath.Join(env.systemRoot(), app, control.SocketName)
}
