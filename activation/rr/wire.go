// Package rr implements both ends of cohort's round-robin channel: the
// dispatcher accepts connections and hands each one to a worker over a unix
// SOCK_SEQPACKET socket with SCM_RIGHTS; the worker acknowledges what it took.
//
// The dispatcher end is a [Channel] (one per worker, made by [NewPair]); the
// worker end is a [Worker]. Programs normally do not use [Worker] directly:
// the parent package activation wraps it in a net.Listener. The wire format
// is specified byte by byte in docs/protocol.md.
//
// Messages, all integers little-endian:
//
//	header (8 bytes): version u8 = 1, type u8, count u16, reserved u32 = 0
//	CONNS  (dispatcher → worker): header, count × {id u64, listener u16, 0 u16, 0 u32},
//	       and exactly count fds in one SCM_RIGHTS control message, in entry order
//	ACK, CLOSED, REJECT (worker → dispatcher): header, count × id u64
//	HELLO  (worker → dispatcher, first, when HelloEnv is "1"): header with count 0
package rr

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants. They are part of the protocol: changing one needs a new
// Version.
const (
	// Version is the protocol version carried in every message header.
	Version = 1
	// MaxFDs is the largest number of connections (and fds) in one CONNS
	// message.
	MaxFDs = 32
	// MaxIDs is the largest number of ids in one ACK, CLOSED or REJECT
	// message.
	MaxIDs = 256
	// HeaderSize is the size of the message header in bytes.
	HeaderSize = 8
	// EntrySize is the size of one connection entry of a CONNS message.
	EntrySize = 16
	// MaxMessage is the size of the largest valid message.
	MaxMessage = HeaderSize + MaxIDs*8
)

// FDName is the LISTEN_FDNAMES name of the worker's end of the channel.
const FDName = "cohort-rr"

// HelloEnv names the environment variable by which a dispatcher asks for
// HELLO: when it is "1", a worker sends HELLO as soon as it takes over its
// end of the channel. Dispatchers that do not set it (cohort before HELLO
// existed) would treat HELLO as a malformed message, so a worker sends
// it only when asked.
const HelloEnv = "COHORT_RR_HELLO"

// ListenersEnv names the environment variable that maps listener indexes to
// names for the worker: "http:admin" means index 0 is "http" and 1 is
// "admin".
const ListenersEnv = "COHORT_RR_LISTENERS"

// Type is a message type.
type Type uint8

// Message types.
const (
	// TypeConns carries connections from the dispatcher to a worker.
	TypeConns Type = 1
	// TypeAck tells the dispatcher that the worker took these connections:
	// it may close its copies and must not hand them to anyone else.
	TypeAck Type = 2
	// TypeClosed tells the dispatcher that the worker closed these
	// (previously acknowledged) connections.
	TypeClosed Type = 3
	// TypeReject tells the dispatcher that the worker closed these
	// connections without using them; the dispatcher should hand its copies
	// to another worker.
	TypeReject Type = 4
	// TypeHello is the worker's first message, with no entries: it
	// speaks the protocol. Sent only when the dispatcher asked for it
	// (HelloEnv).
	TypeHello Type = 5
)

// String returns the name used in docs/protocol.md, such as "ACK".
func (t Type) String() string {
	switch t {
	case TypeConns:
		return "CONNS"
	case TypeAck:
		return "ACK"
	case TypeClosed:
		return "CLOSED"
	case TypeReject:
		return "REJECT"
	case TypeHello:
		return "HELLO"
	}
	return fmt.Sprintf("type %d", uint8(t))
}

// ErrProtocol is wrapped by every error about a malformed message.
var ErrProtocol = errors.New("round-robin protocol error")

// entry is one connection of a CONNS message.
type entry struct {
	id       uint64
	listener uint16
}

// message is a decoded message: entries for CONNS, ids for the others.
type message struct {
	typ     Type
	entries []entry
	ids     []uint64
}

var le = binary.LittleEndian

// appendHeader appends a message header.
func appendHeader(b []byte, t Type, count int) []byte {
	b = append(b, Version, byte(t))
	b = le.AppendUint16(b, uint16(count))
	return le.AppendUint32(b, 0)
}

// appendConns appends a CONNS message; len(es) must be 1..MaxFDs.
func appendConns(b []byte, es []entry) []byte {
	b = appendHeader(b, TypeConns, len(es))
	for _, e := range es {
		b = le.AppendUint64(b, e.id)
		b = le.AppendUint16(b, e.listener)
		b = le.AppendUint16(b, 0)
		b = le.AppendUint32(b, 0)
	}
	return b
}

// appendIDs appends an ACK, CLOSED or REJECT message; len(ids) must be
// 1..MaxIDs.
func appendIDs(b []byte, t Type, ids []uint64) []byte {
	b = appendHeader(b, t, len(ids))
	for _, id := range ids {
		b = le.AppendUint64(b, id)
	}
	return b
}

// appendHello appends a HELLO message.
func appendHello(b []byte) []byte { return appendHeader(b, TypeHello, 0) }

// parse decodes one message. It never panics; every error wraps
// ErrProtocol. The caller checks that the number of fds matches.
func parse(b []byte) (message, error) {
	if len(b) < HeaderSize {
		return message{}, fmt.Errorf("%w: short message (%d bytes)", ErrProtocol, len(b))
	}
	if b[0] != Version {
		return message{}, fmt.Errorf("%w: version %d, want %d", ErrProtocol, b[0], Version)
	}
	m := message{typ: Type(b[1])}
	count := int(le.Uint16(b[2:]))
	if le.Uint32(b[4:]) != 0 {
		return message{}, fmt.Errorf("%w: reserved header bytes are not zero", ErrProtocol)
	}
	body := b[HeaderSize:]
	switch m.typ {
	case TypeConns:
		if count < 1 || count > MaxFDs || len(body) != count*EntrySize {
			return message{}, fmt.Errorf("%w: %v with count %d and %d body bytes", ErrProtocol, m.typ, count, len(body))
		}
		m.entries = make([]entry, count)
		for i := range m.entries {
			e := body[i*EntrySize:]
			if le.Uint16(e[10:]) != 0 || le.Uint32(e[12:]) != 0 {
				return message{}, fmt.Errorf("%w: reserved bytes of entry %d are not zero", ErrProtocol, i)
			}
			m.entries[i] = entry{id: le.Uint64(e), listener: le.Uint16(e[8:])}
		}
	case TypeAck, TypeClosed, TypeReject:
		if count < 1 || count > MaxIDs || len(body) != count*8 {
			return message{}, fmt.Errorf("%w: %v with count %d and %d body bytes", ErrProtocol, m.typ, count, len(body))
		}
		m.ids = make([]uint64, count)
		for i := range m.ids {
			m.ids[i] = le.Uint64(body[i*8:])
		}
	case TypeHello:
		if count != 0 || len(body) != 0 {
			return message{}, fmt.Errorf("%w: %v with count %d and %d body bytes", ErrProtocol, m.typ, count, len(body))
		}
	default:
		return message{}, fmt.Errorf("%w: unknown message %v", ErrProtocol, m.typ)
	}
	return m, nil
}
