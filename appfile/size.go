package appfile

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// sizeUnits are systemd's size suffixes for memory settings (MemoryMax=
// and friends, systemd.resource-control(5)): powers of 1024.
var sizeUnits = []struct {
	suffix string
	shift  uint
}{{"K", 10}, {"M", 20}, {"G", 30}, {"T", 40}}

// MaxSize is the largest size an app file may give: 1 PiB, far beyond any
// machine's memory, and far from overflowing the sums made of sizes.
const MaxSize = uint64(1) << 50

// ParseSize reads a size in bytes as systemd writes one: a whole number of
// bytes ("1048576"), or a number with K, M, G or T (powers of 1024, as in
// MemoryMax=), which may have a fraction ("1.5G"). Zero, negative sizes,
// other suffixes and sizes above MaxSize are errors.
func ParseSize(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	if in == "" {
		return 0, fmt.Errorf("empty size")
	}
	num, shift := in, uint(0)
	for _, u := range sizeUnits {
		if rest, ok := strings.CutSuffix(in, u.suffix); ok {
			num, shift = strings.TrimSpace(rest), u.shift
			break
		}
	}
	// Only digits and at most one dot: ParseFloat alone would take "NaN",
	// "Inf", exponents and hex floats.
	if !isDecimal(num) {
		return 0, fmt.Errorf("size %q: want bytes or a number with K, M, G or T (powers of 1024, as systemd's MemoryMax=), e.g. \"400M\"", s)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %v", s, err)
	}
	b := math.Round(f * float64(uint64(1)<<shift))
	switch {
	case b < 1:
		return 0, fmt.Errorf("size %q: must be at least 1 byte", s)
	case b > float64(MaxSize):
		return 0, fmt.Errorf("size %q is larger than the largest size cohort accepts, 1P", s)
	}
	return uint64(b), nil
}

// FormatSize writes b the way ParseSize reads it, in the largest unit
// that keeps it at least 1, with at most one decimal: "512M", "1.5G",
// "900".
func FormatSize(b uint64) string {
	for i := len(sizeUnits) - 1; i >= 0; i-- {
		u := sizeUnits[i]
		if b >= 1<<u.shift {
			v := float64(b) / float64(uint64(1)<<u.shift)
			return strings.TrimSuffix(strconv.FormatFloat(v, 'f', 1, 64), ".0") + u.suffix
		}
	}
	return strconv.FormatUint(b, 10)
}
