package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
	"golang.org/x/sys/unix"
)

// Tree is a subtree a supervisor owns: its workers' cgroups are made in
// Base, and the supervisor itself sits in a leaf of its own beside them
// (cgroup v2 lets a cgroup hold processes or enable controllers for its
// children, not both: "no internal processes").
type Tree struct {
	// Base is where worker cgroups are made.
	Base string
	// Controllers are those enabled for Base's children (its
	// cgroup.subtree_control once Prepare is done): what limits can use.
	Controllers []string
	// EnableErr is why some controller that Base has could not be
	// enabled for its children; nil when none failed.
	EnableErr error

	leaf    string   // the leaf Prepare moved this process into; "" when it was there already
	enabled []string // what Prepare enabled, for Close
}

// All are the controllers a Tree can enable for its workers, those
// WriteLimits and the readers use.
var All = []string{Memory, CPU, Pids}

// Prepare makes a Tree out of self, the cgroup this process is in, with
// the supervisor's leaf named leaf. When self is already called leaf,
// systemd put this process there (DelegateSubgroup=, systemd ≥ 254) and
// Base is its parent. Otherwise this process must be alone in self (what
// systemd ≥ 252 gives a Delegate=yes service's main process, and a
// container with its own cgroup namespace its init): it moves itself into
// self/leaf and Base is self. Then the controllers of want (a subset of
// All) that Base has are enabled for its children.
//
// Prepare fails when the subtree cannot be used: self is shared with
// other processes, or it is not writable (no Delegate=, or
// ProtectControlGroups= made /sys/fs/cgroup read-only).
func Prepare(self, leaf string, want []string) (*Tree, error) {
	if err := checkName(leaf); err != nil {
		return nil, err
	}
	t := &Tree{Base: self}
	if filepath.Base(self) == leaf {
		t.Base = filepath.Dir(self)
	} else {
		dir, err := EnterLeaf(self, leaf)
		if err != nil {
			return nil, err
		}
		t.leaf = dir
	}
	if err := unix.Access(t.Base, unix.W_OK); err != nil {
		t.Close()
		return nil, fmt.Errorf("cgroup %s is not writable: %w", t.Base, err)
	}
	have, err := Controllers(t.Base)
	if err != nil {
		t.Close()
		return nil, err
	}
	on, err := SubtreeControl(t.Base)
	if err != nil {
		t.Close()
		return nil, err
	}
	for _, c := range want {
		if !slices.Contains(have, c) || slices.Contains(on, c) {
			continue
		}
		if err := Enable(t.Base, []string{c}); err != nil {
			t.EnableErr = errors.Join(t.EnableErr, err)
			continue
		}
		t.enabled = append(t.enabled, c)
	}
	if t.Controllers, err = SubtreeControl(t.Base); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// Close undoes Prepare: it disables the controllers it enabled and, when
// it moved this process into its leaf, moves it back and removes the
// leaf (LeaveLeaf). The worker cgroups must be gone by then.
func (t *Tree) Close() error {
	err := Disable(t.Base, t.enabled)
	if err == nil && t.leaf != "" {
		err = LeaveLeaf(t.leaf)
	}
	t.leaf, t.enabled = "", nil
	return err
}

// EnterLeaf moves this process, which must be alone in its cgroup self,
// into self/leaf (made if need be) and returns that directory: self can
// then enable controllers for its children, which a cgroup holding a
// process cannot. `cohort run`'s parent process enters the leaf before
// it starts the dispatcher, which then finds itself there, as under
// systemd's DelegateSubgroup=.
func EnterLeaf(self, leaf string) (string, error) {
	if err := checkName(leaf); err != nil {
		return "", err
	}
	pids, err := Procs(self)
	if err != nil {
		return "", fmt.Errorf("cgroup %s: %w", self, err)
	}
	if others := slices.DeleteFunc(pids, func(p int) bool { return p == os.Getpid() }); len(others) > 0 {
		pid := strconv.Itoa(others[0])
		if others[0] == 0 {
			pid = "0: outside this pid namespace"
		}
		return "", fmt.Errorf("cgroup %s holds %d other processes (pid %s…): workers need a cgroup subtree of their own (a systemd service with Delegate=yes, or a container with its own cgroup namespace)", self, len(others), pid)
	}
	dir := filepath.Join(self, leaf)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("cgroup %s is not writable: %w", self, err)
	}
	if err := MoveSelf(dir); err != nil {
		Remove(dir)
		return "", fmt.Errorf("cgroup %s: move into a leaf of its own: %w", self, err)
	}
	return dir, nil
}

// LeaveLeaf undoes EnterLeaf: it moves this process back into the
// leaf's parent and removes the leaf (which fails while other processes
// are still in it). The parent must enable no controllers by then.
func LeaveLeaf(dir string) error {
	if err := MoveSelf(filepath.Dir(dir)); err != nil {
		return err
	}
	return Remove(dir)
}

// checkName accepts a single cgroup directory name that cannot be taken
// for an interface file ("cgroup.procs", "memory.max").
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/.\x00\n") || len(name) > 200 {
		return fmt.Errorf("cgroup name %q: want a single name without dots", name)
	}
	return nil
}

// NewWorker makes the cgroup Base/name for one worker process with l's
// limits written into it, and opens it for CLONE_INTO_CGROUP; the caller
// closes f once the process is forked, and calls Release when it has
// been reaped. Nothing is left behind on error.
func (t *Tree) NewWorker(name string, l appfile.Limits) (dir string, f *os.File, err error) {
	if err := checkName(name); err != nil {
		return "", nil, err
	}
	dir = filepath.Join(t.Base, name)
	if err := Create(dir); err != nil {
		return "", nil, err
	}
	if err = WriteLimits(dir, l, t.Controllers); err == nil {
		f, err = Open(dir)
	}
	if err != nil {
		Remove(dir)
		return "", nil, err
	}
	return dir, f, nil
}

// Release kills what is left in a worker's cgroup dir and removes it.
// Removal fails with EBUSY (Busy) while the killed processes are still
// exiting: the caller retries.
func Release(dir string) error {
	// A failed kill (cgroup.kill is missing before Linux 5.14, the
	// cgroup is gone) shows as Remove's error, which is what counts.
	Kill(dir)
	return Remove(dir)
}

// Busy says whether err is Remove's EBUSY: the cgroup still holds
// processes or child cgroups.
func Busy(err error) bool { return errors.Is(err, unix.EBUSY) }
