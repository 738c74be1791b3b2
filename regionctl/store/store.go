// Package store is regionctl's keyset store: a directory holding, per
// keyset, the root KMS's answer to GenerateKeyset (one EncryptedKeyset per
// region) as a protojson cairn.rootkms.v1.KeysetResponse in
// "<name with / replaced by __>.json". It holds only wrapped material and
// public metadata; the plaintext keysets never leave the root KMS.
//
// Put never replaces an entry: a keyset that was generated once must never
// be silently swapped for another one, or every ciphertext made under the
// old keys would become undecryptable.
package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/internal/region"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// MaxEntrySize bounds one stored keyset file.
const MaxEntrySize = 16 << 20

const ext = ".json"

// Errors callers branch on.
var (
	ErrNotFound = errors.New("store: keyset not in the store")
	ErrExists   = errors.New("store: keyset already in the store")
	ErrInvalid  = errors.New("store: invalid keyset entry")
)

// Store is a keyset store directory.
type Store struct {
	dir string
}

// Open opens the store in dir, creating dir (mode 0700) if needed.
func Open(dir string) (*Store, error) {
	if dir == "" {
		return nil, errors.New("store: no directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

// FileName returns the file name of keyset name in a store directory.
//
// The mapping is not injective ("a__b/c" and "a/b__c" share a file), so
// every entry records its own name, Get checks it, and Put refuses to write
// over another keyset's entry.
func FileName(name string) string { return strings.ReplaceAll(name, "/", "__") + ext }

// Put stores a new keyset: the root KMS's copies, one per region. It refuses
// (with ErrExists) a keyset that is already stored, and (with ErrInvalid)
// copies that are not one consistent keyset named name.
func (s *Store) Put(name string, copies []*cryptov1.EncryptedKeyset) error {
	if err := Check(name, copies); err != nil {
		return err
	}
	data, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(&rootkmsv1.KeysetResponse{Keysets: copies})
	if err != nil {
		return fmt.Errorf("store: encoding %s: %w", name, err)
	}
	path := filepath.Join(s.dir, FileName(name))
	if err := atomicfile.Create(path, append(data, '\n'), 0o600); err != nil {
		if errors.Is(err, atomicfile.ErrExists) {
			if other, rerr := s.read(path); rerr == nil && len(other) > 0 && other[0].GetName() != name {
				return fmt.Errorf("%w: %s holds keyset %q, whose file name collides with %q's", ErrExists, path, other[0].GetName(), name)
			}
			return fmt.Errorf("%w: %s (%s)", ErrExists, name, path)
		}
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// Get returns the stored copies of keyset name, one per region, in the
// order the root KMS returned them.
func (s *Store) Get(name string) ([]*cryptov1.EncryptedKeyset, error) {
	if err := keysets.ValidName(name); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	path := filepath.Join(s.dir, FileName(name))
	copies, err := s.read(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	if len(copies) > 0 && copies[0].GetName() != name {
		// A file-name collision: this file is another keyset's.
		return nil, fmt.Errorf("%w: %s (%s holds %q)", ErrNotFound, name, path, copies[0].GetName())
	}
	if err := Check(name, copies); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return copies, nil
}

// List returns the names of every stored keyset, sorted. Names are read
// from the entries, not guessed from file names.
func (s *Store) List() ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ext) || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(s.dir, e.Name())
		copies, err := s.read(path)
		if err != nil {
			return nil, err
		}
		if len(copies) == 0 {
			return nil, fmt.Errorf("%w: %s holds no keyset", ErrInvalid, path)
		}
		name := copies[0].GetName()
		if FileName(name) != e.Name() {
			return nil, fmt.Errorf("%w: %s holds keyset %q, which belongs in %s", ErrInvalid, path, name, FileName(name))
		}
		if err := Check(name, copies); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		names = append(names, name)
	}
	slices.Sort(names)
	return names, nil
}

func (s *Store) read(path string) ([]*cryptov1.EncryptedKeyset, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxEntrySize+1))
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	if len(data) > MaxEntrySize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrInvalid, path, MaxEntrySize)
	}
	var resp rootkmsv1.KeysetResponse
	if err := (protojson.UnmarshalOptions{}).Unmarshal(data, &resp); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, path, err)
	}
	return resp.GetKeysets(), nil
}

// Check verifies that copies are one keyset named name: at least one copy,
// each for a distinct valid region, with ciphertext, and all with the same
// primary key and key IDs.
func Check(name string, copies []*cryptov1.EncryptedKeyset) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: keyset %q: %s", ErrInvalid, name, fmt.Sprintf(format, a...))
	}
	if err := keysets.ValidName(name); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if len(copies) == 0 {
		return bad("no region copies")
	}
	regions := map[string]bool{}
	for i, c := range copies {
		switch {
		case c.GetName() != name:
			return bad("copy %d is of keyset %q", i, c.GetName())
		case region.ValidName(c.GetRegion()) != nil:
			return bad("copy %d: invalid region %q", i, c.GetRegion())
		case regions[c.GetRegion()]:
			return bad("two copies for region %q", c.GetRegion())
		case len(c.GetCiphertext()) == 0:
			return bad("copy for %q has no ciphertext", c.GetRegion())
		case len(c.GetVersions()) == 0 || !slices.ContainsFunc(c.GetVersions(), func(v *cryptov1.KeyVersionInfo) bool { return v.GetKeyId() == c.GetPrimaryKeyId() }):
			return bad("copy for %q: primary key %d is not among its versions", c.GetRegion(), c.GetPrimaryKeyId())
		case c.GetPrimaryKeyId() != copies[0].GetPrimaryKeyId() || !slices.Equal(keyIDs(c), keyIDs(copies[0])):
			return bad("copies for %q and %q hold different keys", copies[0].GetRegion(), c.GetRegion())
		}
		regions[c.GetRegion()] = true
	}
	return nil
}

func keyIDs(c *cryptov1.EncryptedKeyset) []uint32 {
	ids := make([]uint32, 0, len(c.GetVersions()))
	for _, v := range c.GetVersions() {
		ids = append(ids, v.GetKeyId())
	}
	return ids
}

// Regions returns the regions of copies, in order.
func Regions(copies []*cryptov1.EncryptedKeyset) []string {
	out := make([]string, 0, len(copies))
	for _, c := range copies {
		out = append(out, c.GetRegion())
	}
	return out
}

// ForRegion returns the copy for region, or nil.
func ForRegion(copies []*cryptov1.EncryptedKeyset, region string) *cryptov1.EncryptedKeyset {
	for _, c := range copies {
		if c.GetRegion() == region {
			return c
		}
	}
	return nil
}
