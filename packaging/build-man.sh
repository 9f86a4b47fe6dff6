#!/bin/sh
# build-man.sh renders cohort's three man pages from docs/ into a directory.
#
#   packaging/build-man.sh OUTDIR [VERSION]
#
# Writes OUTDIR/cohort.1, OUTDIR/cohort-generator.8 and OUTDIR/cohort.toml.5
# (troff, not compressed). VERSION goes into the title lines (default:
# "devel"), and the date is SOURCE_DATE_EPOCH's (default: now). go-md2man is
# $GO_MD2MAN, else it is built from the pinned module in packaging/tools.
# build-deb.sh packages what this writes, and packaging's test renders the
# same files through man(1): one implementation of the man pages.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

die() {
	echo "build-man.sh: $*" >&2
	exit 1
}

[ $# -ge 1 ] || die "usage: build-man.sh OUTDIR [VERSION]"
out=$1
version=${2:-devel}
mkdir -p "$out"

for f in docs/cohort.1.md docs/cohort-generator.8.md docs/config.md; do
	[ -f "$f" ] || die "$f is missing: it is needed for the man pages"
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/cohort-man.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
trap 'exit 1' HUP INT TERM

md2man=${GO_MD2MAN:-}
if [ -z "$md2man" ]; then
	md2man=$scratch/go-md2man
	(
		cd packaging/tools
		unset GOOS GOARCH
		CGO_ENABLED=0 go build -trimpath -o "$md2man" github.com/cpuguy83/go-md2man/v2
	) || die "building go-md2man failed"
fi

date_long=$(LC_ALL=C date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" '+%B %Y')

# man_page MD NAME SECTION: render MD, stamp the title line with the date
# and version, left-align the text (.ad l: a justified line of long
# literal words reads badly at 80 columns), and write $out/NAME.SECTION.
man_page() {
	"$md2man" -in "$1" -out "$scratch/$2.$3" ||
		die "go-md2man failed on $1"
	# go-md2man leaves some long table cells on one line, which tbl cannot
	# fit ("table wider than line width"): let the last column, the prose,
	# take the width the others leave (x), and put its long cells in text
	# blocks (T{ … T}), which tbl fills to that width.
	awk -v FS='\t' -v OFS='\t' '
		/^\.TS/ { table = 1; format = 1; print; next }
		/^\.TE/ { table = 0; print; next }
		table && format && /;$/ { print; next }
		table && format {
			# The last column (the prose) takes the width left over.
			last = /\.$/
			sub(/ *\.?$/, "")
			print $0 "x" (last ? " ." : "")
			if (last) format = 0
			next
		}
		table && block && !/^T}/ { print; next }
		table {
			# A row, or the end of a text block ("T}") and the
			# cells after it: a long last cell becomes a text block.
			block = 0
			if (/T\{$/) block = 1
			else if (NF > 1 && length($NF) > 24 && $NF !~ /^T[{}]/) $NF = "T{\n" $NF "\nT}"
			print; next
		}
		{ print }
	' "$scratch/$2.$3" >"$scratch/$2.$3.tbl"
	grep -q '^\.TH ' "$scratch/$2.$3.tbl" ||
		die "$1: no title line (the first '#' heading or a '===' underlined line)"
	sed "s|^\.TH .*|.TH \"$(echo "$2" | tr '[:lower:]' '[:upper:]')\" \"$3\" \"$date_long\" \"cohort $version\" \"cohort manual\"\\n.ad l|" \
		"$scratch/$2.$3.tbl" >"$out/$2.$3"
}

man_page docs/cohort.1.md cohort 1
man_page docs/cohort-generator.8.md cohort-generator 8

# docs/config.md is the reference on the web too, so it has no man header:
# give it a title line and a NAME section, drop its own top heading, and
# make its "##" sections man sections (upper case, as man sections are;
# "###" ones are subsections already). Its keys are bullets, "* `key` (type;
# default X):" and a paragraph indented by two, which GitHub shows as a
# list: here each becomes a definition-list item (the key line, then the
# paragraph indented below it), which man reads better at 80 columns.
{
	printf 'cohort.toml 5 "" "cohort" "cohort manual"\n'
	printf '=========================================\n\n'
	printf '# NAME\n\ncohort.toml - cohort app files: one TOML file per app\n\n'
	printf '# SYNOPSIS\n\n*/etc/cohort/NAME.toml*, */run/cohort/NAME.toml*, */usr/lib/cohort/NAME.toml*\n\n'
	printf '# DESCRIPTION\n\n'
	awk '
		/^(```|~~~)/ { fence = !fence; print; next }
		fence { print; next }
		!seen && /^# / { seen = 1; next }
		/^## / { print "# " toupper(substr($0, 4)); next }
		key && /^  [^ ]/ { sub(/^  /, first ? ":   " : "    "); first = 0; print; next }
		{ key = 0 }
		/^\* `[a-z_]+`(, `[a-z_]+`)* \(.*\):$/ {
			sub(/^\* /, ""); sub(/:$/, ""); print
			key = 1; first = 1; next
		}
		{ print }
	' docs/config.md
} >"$scratch/cohort.toml.5.md"
man_page "$scratch/cohort.toml.5.md" cohort.toml 5
