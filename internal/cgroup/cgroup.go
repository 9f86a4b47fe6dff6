// Package cgroup is cohort's one handler of cgroup v2 files: finding this
// process's cgroup, making and removing cgroups, enabling controllers,
// writing limits, killing a cgroup's processes (cgroup.kill) and reading
// what the kernel counts in one (memory.current, memory.events, cpu.stat,
// pressure). Every read is bounded and every parser takes what the kernel
// writes and nothing else: a file that does not parse is an error, never
// a panic or a made-up figure.
//
// The files are handled here rather than with containerd/cgroups or
// runc's libcontainer: those bring D-Bus and systemd clients along, and
// what cohort needs is a dozen one-line files. internal/cpuset reads the
// CPU limits of v1 and v2 for workers = "auto" through this package's
// /proc/PID/cgroup and mountinfo parsers (ParseMemberships, ScanMounts).
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Bounds on what is read: a cgroup interface file is a line or a few
// dozen; mountinfo can be long in a container and is scanned a line at a
// time.
const (
	maxFile      = 16 << 10
	maxMountinfo = 4 << 20
	// MaxMountLine is the longest mountinfo line ScanMounts reads.
	MaxMountLine = 64 << 10
	// MaxProcs bounds how many pids Procs returns.
	MaxProcs = 1 << 16
)

// Controllers cohort uses, in the order they are enabled.
const (
	Memory = "memory"
	CPU    = "cpu"
	Pids   = "pids"
)

// ErrNoCgroup2 is a process with no cgroup v2 membership, or no cgroup2
// mount to reach it through.
var ErrNoCgroup2 = errors.New("no cgroup2 hierarchy")

// Self is the directory of this process's cgroup in the cgroup2
// hierarchy, as /proc/self/cgroup and /proc/self/mountinfo place it
// (/sys/fs/cgroup/… on a pure cgroup2 host, /sys/fs/cgroup/unified/… on a
// hybrid one).
func Self() (string, error) {
	cg, err := readFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	var v2 *Mount
	for _, m := range ScanMounts(io.LimitReader(f, maxMountinfo)) {
		if m.V2 {
			v2 = &m
			break
		}
	}
	if v2 == nil {
		return "", fmt.Errorf("/proc/self/mountinfo: %w mounted", ErrNoCgroup2)
	}
	p, ok := ParseProcCgroup(cg)
	if !ok {
		return "", fmt.Errorf("/proc/self/cgroup: %w membership", ErrNoCgroup2)
	}
	return Join(v2.Point, v2.Root, p)
}

// Membership is one line of /proc/PID/cgroup, "ID:CONTROLLERS:PATH": the
// cgroup's path in the v1 hierarchy of those controllers, or, with none,
// in the cgroup2 hierarchy.
type Membership struct {
	Controllers []string // nil for cgroup2; a named v1 hierarchy is "name=systemd"
	Path        string
}

// ParseMemberships parses /proc/PID/cgroup, skipping malformed lines and
// paths that are not absolute.
func ParseMemberships(s string) []Membership {
	var out []Membership
	for line := range strings.Lines(s) {
		_, rest, ok := strings.Cut(strings.TrimSuffix(line, "\n"), ":")
		if !ok {
			continue
		}
		ctl, p, ok := strings.Cut(rest, ":")
		if !ok || !strings.HasPrefix(p, "/") {
			continue
		}
		var c []string
		if ctl != "" {
			c = strings.Split(ctl, ",")
		}
		out = append(out, Membership{Controllers: c, Path: p})
	}
	return out
}

// ParseProcCgroup returns the cgroup2 path of /proc/PID/cgroup (its
// "0::PATH" line); ok is false when there is none.
func ParseProcCgroup(s string) (string, bool) {
	for _, m := range ParseMemberships(s) {
		if m.Controllers == nil {
			return m.Path, true
		}
	}
	return "", false
}

// Join is the directory of the cgroup path p (from /proc/PID/cgroup) in a
// cgroup2 hierarchy whose directory root is mounted at mount. A path with
// "." or ".." components, or outside root (hidden by a cgroup namespace),
// is an error.
func Join(mount, root, p string) (string, error) {
	for c := range strings.SplitSeq(p, "/") {
		if c == "." || c == ".." {
			return "", fmt.Errorf("cgroup path %q: not canonical", p)
		}
	}
	root = strings.TrimSuffix(root, "/")
	if p != root && !strings.HasPrefix(p, root+"/") && root != "" {
		return "", fmt.Errorf("cgroup %q is not under the mounted cgroup2 root %q", p, root)
	}
	return filepath.Join(mount, strings.TrimPrefix(p, root)), nil
}

// Mount is a cgroup (v1) or cgroup2 mount of /proc/PID/mountinfo.
type Mount struct {
	Root, Point string // the hierarchy's directory that is mounted, and where
	V2          bool
	Options     []string // super options: a v1 hierarchy's controllers are among them
}

// ScanMounts reads mountinfo a line at a time for its cgroup mounts; a
// line over 64 KiB ends the scan (what came before stands). The caller
// bounds r.
func ScanMounts(r io.Reader) []Mount {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), MaxMountLine)
	for sc.Scan() {
		if m, ok := ParseMountLine(sc.Text()); ok {
			out = append(out, m)
		}
	}
	return out
}

// ParseMountLine parses one mountinfo line, "36 35 98:0 ROOT POINT OPTS
// [OPTIONAL…] - TYPE SOURCE SUPEROPTS", when TYPE is cgroup or cgroup2.
// The kernel writes ROOT and POINT absolute and POINT canonical; a line
// that does not is not the kernel's.
func ParseMountLine(line string) (Mount, bool) {
	pre, post, ok := strings.Cut(line, " - ")
	if !ok {
		return Mount{}, false
	}
	f, g := strings.Fields(pre), strings.Fields(post)
	if len(f) < 6 || len(g) < 3 || (g[0] != "cgroup" && g[0] != "cgroup2") {
		return Mount{}, false
	}
	root, ok1 := unescape(f[3])
	point, ok2 := unescape(f[4])
	if !ok1 || !ok2 || !strings.HasPrefix(root, "/") || !strings.HasPrefix(point, "/") || filepath.Clean(point) != point {
		return Mount{}, false
	}
	return Mount{Root: root, Point: point, V2: g[0] == "cgroup2", Options: strings.Split(g[2], ",")}, true
}

// unescape undoes mountinfo's octal escapes (\040 for a space, \134 for
// a backslash); a malformed escape makes the field unusable.
func unescape(s string) (string, bool) {
	if !strings.Contains(s, `\`) {
		return s, true
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+4 > len(s) {
			return "", false
		}
		n, err := strconv.ParseUint(s[i+1:i+4], 8, 8)
		if err != nil {
			return "", false
		}
		b.WriteByte(byte(n))
		i += 3
	}
	return b.String(), true
}

// readFile reads a whole interface file, refusing one over maxFile and
// anything that is not a regular file or a kernfs/proc pseudo-file.
func readFile(name string) (string, error) {
	f, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s: not a regular file", name)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", name, err)
	}
	if len(b) > maxFile {
		return "", fmt.Errorf("%s: longer than %d bytes", name, maxFile)
	}
	return string(b), nil
}

// write writes value to the interface file name of dir in one write(2),
// which is how the kernel takes it.
func write(dir, name, value string) error {
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", value, p, err)
	}
	return nil
}

// Controllers lists the controllers dir's parent makes available to it
// (cgroup.controllers).
func Controllers(dir string) ([]string, error) {
	s, err := readFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return nil, err
	}
	return strings.Fields(s), nil
}

// SubtreeControl lists the controllers dir enables for its children.
func SubtreeControl(dir string) ([]string, error) {
	s, err := readFile(filepath.Join(dir, "cgroup.subtree_control"))
	if err != nil {
		return nil, err
	}
	return strings.Fields(s), nil
}

// Enable enables controllers for dir's children (cgroup.subtree_control).
// The kernel refuses while dir itself holds processes, unless it is the
// root.
func Enable(dir string, controllers []string) error {
	return subtree(dir, "+", controllers)
}

// Disable undoes Enable.
func Disable(dir string, controllers []string) error {
	return subtree(dir, "-", controllers)
}

func subtree(dir, sign string, controllers []string) error {
	if len(controllers) == 0 {
		return nil
	}
	parts := make([]string, len(controllers))
	for i, c := range controllers {
		parts[i] = sign + c
	}
	return write(dir, "cgroup.subtree_control", strings.Join(parts, " "))
}

// Create makes the cgroup dir. Its parent must exist.
func Create(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	return nil
}

// Open opens dir for clone3's CLONE_INTO_CGROUP
// (syscall.SysProcAttr.CgroupFD).
func Open(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// MoveSelf moves the calling process, all its threads, into dir. It
// writes "0", the writer itself: a pid is read in the writer's pid
// namespace, and "0" needs none.
func MoveSelf(dir string) error {
	return write(dir, "cgroup.procs", "0")
}

// Kill SIGKILLs every process in dir and its descendants (cgroup.kill,
// Linux ≥ 5.14). It does not wait for them to exit.
func Kill(dir string) error {
	return write(dir, "cgroup.kill", "1")
}

// Remove removes the cgroup dir; one already gone is no error. It fails
// with EBUSY while dir holds processes (Kill's are still exiting) or
// child cgroups.
func Remove(dir string) error {
	err := unix.Rmdir(dir)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return &fs.PathError{Op: "remove cgroup", Path: dir, Err: err}
}

// Procs lists the processes in dir (cgroup.procs), at most MaxProcs. A
// process outside this one's pid namespace is listed as 0, as the kernel
// writes it (a container that shares its host's cgroup but not its pids).
func Procs(dir string) ([]int, error) {
	f, err := os.Open(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(io.LimitReader(f, MaxProcs*12))
	for sc.Scan() && len(pids) < MaxProcs {
		pid, err := strconv.Atoi(strings.TrimSpace(sc.Text()))
		if err != nil || pid < 0 {
			return nil, fmt.Errorf("%s: malformed line %q", f.Name(), sc.Text())
		}
		pids = append(pids, pid)
	}
	return pids, sc.Err()
}

// Populated says whether dir or a descendant holds a process
// (cgroup.events "populated").
func Populated(dir string) (bool, error) {
	s, err := readFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, err
	}
	kv, err := ParseFlatKeyed(s)
	if err != nil {
		return false, fmt.Errorf("%s/cgroup.events: %w", dir, err)
	}
	n, ok := kv["populated"]
	if !ok {
		return false, fmt.Errorf("%s/cgroup.events: no populated key", dir)
	}
	return n != 0, nil
}

// ParseFlatKeyed parses the kernel's flat keyed files (cpu.stat,
// memory.events, cgroup.events): "KEY VALUE" lines, VALUE an unsigned
// integer. A malformed line, a repeated key or more than 64 keys is an
// error.
func ParseFlatKeyed(s string) (map[string]uint64, error) {
	kv := map[string]uint64{}
	for line := range strings.Lines(s) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, " ")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("malformed line %q", line)
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %q: %w", line, err)
		}
		if _, dup := kv[k]; dup {
			return nil, fmt.Errorf("key %q twice", k)
		}
		if len(kv) == 64 {
			return nil, errors.New("more than 64 keys")
		}
		kv[k] = n
	}
	return kv, nil
}

// parseUint parses a one-value file such as memory.current.
func parseUint(s string) (uint64, error) {
	t := strings.TrimSuffix(s, "\n")
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want an unsigned integer, got %q", t)
	}
	return n, nil
}
