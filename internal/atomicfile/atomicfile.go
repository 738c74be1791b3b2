// Package atomicfile writes files so that a reader (or a crash) sees either
// nothing, the old content or the whole new content, never part of it: the
// data goes to a temporary file in the same directory, is synced, and is then
// renamed (Write) or hard-linked (Create) into place, and the directory is
// synced.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrExists is returned by Create when path already exists.
var ErrExists = errors.New("atomicfile: file exists")

// Write atomically replaces path with data, with the given mode.
func Write(path string, data []byte, mode os.FileMode) error {
	return write(path, data, mode, false)
}

// Create atomically creates path with data and the given mode; it fails with
// an error wrapping ErrExists (and changes nothing) if path exists.
func Create(path string, data []byte, mode os.FileMode) error {
	return write(path, data, mode, true)
}

func write(path string, data []byte, mode os.FileMode, exclusive bool) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	// CreateTemp makes the file 0600, so it is never more readable than
	// mode, not even for a moment.
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	if exclusive {
		// link(2) fails if the target exists: create-if-absent, atomically.
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%w: %s", ErrExists, path)
			}
			return fmt.Errorf("atomicfile: writing %s: %w", path, err)
		}
		os.Remove(tmp)
	} else if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("atomicfile: writing %s: %w", path, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("atomicfile: syncing directory of %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
