package appfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// SearchPath is where app files live, most important first, like systemd's
// unit paths: a file in /etc/cohort overrides one of the same name in
// /run/cohort, which overrides one in /usr/lib/cohort.
func SearchPath() []string {
	return []string{"/etc/cohort", "/run/cohort", "/usr/lib/cohort"}
}

// Discover returns the app files in effect on the search path dirs, sorted by
// app name: per file name the first directory wins, and a file that is a
// symlink to /dev/null masks the app (it is left out, and so are the files
// of that name further down the path). Missing directories are skipped; an
// unreadable one is an error, returned with the files found elsewhere.
func Discover(dirs []string) ([]string, error) {
	seen := map[string]bool{}
	var files []string
	var errs []error
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("read app directory: %w", err))
			continue
		}
		for _, e := range entries {
			name := e.Name()
			if !strings.HasSuffix(name, ".toml") || strings.HasPrefix(name, ".") || seen[name] {
				continue
			}
			seen[name] = true
			path := filepath.Join(dir, name)
			if masked(path) {
				continue
			}
			files = append(files, path)
		}
	}
	sort.Slice(files, func(i, j int) bool { return filepath.Base(files[i]) < filepath.Base(files[j]) })
	return files, errors.Join(errs...)
}

// masked reports whether path is a symlink to /dev/null.
func masked(path string) bool {
	target, err := os.Readlink(path)
	return err == nil && target == os.DevNull
}
