// Package verify runs systemd's own checker, `systemd-analyze verify`, on
// rendered unit files and reads its complaints back as values, and reads
// the directive names the installed systemd knows (`systemd
// --dump-configuration-items`) for "did you mean" suggestions.
//
// It asks the systemd installed on this host, not a list embedded in
// cohort, so what it reports is what this host's systemd will do with the
// units. It only runs programs and parses their output; mapping a
// complaint back to an app file is the caller's job.
package verify

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/units"
)

// ErrNoAnalyzer is returned (wrapped) by Units when systemd-analyze is not
// installed.
var ErrNoAnalyzer = errors.New("systemd-analyze not found")

// maxOutput bounds what is read of a tool's output.
const maxOutput = 1 << 20

// Complaint is one line systemd-analyze verify printed about a unit.
type Complaint struct {
	Unit    string // "web.service"
	Line    int    // line in the unit file; 0 when verify named none
	Section string // the unit file section of that line ("Service"), or ""
	Key     string // the directive on that line ("MemoryMx"), or ""
	Msg     string // verify's text, less the file and line
	// Unknown is set for "Unknown key … in section …": a directive
	// this systemd does not know.
	Unknown bool
}

// Units writes files into a temporary directory and runs `systemd-analyze
// verify --man=no` on them. It returns every complaint, in verify's order;
// a run that failed without saying why is an error. The ExecStart= of
// the units must name programs that exist: verify refuses others.
func Units(ctx context.Context, files []units.File) ([]Complaint, error) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		return nil, fmt.Errorf("%w: install systemd (apt-get install systemd)", ErrNoAnalyzer)
	}
	dir, err := os.MkdirTemp("", "cohort-verify-")
	if err != nil {
		return nil, fmt.Errorf("verify: %w", err)
	}
	defer os.RemoveAll(dir)
	args := []string{"verify", "--man=no"}
	byPath := map[string]units.File{}
	for _, f := range files {
		p := filepath.Join(dir, f.Name)
		if err := os.WriteFile(p, f.Content, 0o644); err != nil {
			return nil, fmt.Errorf("verify: %w", err)
		}
		args = append(args, p)
		byPath[p] = f
	}
	cmd := exec.CommandContext(ctx, analyze, args...)
	// verify may pipe through a pager or colour its output otherwise.
	cmd.Env = append(os.Environ(), "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "SYSTEMD_LOG_COLOR=0", "SYSTEMD_LOG_LOCATION=0", "SYSTEMD_LOG_TIME=0")
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("systemd-analyze verify: %w", ctx.Err())
	}
	cs := Parse(out.Bytes(), func(path string) ([]byte, string, bool) {
		f, ok := byPath[path]
		return f.Content, f.Name, ok
	})
	if runErr != nil && len(cs) == 0 {
		return nil, fmt.Errorf("systemd-analyze verify: %w", runErr)
	}
	return cs, nil
}

// verifyLine is "path:line: message" or "path: message"; systemd 252 and
// 257 both print a unit's problems so.
var verifyLine = regexp.MustCompile(`^(/[^:]*?)(?::([0-9]{1,9}))?: (.*)$`)

// unknownKey matches systemd's unknown-directive warning: 252 prints
// "Unknown key 'MemoryMx' in section [Service], ignoring.", others
// "Unknown key name 'MemoryMx' in section 'Service', ignoring."
var unknownKey = regexp.MustCompile(`^Unknown key (?:name )?'([^']*)' in section \[?'?([^]']*)'?\]?`)

// Parse reads verify's output. unit maps a path verify printed to the
// unit file's content and name, for the files that were verified; lines
// about other files or with no path are kept with Unit "". It never
// fails: a line it does not understand becomes a Complaint of its text.
func Parse(out []byte, unit func(path string) (content []byte, name string, ok bool)) []Complaint {
	var cs []Complaint
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 4096), maxOutput)
	for sc.Scan() {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		c := Complaint{Msg: text}
		if m := verifyLine.FindStringSubmatch(text); m != nil {
			if content, name, ok := unit(m[1]); ok {
				c.Unit, c.Msg = name, m[3]
				if m[2] != "" {
					c.Line, _ = strconv.Atoi(m[2])
					c.Section, c.Key = directiveAt(content, c.Line)
				}
			}
		}
		if m := unknownKey.FindStringSubmatch(c.Msg); m != nil {
			c.Unknown = true
			c.Key, c.Section = m[1], m[2]
		}
		cs = append(cs, c)
	}
	return cs
}

// directiveAt returns the section and key of line n (1-based) of a unit
// file, or "" when that line is no directive.
func directiveAt(content []byte, n int) (section, key string) {
	lines := strings.Split(string(content), "\n")
	if n < 1 || n > len(lines) {
		return "", ""
	}
	k, _, ok := strings.Cut(lines[n-1], "=")
	if !ok {
		return "", ""
	}
	for i := n - 2; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]") {
			return l[1 : len(l)-1], strings.TrimSpace(k)
		}
	}
	return "", ""
}

// Directives returns the directive names the installed systemd knows, by
// section ("Service" → ["Type", "ExecStart", …]), from `systemd
// --dump-configuration-items` (systemd 252 and 257 both have it). It
// returns nil when no systemd binary is found or it fails: suggestions
// are a help, not a check.
func Directives(ctx context.Context) map[string][]string {
	for _, p := range []string{"/usr/lib/systemd/systemd", "/lib/systemd/systemd"} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		cmd := exec.CommandContext(ctx, p, "--dump-configuration-items")
		cmd.Env = append(os.Environ(), "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0")
		var out limitedBuffer
		cmd.Stdout = &out
		if err := cmd.Run(); err != nil {
			return nil
		}
		return ParseDirectives(out.Bytes())
	}
	return nil
}

// ParseDirectives reads the output of `systemd --dump-configuration-items`:
// "[Section]" lines, then "Key=TYPE" lines. Each key is listed once per
// section.
func ParseDirectives(out []byte) map[string][]string {
	m := map[string][]string{}
	seen := map[string]bool{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 4096), maxOutput)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			section = l[1 : len(l)-1]
		case section != "" && strings.Contains(l, "="):
			k, _, _ := strings.Cut(l, "=")
			if k != "" && !seen[section+"\x00"+k] {
				seen[section+"\x00"+k] = true
				m[section] = append(m[section], k)
			}
		}
	}
	return m
}

// limitedBuffer keeps the first maxOutput bytes written to it and drops
// the rest, so a tool that prints without end cannot exhaust memory.
type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := maxOutput - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}
