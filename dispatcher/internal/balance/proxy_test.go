package balance

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func proxyV2(cmd, fam byte, addr []byte) []byte {
	b := append([]byte{}, proxyV2Sig...)
	b = append(b, 0x20|cmd, fam, 0, 0)
	binary.BigEndian.PutUint16(b[14:], uint16(len(addr)))
	return append(b, addr...)
}

// TestParseProxy: v1 and v2 headers give their source address; a
// prefix asks for more; anything else is no header; the LOCAL command,
// UNKNOWN and unix families are whole headers without an address.
func TestParseProxy(t *testing.T) {
	v4 := proxyV2(1, 0x11, []byte{10, 1, 2, 3, 10, 9, 9, 9, 0x1f, 0x90, 0, 80})
	v6 := proxyV2(1, 0x21, append(netip.MustParseAddr("2001:db8::7").AsSlice(), make([]byte, 20)...))
	for _, tc := range []struct {
		name, in string
		ip       string
		st       proxyState
	}{
		{"v1 tcp4", "PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n", "192.0.2.7", proxyDone},
		{"v1 tcp6", "PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n", "2001:db8::1", proxyDone},
		{"v1 unknown", "PROXY UNKNOWN\r\n", "", proxyDone},
		{"v1 prefix", "PROXY TCP4 192.0.2", "", proxyMore},
		{"v1 first bytes", "PRO", "", proxyMore},
		{"empty", "", "", proxyMore},
		{"v1 family mismatch", "PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n", "", proxyNotIt},
		{"v1 bad address", "PROXY TCP4 192.0.2.300 1.1.1.1 1 2\r\n", "", proxyNotIt},
		{"v1 bare newline", "PROXY TCP4 1.2.3.4\n", "", proxyNotIt},
		{"v1 too long", "PROXY TCP4 " + string(make([]byte, 120)), "", proxyNotIt},
		{"http", "GET / HTTP/1.1\r\n\r\n", "", proxyNotIt},
		{"v2 tcp4", string(v4) + "GET /", "10.1.2.3", proxyDone},
		{"v2 tcp6", string(v6), "2001:db8::7", proxyDone},
		{"v2 local", string(proxyV2(0, 0x11, make([]byte, 12))), "", proxyDone},
		{"v2 unix", string(proxyV2(1, 0x31, make([]byte, 216))), "", proxyDone},
		{"v2 prefix", string(v4[:20]), "", proxyMore},
		{"v2 signature prefix", "\r\n\r\n\x00", "", proxyMore},
		{"v2 bad version", string(append(append([]byte{}, proxyV2Sig...), 0x11, 0x11, 0, 12)), "", proxyNotIt},
		{"v2 short length", string(proxyV2(1, 0x11, make([]byte, 4))), "", proxyNotIt},
		{"v2 bad signature", "\r\n\r\nX", "", proxyNotIt},
	} {
		ip, st := parseProxy([]byte(tc.in))
		got := ""
		if ip.IsValid() {
			got = ip.String()
		}
		if st != tc.st || got != tc.ip {
			t.Errorf("%s: parseProxy = %q, %d; want %q, %d", tc.name, got, st, tc.ip, tc.st)
		}
	}
}

// FuzzParseProxy: parseProxy never panics, reads no more than it is
// given, and a header it calls whole stays whole (with the same address)
// whatever follows it; a prefix it waits for is no longer than a peek.
func FuzzParseProxy(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(proxyV2(1, 0x11, []byte{10, 1, 2, 3, 10, 9, 9, 9, 0x1f, 0x90, 0, 80}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > proxyPeek {
			b = b[:proxyPeek]
		}
		ip, st := parseProxy(b)
		if st == proxyDone {
			ip2, st2 := parseProxy(append(append([]byte{}, b...), "trailing bytes"...))
			if st2 != proxyDone || ip2 != ip {
				t.Fatalf("%q: whole header with %v, but %v, %d with bytes after it", b, ip, ip2, st2)
			}
		}
		if st == proxyMore && len(b) >= proxyPeek {
			t.Fatalf("%q: waits for more than a peek holds", b)
		}
	})
}

// TestProxySlowHeaderIdle: while a client's PROXY header is half sent,
// the event loop waits for the rest instead of spinning on the peeked
// bytes (it registered the connection level-triggered, so epoll
// reported the same bytes again at once, and a few slow clients kept a
// core busy for proxyWait); once the rest comes the connection goes on.
func TestProxySlowHeaderIdle(t *testing.T) {
	addr, served, _ := testBalancer(t, Config{
		MaxPending: 64, MaxHandoffs: 8, AckTimeout: 10 * time.Second, AcceptThreads: 1,
		ProxyProtocol: true, Policy: &Sticky{LoadFactor: DefaultLoadFactor, Fallback: RoundRobin{}},
		Warnf: t.Logf, Infof: t.Logf,
	}, 1)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "PROXY TCP4 10.0.0.7 "); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // accepted and waiting for the rest
	cpu0 := processCPU(t)
	time.Sleep(500 * time.Millisecond)
	if used := processCPU(t) - cpu0; used > 100*time.Millisecond {
		t.Errorf("the test process used %v of CPU in 500 ms while a header was half sent: the event loop spins", used)
	}
	if served.Load() != 0 {
		t.Fatalf("a connection with half a header was handed on")
	}
	if _, err := io.WriteString(c, "10.0.0.1 4000 80\r\n"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for served.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if served.Load() != 1 {
		t.Errorf("the connection did not reach the worker once its header was whole")
	}
}

// processCPU is this process's user and system CPU time so far.
func processCPU(t testing.TB) time.Duration {
	t.Helper()
	cpu, err := selfCPU()
	if err != nil {
		t.Fatal(err)
	}
	return cpu
}

// selfCPU is this process's CPU time, user and system, all its threads.
func selfCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, fmt.Errorf("getrusage: %w", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
