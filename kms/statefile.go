package kms

import (
	"bytes"
	"crypto/sha256"
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
	sb, _, err := readBundleFileData(dir, name)
	return sb, err
}

// readBundleFileData is readBundleFile that also returns the file's bytes.
func readBundleFileData(dir, name string) (*bundlev1.SignedBundle, []byte, error) {
	path := filepath.Join(dir, name)
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, nil, fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Size() > maxBundleFile {
		return nil, nil, fmt.Errorf("%s is %d bytes, more than %d", path, fi.Size(), maxBundleFile)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var sb bundlev1.SignedBundle
	if err := proto.Unmarshal(data, &sb); err != nil {
		return nil, nil, fmt.Errorf("%s does not decode: %w", path, err)
	}
	return &sb, data, nil
}

// persistedBundle is what the server keeps in memory of a signed bundle in
// its state directory, rather than the bundle itself (hundreds of bytes per
// keyset): its ref, the size of its bundle bytes (what the shrink guard
// compares), and its signature and signing key ID, against which, with the
// ref's SHA-256, every read of the file is checked (readHeldBundle).
// Immutable.
type persistedBundle struct {
	ref       *bundlev1.BundleRef
	size      int
	signature []byte
	keyID     string
}

// newPersistedBundle describes sb, whose ref is ref.
func newPersistedBundle(ref *bundlev1.BundleRef, sb *bundlev1.SignedBundle) *persistedBundle {
	return &persistedBundle{ref: ref, size: len(sb.GetBundle()), signature: bytes.Clone(sb.GetSignature()), keyID: sb.GetSigningKeyId()}
}

// String names the bundle for messages: its serial and SHA-256.
func (p *persistedBundle) String() string {
	if p == nil {
		return "(none)"
	}
	return fmt.Sprintf("serial %d sha256 %x", p.ref.GetSerial(), p.ref.GetSha256())
}

// errStateFile reports that a bundle file in the state directory does not
// hold the bundle the server wrote there (or read from it at start): it is
// missing, unreadable, or different.
var errStateFile = errors.New("kms: the state directory does not hold the bundle this server persisted")

// readHeldBundle reads the bundle file name and checks that it holds
// exactly the signed bundle want describes: the SHA-256 of its bundle bytes
// is the ref's (as bundle.Ref computes it), its signature and signing key ID
// are want's, and it has no other field. It returns the signed bundle and
// the file's bytes. The error names the file and says what is wrong with it;
// it does not say what to do (that depends on the file: see the callers).
func readHeldBundle(dir, name string, want *persistedBundle) (*bundlev1.SignedBundle, []byte, error) {
	path := filepath.Join(dir, name)
	sb, data, err := readBundleFileData(dir, name)
	switch {
	case err != nil:
		return nil, nil, fmt.Errorf("%s (which should hold bundle %s) cannot be read: %w", path, want, err)
	case sb == nil:
		return nil, nil, fmt.Errorf("%s (which should hold bundle %s) is missing", path, want)
	}
	if sum := sha256.Sum256(sb.GetBundle()); !bytes.Equal(sum[:], want.ref.GetSha256()) {
		return nil, nil, fmt.Errorf("%s holds another bundle (sha256 %x), not bundle %s", path, sum, want)
	}
	if !bytes.Equal(sb.GetSignature(), want.signature) || sb.GetSigningKeyId() != want.keyID {
		return nil, nil, fmt.Errorf("%s holds bundle %s under another signature (signing key ID %q) than the one applied (%q)", path, want, sb.GetSigningKeyId(), want.keyID)
	}
	if len(sb.ProtoReflect().GetUnknown()) > 0 {
		return nil, nil, fmt.Errorf("%s holds bundle %s with fields added", path, want)
	}
	return sb, data, nil
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
	return writeBundleData(dir, name, data)
}

// writeBundleData is writeBundleFile of a file's bytes (those of another
// bundle file).
func writeBundleData(dir, name string, data []byte) error {
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
