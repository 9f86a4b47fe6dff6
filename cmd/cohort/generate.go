package main

import (
	"context"
	"fmt"
	"os"

	"github.com/cohort-dev/cohort/appfile"
	"github.com/cohort-dev/cohort/generator"
)

func cmdGenerate(ctx context.Context, env *environment, args []string) int {
	fs := newFlags(env, "generate", "[--dir DIR] [FILE.toml…]",
		"Render the systemd units for app files (default: every app on the search\n"+
			"path). Without --dir they are printed; with --dir they are written into\n"+
			"DIR exactly as cohort-generator writes them, wants-symlinks included.")
	dir := fs.String("dir", "", "write the units into `DIR` instead of printing them")
	cohort := fs.String("cohort", generator.DefaultCohortPath, "the cohort binary that the services run")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	files, err := appFiles(env, fs.Args())
	code := 0
	if err != nil {
		fmt.Fprintf(env.stderr, "cohort generate: %v\n", err)
		code = 1
	}
	if *dir != "" {
		if err := os.MkdirAll(*dir, 0o755); err != nil {
			fmt.Fprintf(env.stderr, "cohort generate: %v\n", err)
			return 1
		}
	}
	for _, path := range files {
		app, err := appfile.ParseFile(path)
		if err != nil {
			fmt.Fprintln(env.stderr, err)
			code = 1
			continue
		}
		us, err := generator.Render(app, generator.Options{CohortPath: *cohort})
		if err != nil {
			fmt.Fprintln(env.stderr, err)
			code = 1
			continue
		}
		if *dir != "" {
			if err := generator.Write(*dir, us, nil); err != nil {
				fmt.Fprintf(env.stderr, "cohort generate: %s: %v\n", path, err)
				code = 1
			}
			continue
		}
		for _, f := range us.Files {
			fmt.Fprintf(env.stdout, "# %s\n%s", f.Name, f.Content)
		}
	}
	return code
}
