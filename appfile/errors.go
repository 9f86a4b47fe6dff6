package appfile

import (
	"fmt"
	"strconv"
	"strings"
)

// Error is one problem in an app file, located at the key (or table header)
// it is about. Line and Col are 1-based; 0 means the position is unknown
// (for example an App built without a file).
type Error struct {
	File       string
	Line, Col  int
	Msg        string
	Suggestion string // a known name close to what was written, or ""
}

// Error formats the error the way compilers do, so editors can jump to it:
// "file:line:col: message (did you mean "x"?)".
func (e *Error) Error() string {
	var b strings.Builder
	if badText(e.File, lineText) != "" {
		// A file name with a newline would forge a second log line.
		b.WriteString(strconv.Quote(e.File))
	} else {
		b.WriteString(e.File)
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d:%d", e.Line, e.Col)
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	if e.Suggestion != "" {
		fmt.Fprintf(&b, " (did you mean %q?)", e.Suggestion)
	}
	return b.String()
}

// Errors is every problem found in one file, in file order. Parse returns
// it (never an empty one) as its error.
type Errors []*Error

// Error prints one error per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap lets errors.As find the individual *Error values.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// Suggest returns the candidate closest to word by edit distance, when it
// is close enough to be a plausible typo, else "": the rule behind every
// "did you mean" of cohort.
func Suggest(word string, candidates []string) string { return suggest(word, candidates) }

// suggest returns the candidate closest to word by edit distance, when it is
// close enough to be a plausible typo, else "".
func suggest(word string, candidates []string) string {
	best, bestDist := "", -1
	for _, c := range candidates {
		d := editDistance(strings.ToLower(word), strings.ToLower(c))
		if bestDist < 0 || d < bestDist {
			best, bestDist = c, d
		}
	}
	// A third of the word's length (at least 1, at most 3) keeps "wokers" →
	// "workers" and "mdoe" → "mode" but drops unrelated names.
	limit := min(max(len(word)/3, 1), 3)
	if bestDist < 0 || bestDist > limit {
		return ""
	}
	return best
}

// editDistance is the Damerau–Levenshtein distance (with adjacent
// transpositions, the commonest typo) between a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev2 := make([]int, len(rb)+1)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(rb)]
}
