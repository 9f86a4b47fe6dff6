// Package logline is how one log line of an app looks to a person: "web.2 |
// listening" for worker 2's output, "web.cohort | reloading…" for the
// dispatcher's own lines, "web.systemd | Started web.service." for what
// systemd says about the app's units; on a terminal, each worker's label
// in a colour of its own and the control characters of the message made
// visible. `cohort run` prints its workers' output this way and `cohort
// logs` prints the journal this way, so the two read the same.
package logline

import (
	"strconv"
	"unicode/utf8"
)

// Sep is what separates the label from the message.
const Sep = " | "

// Worker is the label of worker index of app: "web.2", as in `cohort
// status` and the journal's SYSLOG_IDENTIFIER (without the pid).
func Worker(app string, index int) string { return app + "." + strconv.Itoa(index) }

// Dispatcher is the label of the dispatcher's own lines: "web.cohort".
// App names may hold dots, but a worker's label ends in a number.
func Dispatcher(app string) string { return app + ".cohort" }

// Systemd is the label of systemd's lines about the app's units.
func Systemd(app string) string { return app + ".systemd" }

// Color is an SGR colour of a label; NoColor prints none.
type Color int

// The colours that are not a worker's.
const (
	NoColor Color = -1
	// Bold is the dispatcher's and systemd's: marked, no worker's colour.
	Bold Color = 1
)

// workerColors are SGR foreground colours readable on dark and light
// backgrounds (no black, no white, no blue on black).
var workerColors = [...]Color{36, 33, 35, 32, 31, 94, 96, 93, 95, 92}

// WorkerColor is the colour of worker index's label.
func WorkerColor(index int) Color {
	if index < 0 {
		return Bold
	}
	return workerColors[index%len(workerColors)]
}

// Append appends "label | msg" to dst, without a newline. With a colour
// (a terminal), the label is coloured and every control character of
// msg but a tab is written as \xNN (or U+FFFD for invalid UTF-8), so
// that a worker's output cannot move the cursor, clear the screen or set
// the terminal's title; without one, msg is copied as it is.
func Append(dst []byte, label string, c Color, msg []byte) []byte {
	if c == NoColor {
		dst = append(dst, label...)
		dst = append(dst, Sep...)
		return append(dst, msg...)
	}
	dst = append(dst, "\x1b["...)
	dst = strconv.AppendInt(dst, int64(c), 10)
	dst = append(dst, 'm')
	dst = append(dst, label...)
	dst = append(dst, "\x1b[0m"...)
	dst = append(dst, Sep...)
	return AppendVisible(dst, msg)
}

// AppendVisible appends msg to dst with every control character but a
// tab written as \xNN and invalid UTF-8 as U+FFFD: what a terminal shows
// of a worker's line without obeying it.
func AppendVisible(dst, msg []byte) []byte {
	for len(msg) > 0 {
		r, n := utf8.DecodeRune(msg)
		switch {
		case r == utf8.RuneError && n <= 1:
			dst = utf8.AppendRune(dst, utf8.RuneError)
		case r == '\t':
			dst = append(dst, '\t')
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			dst = append(dst, `\x`...)
			dst = append(dst, hex[r>>4], hex[r&0xf])
		default:
			dst = append(dst, msg[:n]...)
		}
		msg = msg[n:]
	}
	return dst
}

const hex = "0123456789abcdef"
