package balance

import (
	"encoding/binary"
	"net/netip"
	"testing"
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
