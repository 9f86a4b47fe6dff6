// Package envfile reads the files an app names in environment_file, in
// systemd's EnvironmentFile= format and with its "-" for optional files.
// It exists apart from the dispatcher because it is file reading that never
// touches supervisor state, and because what it reads is hostile input: a
// reload reads these files, so every read is bounded and refuses what is
// not a regular file (appfile.ReadRegularFile).
package envfile

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/cohort-dev/cohort/appfile"
)

// Read reads the environment file spec names, as systemd's
// EnvironmentFile= does: a leading "-" makes it optional, and a relative
// path is taken from dir (the directory of the app file; "" leaves it
// relative to the working directory). It returns the file's KEY=VALUE
// assignments in file order.
//
// An optional file that does not exist or may not be read gives no
// assignments and no error. A file that is not a regular file (a FIFO, a
// device) or holds more than appfile.MaxFileSize is an error even when
// optional; so is a line that is not KEY=VALUE. Errors name the file.
func Read(spec, dir string) ([]string, error) {
	optional := strings.HasPrefix(spec, "-")
	name := strings.TrimPrefix(spec, "-")
	if !filepath.IsAbs(name) && dir != "" {
		name = filepath.Join(dir, name)
	}
	// Bounded, and never a FIFO or a device: a reload reads these.
	data, err := appfile.ReadRegularFile(name, appfile.MaxFileSize)
	if err != nil {
		if optional && (errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission)) {
			return nil, nil
		}
		return nil, err
	}
	kvs, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return kvs, nil
}

// Parse reads systemd's EnvironmentFile= format: KEY=VALUE lines, blank
// lines and lines starting with # or ; ignored, values optionally in
// single or double quotes (in double quotes \", \\ and \n are escapes), a
// trailing backslash continuing the line. It returns an error naming the
// line for one that is not KEY=VALUE, or for a line longer than 1 MiB.
func Parse(data []byte) ([]string, error) {
	var (
		out  []string
		sc   = bufio.NewScanner(bytes.NewReader(data))
		line strings.Builder
		n    int
	)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		n++
		text := sc.Text()
		if strings.HasSuffix(text, `\`) {
			line.WriteString(strings.TrimSuffix(text, `\`))
			continue
		}
		line.WriteString(text)
		s := strings.TrimSpace(line.String())
		line.Reset()
		if s == "" || s[0] == '#' || s[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(s, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("line %d: not KEY=VALUE", n)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			q := v[0]
			v = v[1 : len(v)-1]
			if q == '"' {
				v = strings.NewReplacer(`\"`, `"`, `\\`, `\`, `\n`, "\n").Replace(v)
			}
		}
		out = append(out, k+"="+v)
	}
	return out, sc.Err()
}
