// Package packaging holds cohort's Debian packaging: the build script
// (build-deb.sh), maintainer scripts, the example app file, the bash
// completion, the DEP-5 copyright file and the lintian overrides that
// nfpm.yaml at the repository root puts into the .deb.
//
// It has no Go code of its own. Its tests build the package with
// build-deb.sh and check what dpkg sees: file list, modes, owners,
// conffiles, control fields, man pages, the changelog, and that the
// copyright file names every module linked into the binaries. Build tools
// (nfpm, go-md2man) are pinned in the separate module packaging/tools so
// that they never enter the main module's dependencies.
package packaging
