package appfile

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// position is a 1-based line and column (in characters).
type position struct{ line, col int }

// keyIndex maps the dotted path of every key in a TOML document to where the
// key is written. Array-of-tables elements and array items get their index as
// a path element: "listen.0.address".
//
// The TOML library reports positions only for syntax errors, and cohort
// reports every semantic error at its key, so the index is rebuilt from the
// source. It runs only on documents the library has already accepted, so it
// can be lenient: anything it does not understand just has no position, and
// the caller falls back to the enclosing table's.
type keyIndex map[string]position

// locate scans src and returns its key index.
func locate(src string) keyIndex {
	s := &scanner{src: src, line: 1, col: 1, idx: keyIndex{}, arrays: map[string]int{}}
	s.document()
	return s.idx
}

// at returns the position of path, or of its closest ancestor that has one,
// or line 1 column 1.
func (k keyIndex) at(path string) position {
	for {
		if p, ok := k[path]; ok {
			return p
		}
		i := strings.LastIndexByte(path, '.')
		if i < 0 {
			return position{1, 1}
		}
		path = path[:i]
	}
}

type scanner struct {
	src       string
	off       int
	line, col int
	idx       keyIndex
	arrays    map[string]int // [[header]] path → elements seen so far
}

func (s *scanner) eof() bool { return s.off >= len(s.src) }

func (s *scanner) peek() byte {
	if s.eof() {
		return 0
	}
	return s.src[s.off]
}

func (s *scanner) next() {
	if s.eof() {
		return
	}
	if s.src[s.off] == '\n' {
		s.line, s.col = s.line+1, 1
		s.off++
		return
	}
	_, n := utf8.DecodeRuneInString(s.src[s.off:])
	s.off += n
	s.col++
}

func (s *scanner) pos() position { return position{s.line, s.col} }

// blank skips spaces and tabs, and newlines and comments when multiline.
func (s *scanner) blank(multiline bool) {
	for !s.eof() {
		switch c := s.peek(); {
		case c == ' ' || c == '\t' || c == '\r':
			s.next()
		case c == '\n' && multiline:
			s.next()
		case c == '#':
			for !s.eof() && s.peek() != '\n' {
				s.next()
			}
		default:
			return
		}
	}
}

func (s *scanner) skipLine() {
	for !s.eof() && s.peek() != '\n' {
		s.next()
	}
}

func (s *scanner) document() {
	table := ""
	for !s.eof() {
		s.blank(true)
		if s.eof() {
			return
		}
		if s.peek() == '[' {
			start := s.pos()
			s.next()
			array := s.peek() == '['
			if array {
				s.next()
			}
			parts, _ := s.key()
			name := strings.Join(parts, ".")
			if array {
				n := s.arrays[name]
				s.arrays[name] = n + 1
				name += "." + strconv.Itoa(n)
			}
			if _, seen := s.idx[name]; !seen {
				s.idx[name] = start
			}
			table = name
			s.skipLine()
			continue
		}
		s.keyValue(table)
		s.skipLine()
	}
}

// key reads a possibly dotted key and returns its parts and the position of
// its first character.
func (s *scanner) key() ([]string, position) {
	var parts []string
	s.blank(false)
	start := s.pos()
	for !s.eof() {
		s.blank(false)
		switch c := s.peek(); {
		case c == '"' || c == '\'':
			parts = append(parts, s.str())
		case isBareKeyChar(c):
			b := s.off
			for !s.eof() && isBareKeyChar(s.peek()) {
				s.next()
			}
			parts = append(parts, s.src[b:s.off])
		default:
			return parts, start
		}
		s.blank(false)
		if s.peek() != '.' {
			return parts, start
		}
		s.next()
	}
	return parts, start
}

func isBareKeyChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// keyValue reads `key = value` inside the table at prefix.
func (s *scanner) keyValue(prefix string) {
	parts, start := s.key()
	if len(parts) == 0 {
		return
	}
	path := joinPath(prefix, strings.Join(parts, "."))
	// Every dotted prefix of the key points at the key too, so that
	// `restart.initial = …` locates "restart".
	for i := 1; i <= len(parts); i++ {
		p := joinPath(prefix, strings.Join(parts[:i], "."))
		if _, seen := s.idx[p]; !seen {
			s.idx[p] = start
		}
	}
	s.blank(false)
	if s.peek() != '=' {
		return
	}
	s.next()
	s.blank(false)
	s.value(path)
}

func joinPath(prefix, key string) string {
	if prefix == "" {
		return key
	}
	return prefix + "." + key
}

// value skips one value, indexing the keys of inline tables and the items
// of arrays under path.
func (s *scanner) value(path string) {
	switch s.peek() {
	case '"', '\'':
		s.str()
	case '[':
		s.next()
		for i := 0; !s.eof(); i++ {
			s.blank(true)
			if s.peek() == ']' {
				s.next()
				return
			}
			item := path + "." + strconv.Itoa(i)
			if _, seen := s.idx[item]; !seen {
				s.idx[item] = s.pos()
			}
			before := s.off
			s.value(item)
			s.blank(true)
			if s.peek() == ',' {
				s.next()
			} else if s.off == before {
				return // not understood; give up on this value
			}
		}
	case '{':
		s.next()
		for !s.eof() {
			s.blank(false)
			if s.peek() == '}' {
				s.next()
				return
			}
			before := s.off
			s.keyValue(path)
			s.blank(false)
			if s.peek() == ',' {
				s.next()
			} else if s.off == before {
				return
			}
		}
	default:
		for !s.eof() {
			switch s.peek() {
			case ',', ']', '}', '\n', '#':
				return
			}
			s.next()
		}
	}
}

// str skips a basic, literal or multi-line string and returns its raw
// contents (escapes are left as written: keys with escapes are rare, and a
// miss only costs a position).
func (s *scanner) str() string {
	q := s.peek()
	triple := strings.HasPrefix(s.src[s.off:], strings.Repeat(string(q), 3))
	delim := string(q)
	if triple {
		delim = strings.Repeat(string(q), 3)
	}
	for range len(delim) {
		s.next()
	}
	b := s.off
	for !s.eof() {
		if q == '"' && s.peek() == '\\' {
			s.next()
			s.next()
			continue
		}
		if strings.HasPrefix(s.src[s.off:], delim) {
			e := s.off
			for range len(delim) {
				s.next()
			}
			// A multi-line string may end with up to two extra quotes.
			for triple && s.peek() == q {
				s.next()
				e++
			}
			return s.src[b:e]
		}
		if !triple && s.peek() == '\n' {
			return s.src[b:s.off]
		}
		s.next()
	}
	return s.src[b:]
}
