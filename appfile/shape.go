package appfile

import (
	"fmt"
	"unicode/utf8"
)

// Limits on the shape of an app file, checked by checkShape before the TOML
// decoder sees a byte. BurntSushi/toml does work quadratic (or worse) in
// the nesting depth and in the number of parts of a dotted key: 32 KB of
// nested inline tables took 13.6 s and 2.8 GB, and a 40 KB dotted key of
// 20,000 parts took 79 s. A real app file nests three deep at most
// ([[listen]], an array in [service]) and has a few dozen keys, so the
// limits are far above any honest file and far below where the decoder
// slows down.
const (
	// MaxNesting is how deep arrays and inline tables may nest.
	MaxNesting = 16
	// MaxKeyParts is how many parts a dotted key or table header may
	// have ("a.b.c" has 3).
	MaxKeyParts = 16
	// MaxValues is how many keys, table headers and array items one file
	// may hold in all.
	MaxValues = 10000
)

// checkShape scans src the way a TOML lexer would, aware of strings and
// comments, and returns an error at the first place it passes MaxNesting,
// MaxKeyParts or MaxValues. It does not validate TOML: anything it does
// not understand is left for the decoder to report. It runs in one pass
// with constant memory (the bracket stack is bounded by MaxNesting).
func checkShape(file string, src []byte) *Error {
	s := shapeScanner{src: src, line: 1, keyMode: true}
	return s.run(file)
}

type shapeScanner struct {
	src       []byte
	off       int
	line      int
	lineStart int // offset of the current line's first byte

	// stack holds the open '[' (array) and '{' (inline table) of values;
	// table headers are not on it.
	stack    [MaxNesting]byte
	depth    int
	keyMode  bool // reading a key (or a table header's name)
	header   bool // the key being read is a table header's
	keyParts int  // dots seen in the key being read, plus one
	values   int
}

func (s *shapeScanner) errorAt(file string, off int, format string, args ...any) *Error {
	col := utf8.RuneCount(s.src[s.lineStart:off]) + 1
	return &Error{File: file, Line: s.line, Col: col, Msg: fmt.Sprintf(format, args...)}
}

func (s *shapeScanner) count(file string, off int) *Error {
	s.values++
	if s.values > MaxValues {
		return s.errorAt(file, off, "more than %d keys, table headers and array items in one file", MaxValues)
	}
	return nil
}

func (s *shapeScanner) newline() {
	s.line++
	s.lineStart = s.off
}

func (s *shapeScanner) run(file string) *Error {
	for s.off < len(s.src) {
		c := s.src[s.off]
		switch c {
		case '\n':
			s.off++
			s.newline()
			if s.depth == 0 {
				// A new top-level line starts with a key or a header.
				s.keyMode, s.header, s.keyParts = true, false, 0
			}
			continue
		case '#':
			for s.off < len(s.src) && s.src[s.off] != '\n' {
				s.off++
			}
			continue
		case '"', '\'':
			if s.keyMode && s.keyParts == 0 {
				s.keyParts = 1
			}
			s.skipString()
			continue
		case '.':
			if s.keyMode {
				if s.keyParts == 0 {
					s.keyParts = 1
				}
				s.keyParts++
				if s.keyParts > MaxKeyParts {
					return s.errorAt(file, s.off, "dotted key or table name with more than %d parts", MaxKeyParts)
				}
			}
		case '=':
			if s.keyMode && !s.header {
				s.keyMode = false
				if err := s.count(file, s.off); err != nil {
					return err
				}
			}
		case '[':
			if s.keyMode && s.depth == 0 && s.keyParts == 0 && !s.header {
				// A table header: [name] or [[name]].
				s.header = true
				if err := s.count(file, s.off); err != nil {
					return err
				}
				s.off++
				if s.off < len(s.src) && s.src[s.off] == '[' {
					s.off++
				}
				continue
			}
			if err := s.open(file, c); err != nil {
				return err
			}
			if err := s.count(file, s.off); err != nil { // the first item, if any
				return err
			}
		case '{':
			if err := s.open(file, c); err != nil {
				return err
			}
			s.keyMode, s.header, s.keyParts = true, false, 0
		case ']', '}':
			if s.header && s.depth == 0 {
				s.keyMode, s.header = false, false
				break
			}
			if s.depth > 0 {
				s.depth--
			}
			s.keyMode = false
		case ',':
			if s.depth > 0 {
				if s.stack[s.depth-1] == '{' {
					s.keyMode, s.keyParts = true, 0
				} else if err := s.count(file, s.off); err != nil {
					return err
				}
			}
		default:
			if s.keyMode && s.keyParts == 0 && c != ' ' && c != '\t' && c != '\r' {
				s.keyParts = 1
			}
		}
		s.off++
	}
	return nil
}

// open pushes an array or inline table.
func (s *shapeScanner) open(file string, c byte) *Error {
	if s.depth == MaxNesting {
		return s.errorAt(file, s.off, "arrays and inline tables nested more than %d deep", MaxNesting)
	}
	s.stack[s.depth] = c
	s.depth++
	return nil
}

// skipString skips a basic, literal or multi-line string starting at s.off,
// counting the newlines of multi-line strings. An unterminated single-line
// string ends at the end of its line (the decoder reports it).
func (s *shapeScanner) skipString() {
	q := s.src[s.off]
	triple := s.off+2 < len(s.src) && s.src[s.off+1] == q && s.src[s.off+2] == q
	if triple {
		s.off += 3
	} else {
		s.off++
	}
	for s.off < len(s.src) {
		c := s.src[s.off]
		switch {
		case c == '\\' && q == '"':
			s.off++
			if s.off < len(s.src) && s.src[s.off] == '\n' {
				s.off++
				s.newline()
				continue
			}
		case c == '\n':
			if !triple {
				return // left for run, which starts a new line
			}
			s.off++
			s.newline()
			continue
		case c == q:
			if !triple {
				s.off++
				return
			}
			if s.off+2 < len(s.src) && s.src[s.off+1] == q && s.src[s.off+2] == q {
				s.off += 3
				// A multi-line string may end with up to two more quotes.
				for i := 0; i < 2 && s.off < len(s.src) && s.src[s.off] == q; i++ {
					s.off++
				}
				return
			}
		}
		s.off++
	}
}
