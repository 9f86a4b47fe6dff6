package rr

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// Delivery is one connection received by a worker.
type Delivery struct {
	ID       uint64
	Listener uint16
	// File is the worker's copy of the connection, close-on-exec. The
	// receiver of the Delivery owns it.
	File *os.File
}

// Worker is the worker's end of a round-robin channel. Recv must not be
// called concurrently with itself; Send may be called from any goroutine.
//
// Like the dispatcher's end, it stays out of Go's netpoller, which watches
// every fd it holds for writing too, edge-triggered: each message of the
// worker's that the dispatcher read (every ACK) made the kernel report the
// socket writable and woke the worker's idle netpoller thread for nothing,
// at the dispatcher's expense (issue 19: half of the dispatcher's thread
// wake-ups, and one of the worker's per connection). Recv waits in
// poll(2) for reading only.
type Worker struct {
	s        *sock
	buf, oob []byte
	sendMu   sync.Mutex
	sendBuf  []byte
}

// NewWorker wraps f, the worker's end of a round-robin channel (the
// LISTEN_FDS entry named FDName). It always closes f; the Worker holds its
// own copy until Close.
func NewWorker(f *os.File) (*Worker, error) {
	s, err := workerSock(f)
	if err != nil {
		return nil, err
	}
	return &Worker{s: s, buf: make([]byte, MaxMessage+1), oob: make([]byte, oobSize)}, nil
}

// Recv waits for the next CONNS message and returns its connections; the
// caller owns their Files. When the dispatcher has closed its end it
// returns an error wrapping net.ErrClosed. On a malformed message it
// closes every fd that came with it and returns an error wrapping
// ErrProtocol; the channel should then be closed, so that the dispatcher
// hands what it sent to another worker.
func (w *Worker) Recv() ([]Delivery, error) {
	b, fds, err := w.s.recv(w.buf, w.oob)
	if errors.Is(err, errEOF) {
		return nil, fmt.Errorf("recv: dispatcher closed the channel: %w", net.ErrClosed)
	}
	if err != nil {
		return nil, fmt.Errorf("recv: %w", err)
	}
	m, err := parse(b)
	if err == nil && m.typ != TypeConns {
		err = fmt.Errorf("%w: dispatcher sent %v", ErrProtocol, m.typ)
	}
	if err == nil && len(fds) != len(m.entries) {
		err = fmt.Errorf("%w: %d entries but %d fds", ErrProtocol, len(m.entries), len(fds))
	}
	if err != nil {
		closeFDs(fds)
		return nil, fmt.Errorf("recv: %w", err)
	}
	ds := make([]Delivery, len(fds))
	for i, e := range m.entries {
		ds[i] = Delivery{ID: e.id, Listener: e.listener, File: os.NewFile(uintptr(fds[i]), fmt.Sprintf("cohort-rr-conn-%d", e.id))}
	}
	return ds, nil
}

// Send sends ids in one or more messages of type t (TypeAck, TypeClosed or
// TypeReject), at most MaxIDs per message. An error names the message type
// and wraps the cause (net.ErrClosed once the channel is closed).
func (w *Worker) Send(t Type, ids []uint64) error {
	if t != TypeAck && t != TypeClosed && t != TypeReject {
		return fmt.Errorf("send %v: %w: a worker cannot send it", t, ErrProtocol)
	}
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	for batch := range slices.Chunk(ids, MaxIDs) {
		w.sendBuf = appendIDs(w.sendBuf[:0], t, batch)
		if err := w.s.send(w.sendBuf, nil); err != nil {
			return fmt.Errorf("send %v: %w", t, err)
		}
	}
	return nil
}

// Hello sends HELLO: the worker speaks the protocol. Send it once, first,
// and only when the dispatcher asked for it (the environment variable
// HelloEnv is "1"); a dispatcher that did not ask would take it for a
// malformed message.
func (w *Worker) Hello() error {
	w.sendMu.Lock()
	defer w.sendMu.Unlock()
	w.sendBuf = appendHello(w.sendBuf[:0])
	if err := w.s.send(w.sendBuf, nil); err != nil {
		return fmt.Errorf("send %v: %w", TypeHello, err)
	}
	return nil
}

// SetReadDeadline makes a blocked or later Recv return a timeout error at
// t; the zero time means no deadline.
func (w *Worker) SetReadDeadline(t time.Time) error {
	return w.s.setReadDeadline(t)
}

// Close closes the worker's end. The dispatcher sees end of stream and
// hands every connection the worker has not acknowledged to another worker.
func (w *Worker) Close() error {
	return w.s.close()
}
