package bench

import (
	"os"
	"strconv"
	"strings"
)

// pstat is what the harness reads of one process in /proc/<pid>/stat.
type pstat struct {
	ppid  int
	cpu   uint64 // utime + stime + cutime + cstime, in clock ticks
	self  uint64 // utime + stime: the process's own threads only
	start uint64 // start time after boot, in clock ticks: tells pid reuse apart
}

// readProc reads /proc/<pid>/stat; ok is false if the process is gone.
func readProc(pid int) (pstat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return pstat{}, false
	}
	// The command name is in parentheses and may contain anything.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return pstat{}, false
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 20 {
		return pstat{}, false
	}
	num := func(k int) uint64 { n, _ := strconv.ParseUint(f[k-3], 10, 64); return n }
	// cutime and cstime are the CPU time of the children it reaped: a
	// worker that exits during a window (a reload replaces them all)
	// takes its own time out of /proc, and it reappears here, in its
	// parent's, instead of counting as other processes' time.
	return pstat{ppid: int(num(4)), cpu: num(14) + num(15) + num(16) + num(17), self: num(14) + num(15), start: num(22)}, true
}

// allProcs reads every process of the machine.
func allProcs() map[int]pstat {
	out := map[int]pstat{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := readProc(pid); ok {
			out[pid] = st
		}
	}
	return out
}

// descendants returns roots and every process below them, from one
// snapshot of the machine. Workers that a supervisor puts in process groups
// of their own (cohort does) are found this way.
func descendants(all map[int]pstat, roots ...int) map[int]pstat {
	children := map[int][]int{}
	for pid, st := range all {
		children[st.ppid] = append(children[st.ppid], pid)
	}
	out := map[int]pstat{}
	queue := append([]int(nil), roots...)
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		st, ok := all[pid]
		if !ok {
			continue
		}
		if _, seen := out[pid]; seen {
			continue
		}
		out[pid] = st
		queue = append(queue, children[pid]...)
	}
	return out
}

// machineCPU returns the busy and total clock ticks of all CPUs since boot
// (/proc/stat).
func machineCPU() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0
	}
	for i, s := range f[1:] {
		if i >= 8 { // guest time is already in user
			break
		}
		n, _ := strconv.ParseUint(s, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

// cpuMeter measures which share of the machine's CPU time went to
// processes outside the harness's own tree (the harness, the load generator
// and every process it started) during a window.
type cpuMeter struct {
	roots       func() []int
	busy, total uint64
	ours        uint64
}

func (m *cpuMeter) ourCPU() uint64 {
	var sum uint64
	for _, st := range descendants(allProcs(), m.roots()...) {
		sum += st.cpu
	}
	return sum
}

func (m *cpuMeter) start() {
	m.busy, m.total = machineCPU()
	m.ours = m.ourCPU()
}

// other returns the share (0..1) of all CPUs that other processes used
// since start. Processes of the harness that exited during the window
// count as the harness's once their parent in the tree reaped them (the
// old workers of a reload: cohort, Node's primary and PM2's daemon reap
// them); a process whose parent is outside the tree would count as other.
func (m *cpuMeter) other() float64 {
	busy, total := machineCPU()
	ours := m.ourCPU()
	if total <= m.total {
		return 0
	}
	o := float64(busy-m.busy) - float64(ours-m.ours)
	return max(0, o/float64(total-m.total))
}
