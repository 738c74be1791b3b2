package softhsmtest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// MakeReadOnly makes the directory of the token labelled label, and every
// file in it, read-only for this process until the test ends (a cleanup
// undoes it, so that the test's directory can be removed). It stands for a
// token directory on a read-only mount or with the wrong owner.
//
// Permission bits do not stop root, so as root it sets the immutable
// attribute (chattr +i; it needs CAP_LINUX_IMMUTABLE and a filesystem that
// supports it, such as ext4, xfs, btrfs or tmpfs since Linux 6.0); other
// users get chmod a-w. Either way it then checks that a file can neither be
// created in the directory nor opened for writing, and fails the test with
// the reason if the environment allows neither mechanism: the test never
// passes without having run against a read-only directory.
func (e *Env) MakeReadOnly(label string) {
	e.t.Helper()
	dir := e.TokenDir(label)
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		paths = append(paths, p)
		return nil
	})
	if err != nil {
		e.t.Fatalf("softhsmtest: listing token directory %s: %v", dir, err)
	}
	// Files first, then the directory that holds them.
	for i, j := 0, len(paths)-1; i < j; i, j = i+1, j-1 {
		paths[i], paths[j] = paths[j], paths[i]
	}
	var how string
	var undo func() error
	if os.Geteuid() == 0 {
		how = "the immutable attribute (chattr +i)"
		err = setImmutable(paths, true)
		undo = func() error { return setImmutable(paths, false) }
	} else {
		how = "chmod a-w"
		modes := map[string]fs.FileMode{}
		for _, p := range paths {
			fi, serr := os.Stat(p)
			if serr != nil {
				err = serr
				break
			}
			modes[p] = fi.Mode().Perm()
			if cerr := os.Chmod(p, fi.Mode().Perm()&^0o222); cerr != nil {
				err = cerr
				break
			}
		}
		undo = func() error {
			var errs []error
			for p, m := range modes {
				errs = append(errs, os.Chmod(p, m))
			}
			return errors.Join(errs...)
		}
	}
	e.t.Cleanup(func() {
		if err := undo(); err != nil {
			e.t.Errorf("softhsmtest: making token directory %s writable again: %v", dir, err)
		}
	})
	if err != nil {
		e.t.Fatalf("softhsmtest: cannot make token directory %s read-only with %s: %v (as root this needs CAP_LINUX_IMMUTABLE and a filesystem with chattr +i support; run as a non-root user otherwise)", dir, how, err)
	}
	if err := checkReadOnly(dir, paths); err != nil {
		e.t.Fatalf("softhsmtest: token directory %s is still writable after %s: %v", dir, how, err)
	}
}

// checkReadOnly returns an error unless creating a file in dir and opening
// each regular file of paths for writing all fail.
func checkReadOnly(dir string, paths []string) error {
	probe := filepath.Join(dir, "softhsmtest-write-probe")
	if f, err := os.OpenFile(probe, os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
		f.Close()
		os.Remove(probe)
		return fmt.Errorf("created %s", probe)
	}
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if f, err := os.OpenFile(p, os.O_WRONLY, 0); err == nil {
			f.Close()
			return fmt.Errorf("opened %s for writing", p)
		}
	}
	return nil
}
