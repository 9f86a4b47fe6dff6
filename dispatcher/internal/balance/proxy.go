package balance

// sticky = "proxy-protocol": the client address of a connection that a
// load balancer in front passes on is in its PROXY protocol header
// (haproxy's proxy-protocol.txt, v1 text and v2 binary). The balancer
// reads it with MSG_PEEK, never consuming it (the worker reads the
// header itself), and never waits for it: a connection whose header has
// not arrived waits in its loop's epoll set, at most proxyWait and at
// most maxProxyWaiting of them; past either bound, or when the bytes are
// no PROXY header, it goes on without a key (the balance policy places
// it).

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/activation/rr"
	"golang.org/x/sys/unix"
)

// proxyPeek is how much of a connection is peeked: a whole v1 header
// (at most 107 bytes) or a v2 header's fixed part and addresses.
const proxyPeek = 108

// proxyWait bounds how long a connection may wait for its header.
const proxyWait = 2 * time.Second

// maxProxyWaiting bounds the connections waiting for a header.
const maxProxyWaiting = 1024

var proxyV2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// proxyState is what parseProxy made of the bytes so far.
type proxyState int

const (
	proxyMore  proxyState = iota // a prefix of a header: wait for more
	proxyDone                    // a whole header; the address if it names one
	proxyNotIt                   // not a PROXY header
)

// parseProxy reads the client (source) address of the PROXY header at
// the start of b. A header with no address (v1 UNKNOWN, v2 LOCAL or a
// unix family) is proxyDone with the zero Addr.
func parseProxy(b []byte) (netip.Addr, proxyState) {
	if len(b) > 0 && b[0] == '\r' {
		return parseProxyV2(b)
	}
	return parseProxyV1(b)
}

func parseProxyV1(b []byte) (netip.Addr, proxyState) {
	const prefix = "PROXY "
	if n := min(len(b), len(prefix)); string(b[:n]) != prefix[:n] {
		return netip.Addr{}, proxyNotIt
	}
	end := bytes.Index(b, []byte("\r\n"))
	if end < 0 {
		if len(b) >= 107 || bytes.IndexByte(b, '\n') >= 0 {
			return netip.Addr{}, proxyNotIt // too long, or a bare line end
		}
		return netip.Addr{}, proxyMore
	}
	if end > 105 {
		return netip.Addr{}, proxyNotIt
	}
	f := strings.Split(string(b[len(prefix):end]), " ")
	if len(f) >= 1 && f[0] == "UNKNOWN" {
		return netip.Addr{}, proxyDone
	}
	if len(f) != 5 || (f[0] != "TCP4" && f[0] != "TCP6") {
		return netip.Addr{}, proxyNotIt
	}
	ip, err := netip.ParseAddr(f[1])
	if err != nil || ip.Zone() != "" || ip.Is4() != (f[0] == "TCP4") {
		return netip.Addr{}, proxyNotIt
	}
	return ip, proxyDone
}

func parseProxyV2(b []byte) (netip.Addr, proxyState) {
	if n := min(len(b), len(proxyV2Sig)); !bytes.Equal(b[:n], proxyV2Sig[:n]) {
		return netip.Addr{}, proxyNotIt
	}
	if len(b) < 16 {
		return netip.Addr{}, proxyMore
	}
	verCmd, fam := b[12], b[13]
	length := int(binary.BigEndian.Uint16(b[14:16]))
	if verCmd>>4 != 2 || verCmd&0xf > 1 {
		return netip.Addr{}, proxyNotIt
	}
	if verCmd&0xf == 0 { // LOCAL: the balancer's own connection
		return netip.Addr{}, proxyDone
	}
	var need int
	switch fam >> 4 {
	case 1:
		need = 12 // two IPv4 addresses, two ports
	case 2:
		need = 36
	default: // AF_UNSPEC, AF_UNIX: no IP address
		return netip.Addr{}, proxyDone
	}
	if length < need {
		return netip.Addr{}, proxyNotIt
	}
	if len(b) < 16+need {
		return netip.Addr{}, proxyMore
	}
	if need == 12 {
		return netip.AddrFrom4([4]byte(b[16:20])), proxyDone
	}
	return netip.AddrFrom16([16]byte(b[16:32])), proxyDone
}

// waiting is a connection whose PROXY header has not arrived yet.
type waiting struct {
	conn     rr.Conn // no ID yet
	loop     int
	deadline time.Time
}

// peekKey peeks at fd's first bytes: its key, and whether the connection
// should wait for more.
func peekKey(fd int) (key uint64, wait bool) {
	var buf [proxyPeek]byte
	for {
		n, _, err := unix.Recvfrom(fd, buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return 0, true
		}
		if err != nil || n == 0 {
			return 0, false // the worker sees the error or the end
		}
		ip, st := parseProxy(buf[:n])
		switch st {
		case proxyMore:
			return 0, true
		case proxyDone:
			if ip.IsValid() {
				return IPKey(ip), false
			}
		}
		return 0, false
	}
}

// proxyKeys peeks at the header of each connection of batch: those whose
// header is whole (or that are no PROXY connection) stay in batch with
// their keys; the others wait in loop l's set. It returns what goes on
// now.
func (b *Balancer) proxyKeys(l int, batch []rr.Conn, keys []uint64) ([]rr.Conn, []uint64) {
	out, outKeys := batch[:0], keys[:0]
	for _, c := range batch {
		key, wait := peekKey(c.FD())
		if wait && b.await(l, c) {
			continue
		}
		out, outKeys = append(out, c), append(outKeys, key)
	}
	return out, outKeys
}

// await puts c into loop l's set until its header is whole; false when
// it cannot wait (too many wait).
func (b *Balancer) await(l int, c rr.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.waiting) >= maxProxyWaiting || b.closed {
		return false
	}
	b.waitTokens--
	if b.waitTokens >= -1 { // wrapped: never reuse -1 or positive tokens
		b.waitTokens = -2
	}
	tok := b.waitTokens
	// Edge-triggered: the bytes it has sent stay queued (peeked, never
	// read), so level-triggered epoll would report them again at once
	// and the loop would spin until the header is whole; an edge comes
	// with each new segment, and with the client's hang-up.
	if err := b.loops[l].ctl(unix.EPOLL_CTL_ADD, c.FD(), tok, unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLET); err != nil {
		return false
	}
	b.waiting[tok] = &waiting{conn: c, loop: l, deadline: time.Now().Add(proxyWait)}
	return true
}

// headerReady handles an event of a waiting connection: once its header
// is whole (or it is no header, or the client left), it goes on.
func (b *Balancer) headerReady(tok int32) {
	b.mu.Lock()
	w := b.waiting[tok]
	b.mu.Unlock()
	if w == nil {
		return
	}
	key, wait := peekKey(w.conn.FD())
	if wait {
		return
	}
	b.release(tok, key)
}

// release sends a waiting connection on with key.
func (b *Balancer) release(tok int32, key uint64) {
	b.mu.Lock()
	w := b.waiting[tok]
	if w != nil {
		delete(b.waiting, tok)
		b.loops[w.loop].ctl(unix.EPOLL_CTL_DEL, w.conn.FD(), 0, 0)
	}
	b.mu.Unlock()
	if w != nil {
		b.dispatch([]rr.Conn{w.conn}, []uint64{key})
	}
}

// expireHeaders sends on, without a key, the connections that waited
// proxyWait for their header (the watcher calls it).
func (b *Balancer) expireHeaders(now time.Time) {
	b.mu.Lock()
	var late []int32
	for tok, w := range b.waiting {
		if !now.Before(w.deadline) {
			late = append(late, tok)
		}
	}
	b.mu.Unlock()
	for _, tok := range late {
		b.release(tok, 0)
	}
}

// closeWaiting closes every waiting connection (Close).
func (b *Balancer) closeWaitingLocked() {
	for tok, w := range b.waiting {
		w.conn.Close()
		delete(b.waiting, tok)
	}
}
