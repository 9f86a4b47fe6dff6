// Package running keeps the running configuration of each app: a copy of
// the app file as it was when the app was last started or reloaded, in
// /run/cohort-running/<app>.toml.
//
// systemd wipes the generators' output before every daemon-reload, so the
// generator cannot remember what it rendered; when an app file stops
// validating while its app runs, it renders the units from this copy
// instead, and the running app keeps its sockets. Because the generator
// (root) renders units from it, only root may write it: the copy is
// written by the units' privileged ExecStartPre= and ExecReload= ("+"),
// never by the dispatcher or a worker, which run as the service's user
// and could otherwise choose user = "root" and a command.
//
// A snapshot holds the exact bytes that were validated. It is replaced
// atomically (write a temporary file in the same directory, rename), so a
// reader sees the old copy or the new one, never half of either.
package running

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// Dir is where the snapshots live. /run is a tmpfs: at boot there is
// none, and a bad app file is skipped as if cohort had never run it.
const Dir = "/run/cohort-running"

// ErrNone is returned (wrapped) when an app has no snapshot.
var ErrNone = errors.New("no running configuration recorded")

// Path is the snapshot of app in dir.
func Path(dir, app string) string { return filepath.Join(dir, app+".toml") }

// candidatePath is the configuration a reload in progress is trying; it
// becomes the snapshot when the reload succeeded. App names never end in
// ".toml.next" files of another app: every snapshot ends in ".toml".
func candidatePath(dir, app string) string { return filepath.Join(dir, app+".toml.next") }

// ReadApp reads and validates the app file at path once, and returns the
// exact bytes it validated with the App, so that what is recorded is what
// was checked (no second read that could see another file). The App's
// Path is absolute, as with appfile.ParseFile.
func ReadApp(path string) ([]byte, *appfile.App, error) {
	data, err := appfile.ReadRegularFile(path, appfile.MaxFileSize)
	if err != nil {
		return nil, nil, fmt.Errorf("read app file: %w", err)
	}
	app, err := parse(path, data)
	if err != nil {
		return nil, nil, err
	}
	return data, app, nil
}

// parse validates data as the contents of the app file at path.
func parse(path string, data []byte) (*appfile.App, error) {
	app, err := appfile.Parse(path, data)
	if err != nil {
		return nil, err
	}
	if app.Path, err = filepath.Abs(path); err != nil {
		return nil, fmt.Errorf("app file %s: %w", path, err)
	}
	return app, nil
}

// Read returns app's snapshot in dir; an error wrapping ErrNone when
// there is none. It refuses a directory or a file that someone other than
// root (or the reader itself) owns or may write.
func Read(dir, app string) ([]byte, error) {
	return readTrusted(dir, Path(dir, app), app)
}

// Load returns app's snapshot parsed as the app file at path: the App
// names path (SourcePath=, messages), its contents are the snapshot's.
// An error wraps ErrNone when there is no snapshot.
func Load(dir, path string) (*appfile.App, error) {
	name := appfile.AppName(path)
	data, err := Read(dir, name)
	if err != nil {
		return nil, err
	}
	return parseSnapshot(path, data)
}

// LoadCandidate is Load for a reload: the configuration dispatch-reload
// validated for the reload in progress when there is one, else the
// snapshot.
func LoadCandidate(dir, path string) (*appfile.App, error) {
	name := appfile.AppName(path)
	data, err := readTrusted(dir, candidatePath(dir, name), name)
	if errors.Is(err, ErrNone) {
		return Load(dir, path)
	}
	if err != nil {
		return nil, err
	}
	return parseSnapshot(path, data)
}

func parseSnapshot(path string, data []byte) (*appfile.App, error) {
	app, err := parse(path, data)
	if err != nil {
		// Validated when it was recorded; a newer cohort may be
		// stricter.
		return nil, fmt.Errorf("the running configuration of %s no longer validates: %w", appfile.AppName(path), err)
	}
	return app, nil
}

func readTrusted(dir, file, app string) ([]byte, error) {
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Lstat(file, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%s: %w", app, ErrNone)
		}
		return nil, &os.PathError{Op: "lstat", Path: file, Err: err}
	}
	if err := trusted(file, &st, unix.S_IFREG); err != nil {
		return nil, err
	}
	return appfile.ReadRegularFile(file, appfile.MaxFileSize)
}

// checkDir reports an error when dir is missing (ErrNone), not a
// directory, or writable by someone untrusted.
func checkDir(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%s: %w", dir, ErrNone)
		}
		return &os.PathError{Op: "lstat", Path: dir, Err: err}
	}
	return trusted(dir, &st, unix.S_IFDIR)
}

// overflowUID is the owner that files of uids outside a user namespace
// show inside it (/proc/sys/kernel/overflowuid, 65534 by default): what
// root's files look like to a dispatcher with PrivateUsers=yes.
const overflowUID = 65534

// trusted checks that path (st from lstat) is of kind, owned by root or
// by the caller, and writable by no one else. A caller other than root
// also accepts the overflow uid, which is root seen from a user
// namespace (hardening = "strict" has PrivateUsers=yes).
func trusted(path string, st *unix.Stat_t, kind uint32) error {
	if st.Mode&unix.S_IFMT != kind {
		return fmt.Errorf("%s: not a %s; ignored", path, map[uint32]string{unix.S_IFREG: "regular file", unix.S_IFDIR: "directory"}[kind])
	}
	euid := uint32(os.Geteuid())
	if st.Uid != 0 && st.Uid != euid && (euid == 0 || st.Uid != overflowUID) {
		return fmt.Errorf("%s: owned by uid %d, not root; ignored", path, st.Uid)
	}
	if st.Mode&0o022 != 0 {
		return fmt.Errorf("%s: writable by group or others (mode %04o); ignored", path, st.Mode&0o7777)
	}
	return nil
}

// Write makes data app's snapshot in dir (created 0755 if missing), and
// drops a leftover candidate.
func Write(dir, app string, data []byte) error {
	if err := writeAtomic(dir, Path(dir, app), data); err != nil {
		return err
	}
	return removeIfExists(candidatePath(dir, app))
}

// WriteCandidate records data as the configuration of the reload about
// to start; Promote or Discard ends it.
func WriteCandidate(dir, app string, data []byte) error {
	return writeAtomic(dir, candidatePath(dir, app), data)
}

// Promote makes the candidate the snapshot (the reload succeeded).
func Promote(dir, app string) error {
	if err := checkDir(dir); err != nil {
		return err
	}
	if err := os.Rename(candidatePath(dir, app), Path(dir, app)); err != nil {
		return fmt.Errorf("record the running configuration of %s: %w", app, err)
	}
	return nil
}

// Discard drops the candidate (the reload failed: the snapshot stays).
func Discard(dir, app string) error {
	return removeIfExists(candidatePath(dir, app))
}

// Remove drops app's snapshot and candidate (the app stopped). No
// snapshot is not an error.
func Remove(dir, app string) error {
	return errors.Join(removeIfExists(Path(dir, app)), removeIfExists(candidatePath(dir, app)))
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func writeAtomic(dir, path string, data []byte) error {
	switch err := os.Mkdir(dir, 0o755); {
	case err == nil:
		// The umask (the service's UMask=0027 applies to "+" commands
		// too) must not keep the dispatcher, which runs as the
		// service's user, from reading its snapshot.
		if err := os.Chmod(dir, 0o755); err != nil {
			return fmt.Errorf("running configuration directory: %w", err)
		}
	case !errors.Is(err, fs.ErrExist):
		return fmt.Errorf("running configuration directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("record the running configuration: %w", err)
	}
	tmp := f.Name()
	err = f.Chmod(0o644)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("record the running configuration in %s: %w", path, err)
	}
	return nil
}

// KeepMessage is what is logged when a broken app file is set aside for
// the running configuration: "web.toml:2:1: unknown key "wokers" (did you
// mean "workers"?); keeping the running configuration of web".
func KeepMessage(err error, app string) string {
	return appfile.Summary(err) + "; keeping the running configuration of " + app
}
