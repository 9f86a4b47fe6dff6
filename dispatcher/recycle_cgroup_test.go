package dispatcher

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestCgroupMemory: with a cgroup of its own a worker's memory is its
// cgroup's memory.current and memory.events' high counter; a worker
// without one is read by the fallback, in the right place.
func TestCgroupMemory(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("memory.current", "536870912\n")
	write("memory.events", "low 0\nhigh 3\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
	var asked []int
	fallback := func(_ context.Context, ts []memTarget) []memSample {
		out := make([]memSample, len(ts))
		for i, tg := range ts {
			asked = append(asked, tg.pid)
			out[i].bytes = uint64(tg.pid)
		}
		return out
	}
	read := cgroupMemory(fallback)
	got := read(context.Background(), []memTarget{
		{pid: 7}, {pid: 8, cgroup: dir}, {pid: 9, cgroup: filepath.Join(dir, "gone")}, {pid: 10},
	})
	if got[0].bytes != 7 || got[3].bytes != 10 || len(asked) != 2 {
		t.Errorf("fallback: got %+v, asked %v", got, asked)
	}
	if got[1].bytes != 512<<20 || got[1].high != 3 || got[1].err != nil {
		t.Errorf("cgroup worker: %+v", got[1])
	}
	if !errors.Is(got[2].err, os.ErrNotExist) {
		t.Errorf("a cgroup that is gone: %+v", got[2])
	}
}
