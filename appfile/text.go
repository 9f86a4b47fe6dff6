package appfile

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Values in an app file end up in unit files (addresses, names, paths,
// pass-through directives) or in a worker's execve (command, environment,
// working directory). A control character in either place changes what
// the value means: systemd ends a unit-file line at '\n', '\r' and NUL, so
// the rest of the value becomes a directive of its own, and execve ends an
// argument or an environment entry at NUL. So every string is refused when
// it holds one, here with the key's file:line:col; units/ refuses them
// again when it renders, so a key added later cannot slip past.
//
// TAB is the one exception, and only in command arguments and environment
// values: those go to execve, never into a unit file, and a tab in them is
// data (a separator an app may expect). Everywhere else a tab would be
// whitespace that systemd reads differently from what the file seems to
// say, so it is refused with the other control characters.

// textRule says which characters a value may hold.
type textRule int

const (
	// lineText is one line of printable text: what may reach a unit file.
	lineText textRule = iota
	// execText may also hold TABs: command arguments and environment
	// values, which reach only execve.
	execText
)

// badText returns why s cannot be used under rule, or "" when it can.
func badText(s string, rule textRule) string {
	if !utf8.ValidString(s) {
		return "is not valid UTF-8"
	}
	for i, r := range s {
		if r == '\t' && rule == execText {
			continue
		}
		if unicode.IsControl(r) {
			return fmt.Sprintf("holds the control character %s at byte %d; values that reach a unit file or a command line must not (it could end the line and start a directive of its own)", charName(r), i)
		}
	}
	return ""
}

// charName names a control character the way a reader would type it.
func charName(r rune) string {
	switch r {
	case 0:
		return `NUL (\0)`
	case '\n':
		return `newline (\n)`
	case '\r':
		return `carriage return (\r)`
	case '\t':
		return `TAB (\t)`
	}
	return fmt.Sprintf("%U", r)
}

// checkText records an error at path, naming the value name, when s is
// not allowed under rule, and reports whether it is.
func (d *decoder) checkText(path, name, s string, rule textRule) bool {
	if why := badText(s, rule); why != "" {
		d.errorAt(path, "", "%s %s %s", name, quoteShort(s), why)
		return false
	}
	return true
}

// unitLineEnd says why a value written verbatim into a unit file would not
// read back as itself, or "": systemd strips leading and trailing
// whitespace, and a trailing backslash joins the next line to this one.
func unitLineEnd(s string) string {
	switch {
	case strings.HasSuffix(s, `\`):
		return "ends with a backslash, which continues the line in a unit file"
	case strings.TrimSpace(s) != s:
		return "starts or ends with whitespace, which systemd strips"
	}
	return ""
}

// quoteShort quotes s for a message, cut to a length that fits a line.
func quoteShort(s string) string {
	const max = 80
	if len(s) <= max {
		return fmt.Sprintf("%q", s)
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%q…", s[:cut])
}
