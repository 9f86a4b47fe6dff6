package config

import (
	"errors"
	"fmt"
	"strings"
)

// Summary is the first problem of err in one line, for the places that
// have room for one (a status line, a journal line that adds what happens
// next): "web.toml:2:1: unknown key "wokers" (did you mean "workers"?)",
// followed by " (and 2 more: cohort check web.toml)" when the file has
// more. An err that is not an Errors gives its first line.
func Summary(err error) string {
	if err == nil {
		return ""
	}
	var es Errors
	if errors.As(err, &es) && len(es) > 0 {
		s := es[0].Error()
		if len(es) > 1 {
			s += fmt.Sprintf(" (and %d more: cohort check %s)", len(es)-1, es[0].File)
		}
		return s
	}
	first, _, _ := strings.Cut(err.Error(), "\n")
	return first
}
