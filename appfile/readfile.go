package appfile

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// MaxFileSize is the most an app file, or a file it names (an environment
// file), may hold. Real app files are a few hundred bytes; the cap keeps a
// symlink to /dev/zero or a huge file from exhausting the generator's
// memory at boot.
const MaxFileSize = 1 << 20

// ErrNotRegular is returned (wrapped) by ReadRegularFile for a path that is
// not a regular file once symlinks are followed: a FIFO, a device, a socket
// or a directory.
var ErrNotRegular = errors.New("not a regular file")

// ReadRegularFile reads the regular file at path, at most limit bytes.
//
// It opens with O_NONBLOCK, so opening a FIFO that no writer holds returns
// at once instead of blocking, and checks with fstat that what it opened is
// a regular file before reading a byte: a FIFO, a device (/dev/zero) or a
// socket is refused. A file larger than limit is refused whole rather than
// truncated, so that a parser never sees half a file. Every reader of an
// input file that someone other than the reader may have placed goes
// through here.
func ReadRegularFile(path string, limit int64) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s: %w (%s)", path, ErrNotRegular, fileKind(st.Mode))
	}
	if st.Size > limit {
		return nil, fmt.Errorf("%s: %d bytes, more than the %d bytes allowed", path, st.Size, limit)
	}
	// The size can change between fstat and read: read one byte more than
	// allowed to notice a file that grew.
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s: more than the %d bytes allowed", path, limit)
	}
	return data, nil
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symlink"
	}
	return fmt.Sprintf("file type %#o", mode&unix.S_IFMT)
}
