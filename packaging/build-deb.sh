#!/bin/sh
# build-deb.sh builds cohort's .deb with nfpm from nfpm.yaml.
#
#   packaging/build-deb.sh [VERSION [ARCH]]
#   packaging/build-deb.sh --debian-version VERSION
#
# VERSION is what `git describe --tags --always --dirty` prints (`make deb`
# passes it; default: run git describe here). It becomes a Debian version:
#
#   v1.2.0                 1.2.0
#   v1.2.0-rc1             1.2.0~rc1                (sorts before 1.2.0)
#   v1.2.0-3-gabc1234      1.2.0+git3.abc1234       (after 1.2.0)
#   abc1234 (no tag yet)   0.0.0~git<N>.abc1234     (N: commits on HEAD)
#   …-dirty                …+dirty
#
# ARCH is a Debian architecture, amd64 or arm64 (default: $DEB_ARCH, else
# the Go host architecture). Binaries are built with CGO_ENABLED=0, so every
# architecture is cross-built the same way.
#
# Writes dist/cohort_<debversion>_<arch>.deb and prints its path as the last
# line. Tools (nfpm, go-md2man) come from the pinned module in
# packaging/tools (Go's build cache makes rebuilding them cheap); nothing is
# downloaded except through the Go module proxy.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

die() {
	echo "build-deb.sh: $*" >&2
	exit 1
}

# --debian-version VERSION: print the Debian version and stop (for tests).
version_only=
if [ "${1:-}" = --debian-version ]; then
	version_only=1
	shift
fi

raw=${1:-$(git describe --tags --always --dirty 2>/dev/null || echo 0.0.0-dev)}
arch=${2:-${DEB_ARCH:-$(go env GOHOSTARCH)}}

case "$arch" in
amd64 | arm64) goarch=$arch ;;
*) die "unsupported architecture '$arch' (amd64 or arm64)" ;;
esac

# debian_version turns a git describe string into a Debian version.
debian_version() {
	v=$1
	dirty=
	case "$v" in
	*-dirty)
		v=${v%-dirty}
		dirty=+dirty
		;;
	esac
	v=${v#v}
	if expr "$v" : '.*-[0-9][0-9]*-g[0-9a-f][0-9a-f]*$' >/dev/null; then
		# TAG-N-gSHA: N commits after the tag TAG.
		sha=${v##*-g}
		rest=${v%-g*}
		n=${rest##*-}
		tag=${rest%-*}
		v=$(echo "$tag" | tr - '~')+git$n.$sha
	elif expr "$v" : '[0-9a-f]\{4,40\}$' >/dev/null &&
		! git rev-parse -q --verify "refs/tags/$1" >/dev/null 2>&1; then
		# A bare abbreviated hash (and not a tag of that name): no tag yet.
		n=$(git rev-list --count HEAD 2>/dev/null || echo 0)
		v=0.0.0~git$n.$v
	else
		# A tag (1.2.0, 1.2.0-rc1) or the fallback 0.0.0-dev.
		v=$(echo "$v" | tr - '~')
	fi
	v=$v$dirty
	# Debian upstream versions start with a digit and use only these.
	expr "$v" : '[0-9][A-Za-z0-9.+~]*$' >/dev/null ||
		die "cannot make a Debian version of '$1' (got '$v')"
	echo "$v"
}

debver=$(debian_version "$raw")
if [ -n "$version_only" ]; then
	echo "$debver"
	exit 0
fi
out=$root/dist/cohort_${debver}_${arch}.deb

# Reproducible dates: the commit's, unless the caller fixed one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

for d in cmd/cohort cmd/cohort-generator; do
	ls "$d"/*.go >/dev/null 2>&1 || die "$d has no Go files yet: cannot build the package"
done

# Everything is built in a private staging directory and the package is
# moved into place at the end, so that concurrent builds (the package test,
# vmtests, make deb) never see each other's half-written files.
mkdir -p "$root/dist"
stage=$(mktemp -d "$root/dist/.stage-$arch.XXXXXX")
trap 'rm -rf "$stage"' EXIT
trap 'exit 1' HUP INT TERM
tools=$stage/tools
mkdir -p "$stage/man" "$tools"

# The tools run on the build host, whatever ARCH is.
(
	cd packaging/tools
	unset GOOS GOARCH
	CGO_ENABLED=0 go build -trimpath -o "$tools/nfpm" ./nfpm
	CGO_ENABLED=0 go build -trimpath -o "$tools/go-md2man" github.com/cpuguy83/go-md2man/v2
) || die "building the packaging tools failed"

CGO_ENABLED=0 GOOS=linux GOARCH=$goarch go build -trimpath -buildvcs=false \
	-ldflags "-s -w -X main.version=$raw" -o "$stage/" ./cmd/cohort ./cmd/cohort-generator ||
	die "building the binaries for $arch failed"

date_rfc=$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")

# The man pages: packaging/build-man.sh renders them (the package test
# renders them through man(1) with the same script).
GO_MD2MAN=$tools/go-md2man packaging/build-man.sh "$stage/man" "$debver" ||
	die "rendering the man pages failed"
for page in cohort.1 cohort-generator.8 cohort.toml.5; do
	gzip -9n "$stage/man/$page"
done

# The Debian changelog: packaging/changelog holds the released versions,
# newest first (when tagging vX.Y.Z, add "cohort (X.Y.Z) unstable; …" on
# top). A build of anything else gets a generated entry listing the commits
# since the last tag; entries newer than the build or UNRELEASED are left
# out, so that versions go down the file.
released() {
	[ -s packaging/changelog ] || return 0
	keep=
	while IFS= read -r line; do
		case "$line" in
		"cohort ("*)
			v=${line#cohort (}
			v=${v%%)*}
			keep=1
			case "$line" in *" UNRELEASED;"*) keep= ;; esac
			if [ -n "$keep" ] && ! dpkg --compare-versions "$v" le "$debver" 2>/dev/null; then
				keep=
			fi
			;;
		esac
		if [ -n "$keep" ]; then printf '%s\n' "$line"; fi
	done <packaging/changelog
}
# shorten_subjects cuts each line to 72 characters at a word boundary:
# a word cut in half can read as a misspelling to lintian ("spaw").
shorten_subjects() {
	awk '{ if (length($0) > 72) { s = substr($0, 1, 69); sub(/ [^ ]*$/, "", s); $0 = s "..." } print }'
}
released >"$stage/changelog.released"
if ! head -n1 "$stage/changelog.released" | grep -q "^cohort ($debver) "; then
	{
		echo "cohort ($debver) unstable; urgency=medium"
		echo
		echo "  * Build of $raw."
		last=$(git describe --tags --abbrev=0 2>/dev/null || true)
		git log --no-merges --format='%s' ${last:+"$last"..}HEAD 2>/dev/null |
			head -n 50 | shorten_subjects | sed 's/^/    - /'
		echo
		echo " -- cohort developers <cohort-dev@users.noreply.github.com>  $date_rfc"
		if [ -s "$stage/changelog.released" ]; then echo; fi
	} >"$stage/changelog"
fi
cat "$stage/changelog.released" >>"$stage/changelog"
gzip -9n <"$stage/changelog" >"$stage/changelog.gz"

COHORT_DEB_VERSION=$debver COHORT_DEB_ARCH=$arch COHORT_STAGE=$stage \
	"$tools/nfpm" -f nfpm.yaml -p deb -t "$stage/package.deb" >/dev/null ||
	die "nfpm failed"
mv -f "$stage/package.deb" "$out"
echo "$out"
