package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

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
// are errors.
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
	if f, err := strconv.ParseFloat(in, 64); err == nil {
		if f < 0 {
			return 0, fmt.Errorf("negative duration %q", s)
		}
		return time.Duration(f * float64(time.Second)), nil
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
		total += time.Duration(num * float64(unit))
	}
	return total, nil
}
