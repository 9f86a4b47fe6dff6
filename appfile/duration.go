package appfile

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// MaxDuration is the longest duration an app file may give (a timeout, a
// delay, a restart backoff). Far beyond any useful timeout, it keeps
// every sum cohort makes of them (TimeoutStartSec= and TimeoutStopSec= add
// a margin) far from overflowing time.Duration, whose 292 years a
// wrapped-around sum would turn negative.
const MaxDuration = 365 * 24 * time.Hour

const maxDurationText = "365 days"

// maxSeconds is the largest number of seconds a time.Duration holds.
const maxSeconds = float64(math.MaxInt64) / float64(time.Second)

// systemdUnits are the time-span units of systemd.time(7), longest first
// where one is a prefix of another, so "min" is not read as "m" + "in".
var systemdUnits = []struct {
	name string
	d    time.Duration
}{
	{"usec", time.Microsecond}, {"us", time.Microsecond}, {"µs", time.Microsecond},
	{"msec", time.Millisecond}, {"ms", time.Millisecond},
	{"seconds", time.Second}, {"second", time.Second}, {"sec", time.Second}, {"s", time.Second},
	{"minutes", time.Minute}, {"minute", time.Minute}, {"min", time.Minute}, {"m", time.Minute},
	{"hours", time.Hour}, {"hour", time.Hour}, {"hr", time.Hour}, {"h", time.Hour},
	{"days", 24 * time.Hour}, {"day", 24 * time.Hour}, {"d", 24 * time.Hour},
	{"weeks", 7 * 24 * time.Hour}, {"week", 7 * 24 * time.Hour}, {"w", 7 * 24 * time.Hour},
}

// ParseDuration reads a duration in Go syntax ("1m30s", "500ms") or in
// systemd's ("1min 30s", "2 h", "90" meaning seconds). Negative durations
// are errors, and so are durations that do not fit a time.Duration
// (about 292 years) instead of wrapping around.
func ParseDuration(s string) (time.Duration, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("empty duration")
	}
	if d, err := time.ParseDuration(in); err == nil {
		if d < 0 {
			return 0, fmt.Errorf("negative duration %q", s)
		}
		return d, nil
	}
	// systemd: a bare number is seconds; otherwise number-unit pairs,
	// optionally separated by spaces.
	// Only digits and one dot: ParseFloat alone would take "NaN", "Inf"
	// and hex floats.
	if isDecimal(in) {
		f, err := strconv.ParseFloat(in, 64)
		if err != nil || f >= maxSeconds {
			return 0, fmt.Errorf("duration %q is too long", s)
		}
		return time.Duration(f * float64(time.Second)), nil
	}
	if strings.HasPrefix(in, "-") {
		return 0, fmt.Errorf("negative duration %q", s)
	}
	var total time.Duration
	rest := in
	for rest != "" {
		rest = strings.TrimLeft(rest, " ")
		n := 0
		for n < len(rest) && (rest[n] == '.' || rest[n] >= '0' && rest[n] <= '9') {
			n++
		}
		if n == 0 {
			return 0, fmt.Errorf("invalid duration %q (write e.g. \"30s\", \"1min 30s\", \"500ms\")", s)
		}
		num, err := strconv.ParseFloat(rest[:n], 64)
		if err != nil {
			return 0, fmt.Errorf("invalid number in duration %q", s)
		}
		rest = strings.TrimLeft(rest[n:], " ")
		unit := time.Duration(0)
		for _, u := range systemdUnits {
			if strings.HasPrefix(rest, u.name) {
				after := rest[len(u.name):]
				// The unit must end here: "5sx" is not "5s" + "x".
				if after == "" || after[0] == ' ' || after[0] == '.' || after[0] >= '0' && after[0] <= '9' {
					unit, rest = u.d, after
					break
				}
			}
		}
		if unit == 0 {
			return 0, fmt.Errorf("invalid unit in duration %q (units: us, ms, s, min, h, d, w)", s)
		}
		part := num * float64(unit)
		if part >= float64(math.MaxInt64-total) {
			return 0, fmt.Errorf("duration %q is too long", s)
		}
		total += time.Duration(part)
	}
	return total, nil
}

// isDecimal reports whether s is digits with at most one dot and at least
// one digit.
func isDecimal(s string) bool {
	digits, dots := 0, 0
	for _, c := range s {
		switch {
		case c >= '0' && c <= '9':
			digits++
		case c == '.':
			dots++
		default:
			return false
		}
	}
	return digits > 0 && dots <= 1
}
