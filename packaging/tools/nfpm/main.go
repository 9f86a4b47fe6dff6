// Command nfpm is nfpm's `package` subcommand with only the deb packager
// linked in. It reads the same nfpm.yaml as the upstream CLI
// (github.com/goreleaser/nfpm/v2/cmd/nfpm) and produces the same package.
//
// Why not the upstream CLI: its main package imports every packager, and
// the rpm and msix packagers of v2.48.0 depend on go.digitalxero.dev
// modules that the Go module proxy refuses to serve (403), so
// `go run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0` cannot build.
// The deb packager and the config parser are the upstream library code,
// pinned by this module's go.mod. Where the upstream CLI builds, this is
// equivalent to `nfpm package -f nfpm.yaml -p deb -t TARGET`.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the "deb" packager
)

func main() {
	config := flag.String("f", "nfpm.yaml", "config file")
	packager := flag.String("p", "deb", "packager")
	target := flag.String("t", "", "package file or directory to write (default: current directory)")
	flag.Parse()
	if flag.NArg() > 0 && flag.Arg(0) != "package" && flag.Arg(0) != "pkg" {
		fmt.Fprintf(os.Stderr, "nfpm: only the package subcommand is built in, not %q\n", flag.Arg(0))
		os.Exit(2)
	}
	if err := pack(*config, *packager, *target); err != nil {
		fmt.Fprintln(os.Stderr, "nfpm:", err)
		os.Exit(1)
	}
}

func pack(configPath, packager, target string) error {
	cfg, err := nfpm.ParseFile(configPath)
	if err != nil {
		return err
	}
	info, err := cfg.Get(packager)
	if err != nil {
		return err
	}
	info = nfpm.WithDefaults(info)
	pkg, err := nfpm.Get(packager)
	if err != nil {
		return err
	}
	if st, err := os.Stat(target); target == "" || (err == nil && st.IsDir()) {
		target = filepath.Join(target, pkg.ConventionalFileName(info))
	}
	f, err := os.Create(target)
	if err != nil {
		return err
	}
	info.Target = target
	if err := pkg.Package(info, f); err != nil {
		f.Close()
		os.Remove(target)
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Println("created package:", target)
	return nil
}
