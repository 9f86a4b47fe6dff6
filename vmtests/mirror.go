package vmtests

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// aptSource is one "deb" source of the host's apt configuration.
type aptSource struct {
	URI        string
	Suites     []string
	Components []string
}

// HostMirror returns the Debian mirror that debootstrap uses: the value of
// COHORT_VMTEST_MIRROR, or else the first plain Debian archive in the
// host's apt sources (/etc/apt/sources.list, sources.list.d/*.list and
// deb822 sources.list.d/*.sources). It is read at run time on purpose: no
// mirror is written into the repository.
func HostMirror() (string, error) {
	if m := os.Getenv(envMirror); m != "" {
		return m, nil
	}
	files := []string{"/etc/apt/sources.list"}
	for _, pattern := range []string{"/etc/apt/sources.list.d/*.list", "/etc/apt/sources.list.d/*.sources"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			return "", fmt.Errorf("find apt sources: %w", err)
		}
		files = append(files, m...)
	}
	var sources []aptSource
	for _, f := range files {
		b, err := os.ReadFile(f)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("read apt sources: %w", err)
		}
		if strings.HasSuffix(f, ".sources") {
			sources = append(sources, parseDeb822Sources(string(b))...)
		} else {
			sources = append(sources, parseOneLineSources(string(b))...)
		}
	}
	m, ok := pickMirror(sources)
	if !ok {
		return "", fmt.Errorf("no Debian archive with component main in the host's apt sources (%s); set %s", strings.Join(files, ", "), envMirror)
	}
	return m, nil
}

// pickMirror returns the URI of the first source that carries a base suite
// (not -updates, -security, -backports) with component main: the archive
// that debootstrap can bootstrap any release from.
func pickMirror(sources []aptSource) (string, bool) {
	for _, s := range sources {
		if !slices.Contains(s.Components, "main") || strings.Contains(s.URI, "security") {
			continue
		}
		for _, suite := range s.Suites {
			if !strings.Contains(suite, "-") && !strings.Contains(suite, "/") {
				return strings.TrimRight(s.URI, "/"), true
			}
		}
	}
	return "", false
}

// parseOneLineSources parses the classic format:
// "deb [options] URI suite [component…]".
func parseOneLineSources(text string) []aptSource {
	var out []aptSource
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			// Options; they may contain spaces: skip up to the closing bracket.
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) == 0 {
				continue
			}
			f = f[1:]
		}
		if len(f) < 2 {
			continue
		}
		out = append(out, aptSource{URI: f[0], Suites: f[1:2], Components: f[2:]})
	}
	return out
}

// parseDeb822Sources parses the deb822 format: paragraphs of "Key: value"
// fields separated by blank lines.
func parseDeb822Sources(text string) []aptSource {
	var out []aptSource
	for _, para := range strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n\n") {
		fields := map[string]string{}
		last := ""
		for _, line := range strings.Split(para, "\n") {
			if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
				continue
			}
			if (line[0] == ' ' || line[0] == '\t') && last != "" {
				fields[last] += " " + strings.TrimSpace(line)
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			fields[last] = strings.TrimSpace(v)
		}
		if !slices.Contains(strings.Fields(fields["types"]), "deb") || strings.EqualFold(fields["enabled"], "no") {
			continue
		}
		for _, uri := range strings.Fields(fields["uris"]) {
			out = append(out, aptSource{
				URI:        uri,
				Suites:     strings.Fields(fields["suites"]),
				Components: strings.Fields(fields["components"]),
			})
		}
	}
	return out
}
