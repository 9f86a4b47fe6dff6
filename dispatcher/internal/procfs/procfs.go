// Package procfs reads what the dispatcher needs to know about processes
// from /proc: which processes make up a worker (its tree), how much memory
// and CPU time they use, who a process's parent is (the control socket's
// ancestry walk), which children the dispatcher has (the orphan sweep) and
// what a process's environment says. It is the home of cohort's /proc
// readers, with the one parser of /proc/PID/stat; what the readers are for
// (the policy) stays with their callers. (internal/probe reads the fds and
// syscalls of a process, which only it needs, and its tree through here.)
//
// Everything here distrusts /proc: a process may exit between two reads,
// a file may be cut short or hold what a future kernel adds, and a
// hostile worker can name its command anything (including ") 1 2 3").
// What cannot be read or parsed is skipped, never a panic, and every read
// is bounded in bytes; a scan is bounded in processes and by its context.
package procfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// ClockTick is USER_HZ, the unit of the times in /proc/PID/stat: 100 on
// every Linux architecture cohort runs on.
const ClockTick = 100

// MaxProcs bounds how many processes one Scan reads.
const MaxProcs = 1 << 16

// maxStat bounds a read of /proc/PID/stat (a line of about 300 bytes and
// a command of at most 64).
const maxStat = 4 << 10

// ErrMalformed is returned (wrapped) by Stat for a /proc/PID/stat that
// ParseStat refuses.
var ErrMalformed = errors.New("malformed /proc stat")

// Proc is one process, from /proc/PID/stat.
type Proc struct {
	PID, PPID, PGID int
	// Ticks is CPU time in ClockTick units: the process's own user and
	// system time plus that of its children it has waited for. So a tree's
	// total does not drop when a child exits and is reaped inside it.
	Ticks uint64
	// Start is the process's start time after boot, in ClockTick units:
	// with PID it names the process (a pid may be reused).
	Start uint64
	// RSS is its resident memory in bytes.
	RSS int64
}

// Table is every process a Scan found, by pid.
type Table map[int]Proc

// root is where proc(5) is mounted.
const root = "/proc"

// Scan reads /proc/PID/stat of every process (at most MaxProcs of them).
// Processes that exit meanwhile are left out. It stops early, with what it
// has and ctx's error, when ctx ends.
func Scan(ctx context.Context) (Table, error) {
	dir, err := os.Open(root)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", root, err)
	}
	defer dir.Close()
	names, err := dir.Readdirnames(MaxProcs + 64) // a few non-pid entries come first
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read %s: %w", root, err)
	}
	page := int64(os.Getpagesize())
	t := Table{}
	for _, name := range names {
		if ctx.Err() != nil {
			return t, ctx.Err()
		}
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 || len(t) >= MaxProcs {
			continue
		}
		b, err := ReadBounded(root+"/"+name+"/stat", maxStat)
		if err != nil {
			continue
		}
		if p, ok := ParseStat(b, page); ok && p.PID == pid {
			t[pid] = p
		}
	}
	return t, nil
}

// Stat reads /proc/PID/stat of one process (a bounded read). The error
// wraps fs.ErrNotExist when the process is gone (or invisible), and
// ErrMalformed when the line does not parse.
func Stat(pid int) (Proc, error) {
	path := root + "/" + strconv.Itoa(pid) + "/stat"
	b, err := ReadBounded(path, maxStat)
	if err != nil {
		return Proc{}, err
	}
	p, ok := ParseStat(b, int64(os.Getpagesize()))
	if !ok || p.PID != pid {
		return Proc{}, fmt.Errorf("%s: %w", path, ErrMalformed)
	}
	return p, nil
}

// ParseStat parses a /proc/PID/stat line: "PID (COMM) STATE PPID …",
// where COMM may hold spaces, newlines and parentheses, so the fields
// after it start at the last ')'. ok is false when it is malformed: no
// command, fewer fields than the ones read, or a field out of range (a
// negative pid, parent, group or time, or one that overflows). page is
// the page size, for RSS.
func ParseStat(b []byte, page int64) (p Proc, ok bool) {
	open := bytes.IndexByte(b, '(')
	shut := bytes.LastIndexByte(b, ')') // the command may hold ")" and spaces
	if open < 1 || shut < open {
		return p, false
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b[:open])))
	if err != nil || pid <= 0 {
		return p, false
	}
	f := bytes.Fields(b[shut+1:])
	// f[0] is field 3 (state): field n is f[n-3]. ppid 4, pgrp 5,
	// utime 14, stime 15, cutime 16, cstime 17, starttime 22, rss 24.
	if len(f) < 22 {
		return p, false
	}
	num := func(field int) (int64, bool) {
		n, err := strconv.ParseInt(string(f[field-3]), 10, 64)
		return n, err == nil
	}
	var v [8]int64
	for i, field := range []int{4, 5, 14, 15, 16, 17, 22, 24} {
		n, ok := num(field)
		if !ok {
			return p, false
		}
		v[i] = n
	}
	for _, n := range v[:7] {
		if n < 0 {
			return p, false
		}
	}
	p = Proc{PID: pid, PPID: int(v[0]), PGID: int(v[1]), Start: uint64(v[6])}
	p.Ticks = uint64(v[2]) + uint64(v[3]) + uint64(v[4]) + uint64(v[5])
	if v[7] > 0 && v[7] < 1<<40 {
		p.RSS = v[7] * page
	}
	return p, true
}

// Usage is what a tree of processes uses.
type Usage struct {
	Procs int    // how many processes
	Ticks uint64 // their CPU time so far (Proc.Ticks summed)
	// RSS is their resident memory summed: pages shared between them
	// (a preforking server's copy-on-write pages) count once per process,
	// as in ps and PM2.
	RSS int64
}

// Tree is the usage of the processes that make up the worker whose pid
// is leader: its process group, the processes that left the group but
// still descend from a member, and the children of supervisor (a child
// subreaper that adopted a worker's orphans) for which owner returns
// leader — and all their descendants. owner may be nil.
func (t Table) Tree(leader, supervisor int, owner func(pid int) int) Usage {
	kids := map[int][]int{}
	for pid, p := range t {
		kids[p.PPID] = append(kids[p.PPID], pid)
	}
	in := map[int]bool{}
	var queue []int
	add := func(pid int) {
		if !in[pid] {
			in[pid] = true
			queue = append(queue, pid)
		}
	}
	for pid, p := range t {
		if p.PGID == leader {
			add(pid)
		}
	}
	if _, ok := t[leader]; ok {
		add(leader)
	}
	if owner != nil && supervisor > 0 {
		for _, pid := range kids[supervisor] {
			if !in[pid] && t[pid].PGID != leader && owner(pid) == leader {
				add(pid)
			}
		}
	}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, k := range kids[pid] {
			add(k)
		}
	}
	var u Usage
	for pid := range in {
		p := t[pid]
		u.Procs++
		u.Ticks += p.Ticks
		u.RSS += p.RSS
	}
	return u
}

// Descendants lists pid's descendants in t, breadth first, at most max
// of them.
func (t Table) Descendants(pid, max int) []int {
	kids := map[int][]int{}
	for c, p := range t {
		if c != pid {
			kids[p.PPID] = append(kids[p.PPID], c)
		}
	}
	var out []int
	for queue := []int{pid}; len(queue) > 0 && len(out) < max; queue = queue[1:] {
		for _, c := range kids[queue[0]] {
			if len(out) < max {
				out = append(out, c)
				queue = append(queue, c)
			}
		}
	}
	return out
}

// maxChildren bounds a read of one thread's children file (a pid and a
// space each).
const maxChildren = 1 << 20

// Children lists the pids of the calling process's children, from every
// thread's /proc/self/task/TID/children (a reparented orphan is the child
// of one of the threads, whichever reaped it for the subreaper). A thread
// that ends meanwhile is skipped; nil when /proc cannot be read.
func Children() []int {
	pids, _ := childrenOf("self")
	return pids
}

// childrenOf lists the children of the process proc ("self" or a pid)
// from its threads' children files. errNoChildrenFiles: the kernel has
// none (built without CONFIG_PROC_CHILDREN).
func childrenOf(proc string) ([]int, error) {
	tasks, err := os.ReadDir(root + "/" + proc + "/task")
	if err != nil {
		return nil, err
	}
	var pids []int
	for i, t := range tasks {
		b, err := ReadBounded(root+"/"+proc+"/task/"+t.Name()+"/children", maxChildren)
		if i == 0 && errors.Is(err, os.ErrNotExist) {
			if _, serr := os.Stat(root + "/" + proc + "/task/" + t.Name()); serr == nil {
				return nil, errNoChildrenFiles
			}
		}
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
				pids = append(pids, pid)
			}
		}
	}
	return pids, nil
}

var errNoChildrenFiles = errors.New("no /proc/PID/task/TID/children (kernel without CONFIG_PROC_CHILDREN)")

// ScanTree is Scan of top and its descendants only, found through their
// threads' children files: all that Tree needs when top is the child
// subreaper of the trees it measures (the dispatcher of cohort dispatch
// and cohort run), at a cost that grows with those processes rather than
// with every process of the host. A pid that a child file named but that
// now has another parent (it exited and was reused) is left out. ok is
// false, with nothing read, when the kernel has no children files: Scan
// then. Bounded like Scan.
func ScanTree(ctx context.Context, top int) (t Table, ok bool, err error) {
	page := int64(os.Getpagesize())
	t = Table{}
	self, err := Stat(top)
	if err != nil {
		return nil, true, err
	}
	t[top] = self
	for queue := []int{top}; len(queue) > 0 && len(t) < MaxProcs; queue = queue[1:] {
		if ctx.Err() != nil {
			return t, true, ctx.Err()
		}
		parent := queue[0]
		kids, err := childrenOf(strconv.Itoa(parent))
		if errors.Is(err, errNoChildrenFiles) {
			return nil, false, nil
		}
		for _, pid := range kids {
			if _, seen := t[pid]; seen || len(t) >= MaxProcs {
				continue
			}
			b, err := ReadBounded(root+"/"+strconv.Itoa(pid)+"/stat", maxStat)
			if err != nil {
				continue
			}
			if p, ok := ParseStat(b, page); ok && p.PID == pid && p.PPID == parent {
				t[pid] = p
				queue = append(queue, pid)
			}
		}
	}
	return t, true, nil
}

// EnvValue is the value of the variable key in the environment pid
// started with (/proc/PID/environ, at most limit bytes of it); ok is
// false when it is not there or cannot be read.
func EnvValue(pid int, key string, limit int64) (value string, ok bool) {
	b, err := ReadBounded(root+"/"+strconv.Itoa(pid)+"/environ", limit)
	if err != nil {
		return "", false
	}
	k := []byte(key + "=")
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		if v, found := bytes.CutPrefix(kv, k); found {
			return string(v), true
		}
	}
	return "", false
}

// ReadBounded reads at most limit bytes of a /proc file.
func ReadBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}
