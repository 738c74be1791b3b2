package kms

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/bundle"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
)

// BundleFile is the name, in Config.StateDir, of the last applied signed
// bundle.
const BundleFile = "bundle.pb"

// PreviousBundleFile is the name, in Config.StateDir, of the signed bundle
// served before the last applied one: what a rollback restores.
const PreviousBundleFile = "previous-bundle.pb"

// maxBundleFile bounds what readBundleFile reads: a signed bundle is the
// bundle plus a signature and a key ID.
const maxBundleFile = bundle.MaxSize + 4096

// readBundleFile reads the persisted signed bundle name (BundleFile or
// PreviousBundleFile); (nil, nil) if there is none.
func readBundleFile(dir, name string) (*bundlev1.SignedBundle, error) {
	path := filepath.Join(dir, name)
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Size() > maxBundleFile {
		return nil, fmt.Errorf("%s is %d bytes, more than %d", path, fi.Size(), maxBundleFile)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var sb bundlev1.SignedBundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		return nil, fmt.Errorf("%s does not decode: %w", path, err)
	}
	return &sb, nil
}

// writeBundleFile replaces the persisted bundle atomically: a temporary file
// (mode 0600) is written and synced, renamed over the old one, and the
// directory synced. A failure leaves the old file in place, except
// errNotDurable, returned (wrapped) after the rename.
func writeBundleFile(dir, name string, sb *bundlev1.SignedBundle) error {
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(sb)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, name+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	ok = true
	d, err := os.Open(dir)
	if err == nil {
		err = d.Sync()
		d.Close()
	}
	if err != nil {
		return fmt.Errorf("%w: %v", errNotDurable, err)
	}
	return nil
}

// errNotDurable reports that the new bundle file replaced the old one but
// the directory could not be synced: the file is in place, its rename may
// not survive a crash.
var errNotDurable = errors.New("bundle file renamed into place, but the directory sync failed")
