package dispatcher

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/dispatcher/control"
	"github.com/cohort-dev/cohort/internal/testsync"
)

// requestFrom sends one request on a new connection from the local
// address from (a loopback address: all of 127.0.0.0/8 is this host's)
// and returns the worker and generation that answered. A non-empty
// header is sent first, in two writes with pause between them.
func requestFrom(t testing.TB, addr string, from netip.Addr, header string, pause time.Duration) (worker, gen string) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: from.AsSlice()}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", from, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if header != "" {
		half := len(header) / 2
		if _, err := io.WriteString(c, header[:half]); err != nil {
			t.Fatal(err)
		}
		time.Sleep(pause)
		if _, err := io.WriteString(c, header[half:]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("request from %s: %v", from, err)
	}
	body := string(b)
	if !strings.HasPrefix(body, "HTTP/1.1 200") {
		t.Fatalf("request from %s: %q", from, body)
	}
	return field(body, "worker"), field(body, "gen")
}

// loopbackAddrs returns n loopback addresses from 127.0.0.first on.
func loopbackAddrs(first, n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		k := first + i
		out[i] = netip.AddrFrom4([4]byte{127, 0, byte(k / 256), byte(k % 256)})
	}
	return out
}

// affinity sends rounds requests from each address (interleaved) and
// fails unless each address always reached one worker; it returns that
// worker per address.
func affinity(t *testing.T, addr string, from []netip.Addr, rounds int, wantGen string) map[netip.Addr]string {
	t.Helper()
	seen := map[netip.Addr]map[string]bool{}
	for range rounds {
		for _, a := range from {
			w, g := requestFrom(t, addr, a, "", 0)
			if wantGen != "" && g != wantGen {
				t.Fatalf("request from %s answered by generation %s, want %s", a, g, wantGen)
			}
			if seen[a] == nil {
				seen[a] = map[string]bool{}
			}
			seen[a][w] = true
		}
	}
	out := map[netip.Addr]string{}
	for _, a := range from {
		if len(seen[a]) != 1 {
			t.Errorf("address %s reached workers %v, want one", a, seen[a])
		}
		for w := range seen[a] {
			out[a] = w
		}
	}
	return out
}

// stickyWarm sends requests from addresses until every one of n workers
// has answered, then waits until none holds a connection: all have
// spoken and what they took is acknowledged and closed.
func stickyWarm(t *testing.T, f *reloadFixture, n int) {
	t.Helper()
	seen := map[string]bool{}
	addrs := loopbackAddrs(2, 64)
	for i := 0; len(seen) < n; i++ {
		if i == len(addrs) {
			t.Fatalf("64 addresses reached only workers %v of %d", seen, n)
		}
		w, _ := requestFrom(t, f.addr, addrs[i], "", 0)
		seen[w] = true
	}
	testsync.WaitFor(t, 20*time.Second, "no worker holding a connection", func() bool {
		for _, w := range f.status(t).Workers {
			if w.Active != 0 {
				return false
			}
		}
		return true
	})
}

// TestRoundRobinStickyClientIP: with sticky = "client-ip", clients bound
// to 127.0.0.2…127.0.0.9 each always reach one worker; across a reload
// each still reaches one worker, the new worker of the same slot; and
// 256 addresses spread over the workers within 1.2.
func TestRoundRobinStickyClientIP(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 3, mode: "round-robin", helper: "cohort-worker", extra: `sticky = "client-ip"`})
	stickyWarm(t, f, 3)
	eight := loopbackAddrs(2, 8)
	before := affinity(t, f.addr, eight, 4, "1")
	if _, err := f.call(t, 60*time.Second, control.Request{Cmd: control.CmdReload}); err != nil {
		t.Fatalf("reload: %v", err)
	}
	after := affinity(t, f.addr, eight, 4, "2")
	for _, a := range eight {
		if before[a] != after[a] {
			t.Errorf("address %s: worker %s before the reload, %s after", a, before[a], after[a])
		}
	}
	counts := map[string]int{}
	for _, a := range loopbackAddrs(10, 256) {
		w, _ := requestFrom(t, f.addr, a, "", 0)
		counts[w]++
	}
	if s := maxMin(counts, 3); s == 0 || s > 1.2 {
		t.Errorf("256 addresses over 3 workers: %s, spread %.2f, want within 1.2", countsString(counts), s)
	}
	t.Logf("8 addresses: %v; after the reload: %v; 256 addresses: %s", before, after, countsString(counts))
}

// TestRoundRobinStickyProxyProtocol: with sticky = "proxy-protocol",
// the address in each connection's PROXY v1 header (all connections
// come from 127.0.0.1, as from a load balancer) decides the worker, and
// the worker reads the header itself (the dispatcher only peeked); a
// client that sends half its header and waits does not hold up anyone
// else.
func TestRoundRobinStickyProxyProtocol(t *testing.T) {
	t.Parallel()
	f := startFromFile(t, appFile{workers: 2, mode: "round-robin", helper: "cohort-worker", extra: `sticky = "proxy-protocol"`,
		env: map[string]string{"HELPER_PROXY": "1"}})
	local := netip.MustParseAddr("127.0.0.1")
	header := func(i int) string { return fmt.Sprintf("PROXY TCP4 10.0.0.%d 10.0.0.1 4000 80\r\n", i) }
	for i := 2; i < 10; i++ { // warm-up: both workers speak
		requestFrom(t, f.addr, local, header(i), 0)
	}
	seen := map[int]map[string]bool{}
	workers := map[string]bool{}
	for range 3 {
		for i := 2; i < 10; i++ {
			w, _ := requestFrom(t, f.addr, local, header(i), 0)
			if seen[i] == nil {
				seen[i] = map[string]bool{}
			}
			seen[i][w] = true
			workers[w] = true
		}
	}
	for i := 2; i < 10; i++ {
		if len(seen[i]) != 1 {
			t.Errorf("PROXY address 10.0.0.%d reached workers %v, want one", i, seen[i])
		}
	}
	if len(workers) != 2 {
		t.Errorf("8 PROXY addresses reached workers %v, want both", workers)
	}
	// A slow client's header arrives in two halves 1.5 s apart;
	// meanwhile others are served at once.
	done := make(chan string, 1)
	go func() { // owned by the test: received below
		w, _ := requestFrom(t, f.addr, local, header(2), 1500*time.Millisecond)
		done <- w
	}()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	for i := 3; i < 10; i++ {
		requestFrom(t, f.addr, local, header(i), 0)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("7 requests took %v while a slow client's header was half sent", took)
	}
	var slow string
	select {
	case slow = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the slow client was not answered")
	}
	for w := range seen[2] {
		if slow != w {
			t.Errorf("the slow client of 10.0.0.2 reached worker %s, its address's worker is %s", slow, w)
		}
	}
}
