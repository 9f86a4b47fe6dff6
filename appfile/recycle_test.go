package appfile

import (
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	good := map[string]uint64{
		"1": 1, "1048576": 1 << 20, "400M": 400 << 20, "1.5G": 3 << 29, "2T": 2 << 40, "64K": 64 << 10, " 8 M ": 8 << 20, "0.5K": 512,
	}
	for in, want := range good {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "0M", "-1M", "400MB", "400m", "1e9", "NaN", "Inf", "0x10", "1..5G", "2048T", "M", "infinity", "10%"} {
		if got, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, got)
		}
	}
	for b, want := range map[uint64]string{900: "900", 1024: "1K", 400 << 20: "400M", 3 << 29: "1.5G", 512<<20 + 300<<10: "512.3M"} {
		if got := FormatSize(b); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", b, got, want)
		}
		if b2, err := ParseSize(FormatSize(b)); err != nil || (b%1024 == 0 && b < 1<<20 && b2 != b) {
			t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", b, b2, err)
		}
	}
}

func TestParseRecycle(t *testing.T) {
	rr := "mode = \"round-robin\"\n"
	app, err := Parse("/etc/cohort/web.toml", []byte(rr+minimal+`
[recycle]
memory = "400M"
memory_interval = "1s"
max_lifetime = "6h"
max_lifetime_jitter = "30min"
max_connections = 10000
max_connections_jitter = 500
min_interval = "0s"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Recycle{Memory: 400 << 20, MemoryInterval: time.Second, MaxLifetime: 6 * time.Hour, LifetimeJitter: 30 * time.Minute,
		MaxConnections: 10000, ConnectionsJitter: 500, MinInterval: 0}
	if app.Recycle != want || !app.Recycle.On() {
		t.Errorf("recycle %+v, want %+v", app.Recycle, want)
	}
	app, err = Parse("/etc/cohort/web.toml", []byte(minimal+"[recycle]\nmemory = 1048576\n"))
	if err != nil || app.Recycle.Memory != 1<<20 || app.Recycle.MemoryInterval != DefaultRecycleMemoryInterval || app.Recycle.MinInterval != DefaultRecycleMinInterval {
		t.Errorf("memory in bytes: %+v, %v", app.Recycle, err)
	}
	if app, _ := Parse("/etc/cohort/web.toml", []byte(minimal)); app.Recycle.On() {
		t.Errorf("no [recycle]: %+v is on", app.Recycle)
	}
}

// TestParseRecycleBad: each refusal says where and why; max_connections
// outside round-robin mode names the mode and the reason.
func TestParseRecycleBad(t *testing.T) {
	tests := []struct{ name, src, want string }{
		{"max_connections in shared mode", minimal + "[recycle]\nmax_connections = 100\n",
			`web.toml:6:1: max_connections applies only to mode = "round-robin": in mode = "shared" the workers accept on their own and the dispatcher cannot count their connections (use max_lifetime or memory)`},
		{"max_connections in reuseport mode", "mode = \"reuseport\"\n" + minimal + "[recycle]\nmax_connections = 100\n",
			`web.toml:7:1: max_connections applies only to mode = "round-robin": in mode = "reuseport"`},
		{"memory unit", minimal + "[recycle]\nmemory = \"400MB\"\n", `web.toml:6:1: recycle.memory: size "400MB": want bytes or a number with K, M, G or T`},
		{"memory zero", minimal + "[recycle]\nmemory = 0\n", `web.toml:6:1: recycle.memory: want a size such as "400M" or a number of bytes from 1 to`},
		{"memory type", minimal + "[recycle]\nmemory = true\n", `web.toml:6:1: recycle.memory: want a size such as "400M", got boolean`},
		{"interval too short", minimal + "[recycle]\nmemory = \"1G\"\nmemory_interval = \"10ms\"\n", `web.toml:7:1: memory_interval: want at least 100ms, got 10ms`},
		{"interval alone", minimal + "[recycle]\nmemory_interval = \"1s\"\n", `web.toml:6:1: memory_interval applies only with memory, which is not set`},
		{"jitter alone", minimal + "[recycle]\nmax_lifetime_jitter = \"1h\"\n", `web.toml:6:1: max_lifetime_jitter applies only with max_lifetime, which is not set`},
		{"conns jitter alone", "mode = \"round-robin\"\n" + minimal + "[recycle]\nmax_connections_jitter = 5\n", `web.toml:7:1: max_connections_jitter applies only with max_connections, which is not set`},
		{"lifetime zero", minimal + "[recycle]\nmax_lifetime = \"0s\"\n", `web.toml:6:1: recycle.max_lifetime: must be longer than 0`},
		{"connections zero", "mode = \"round-robin\"\n" + minimal + "[recycle]\nmax_connections = 0\n", `web.toml:7:1: recycle.max_connections: want a number of connections from 1 to`},
		{"typo", minimal + "[recycle]\nmax_lifetim = \"1h\"\n", `web.toml:6:1: unknown key "max_lifetim" (did you mean "max_lifetime"?)`},
		{"not a table", "recycle = 5\n" + minimal, `web.toml:1:1: recycle: want a table ([recycle]), got integer`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("web.toml", []byte(tc.src))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v\nwant %s", err, tc.want)
			}
		})
	}
}
