package softhsmtest

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// fsImmutableFL is FS_IMMUTABLE_FL of linux/fs.h (x/sys/unix does not name it).
const fsImmutableFL = 0x00000010

// setImmutable sets or clears the immutable attribute of each path, as
// chattr +i and chattr -i do.
func setImmutable(paths []string, on bool) error {
	for _, p := range paths {
		if err := setImmutable1(p, on); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	return nil
}

func setImmutable1(path string, on bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return fmt.Errorf("FS_IOC_GETFLAGS: %w", err)
	}
	if on {
		flags |= fsImmutableFL
	} else {
		flags &^= fsImmutableFL
	}
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags)); err != nil {
		return fmt.Errorf("FS_IOC_SETFLAGS: %w", err)
	}
	return nil
}
