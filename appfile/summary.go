package appfile

import (
	"errors"
	"fmt"
	"strings"
)

// Summary is the first problem of err in one line, for the places that
// have room for one (a status line, a journal line that adds what happens
// next): "web.toml:2:1: unknown key "wokers" (did you mean "workers"?)",
// followed by " (and 2 more: cohort check web.toml)" when the file has
// more. An err that is not an Errors gives its first line. The summary
// holds no control character.
func Summary(err error) string {
	if err == nil {
		return ""
	}
	var es Errors
	if errors.As(err, &es) && len(es) > 0 {
		s := es[0].Error()
		more := len(es) - 1
		// Past MaxErrors the last entry counts the rest ("… and N more
		// errors").
		var n int
		if last := es[len(es)-1]; len(es) > 1 && last.Line == 0 {
			if _, err := fmt.Sscanf(last.Msg, "… and %d more", &n); err == nil {
				more += n - 1
			}
		}
		if more > 0 {
			s += fmt.Sprintf(" (and %d more: cohort check %s)", more, es[0].File)
		}
		return printable(s)
	}
	first, _, _ := strings.Cut(err.Error(), "\n")
	return printable(first)
}

// printable replaces control characters (a message may quote what the
// file holds) with U+FFFD: the summary goes into one sd_notify STATUS=
// line, where a newline would start another field.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return '\uFFFD'
		}
		return r
	}, s)
}
