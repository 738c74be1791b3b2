package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/tink"
)

// MaxObjectSize bounds one object: envelope encryption here is one-shot (the
// whole object in memory). For larger objects use Tink's streaming AEAD with
// a keyset wrapped by the Cairn key (keyset.Write), not this.
const MaxObjectSize = 64 << 20

// Store keeps objects envelope-encrypted in a directory: each object gets its
// own data-encryption key (DEK), made locally by Tink; only the DEK is sent
// to Cairn to be wrapped. The object's name is the associated data of its
// ciphertext, so an object file copied or renamed over another does not
// decrypt as it.
type Store struct {
	dir string
	// keyURI names the Cairn keyset that wraps new objects' DEKs.
	keyURI string
	// kek returns the Cairn AEAD of a key URI: objects stored under an
	// earlier keyset still decrypt after the store moves to a new one.
	kek func(keyURI string) (tink.AEADWithContext, error)

	mu sync.Mutex
	// envelopes encrypt and decrypt with a fresh DEK per object, one per key
	// URI. Tink calls the Cairn AEAD once per Encrypt (wrap the DEK) and
	// once per Decrypt (unwrap it).
	envelopes map[string]tink.AEADWithContext
}

// object is the on-disk form of one object: public metadata and the envelope
// ciphertext (wrapped DEK and payload). Nothing in it is secret.
type object struct {
	Name       string    `json:"name"`
	KeyURI     string    `json:"key_uri"`
	DEK        string    `json:"dek_template"`
	Size       int       `json:"size"`
	Created    time.Time `json:"created"`
	Ciphertext []byte    `json:"ciphertext"`
}

// dekTemplate is the DEK type: AES-256-GCM, the usual choice.
const dekTemplate = "AES256_GCM"

// NewStore returns a store in dir whose new objects' DEKs are wrapped by the
// Cairn keyset keyURI; kek returns the Cairn AEAD of a key URI (with
// kmsclient: Client.AEAD of the URI's region and keyset).
func NewStore(dir, keyURI string, kek func(keyURI string) (tink.AEADWithContext, error)) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	s := &Store{dir: dir, keyURI: keyURI, kek: kek, envelopes: make(map[string]tink.AEADWithContext)}
	if _, err := s.envelope(keyURI); err != nil { // fail now on a bad key URI
		return nil, err
	}
	return s, nil
}

// envelope returns the envelope AEAD whose DEKs keyURI wraps.
func (s *Store) envelope(keyURI string) (tink.AEADWithContext, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if env, ok := s.envelopes[keyURI]; ok {
		return env, nil
	}
	kek, err := s.kek(keyURI)
	if err != nil {
		return nil, fmt.Errorf("blobstore: key %s: %w", keyURI, err)
	}
	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), kek)
	if err != nil {
		return nil, fmt.Errorf("blobstore: envelope AEAD: %w", err)
	}
	s.envelopes[keyURI] = env
	return env, nil
}

// ErrNotFound is returned for an object the store does not hold.
var ErrNotFound = errors.New("blobstore: no such object")

// validName accepts object names of 1-200 bytes of letters, digits and
// ._- (no path separators: an object is one file of the store).
func validName(name string) error {
	if len(name) == 0 || len(name) > 200 || name[0] == '.' {
		return fmt.Errorf("blobstore: object name %q: use 1-200 letters, digits, '.', '_' or '-', not starting with '.'", name)
	}
	for _, c := range []byte(name) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("blobstore: object name %q: use 1-200 letters, digits, '.', '_' or '-', not starting with '.'", name)
		}
	}
	return nil
}

func (s *Store) path(name string) string { return filepath.Join(s.dir, name+".blob") }

// associatedData binds a ciphertext to its object name.
func associatedData(name string) []byte { return []byte("blobstore/v1 object " + name) }

// Put encrypts data under a fresh DEK and stores it as name, replacing any
// object of that name. The file is written to a temporary name, synced, and
// renamed, so a crash leaves the old object or the new one, never half.
func (s *Store) Put(ctx context.Context, name string, data []byte) error {
	if err := validName(name); err != nil {
		return err
	}
	if len(data) > MaxObjectSize {
		return fmt.Errorf("blobstore: object %q is %d bytes, more than %d", name, len(data), MaxObjectSize)
	}
	env, err := s.envelope(s.keyURI)
	if err != nil {
		return err
	}
	ct, err := env.EncryptWithContext(ctx, data, associatedData(name))
	if err != nil {
		return fmt.Errorf("blobstore: encrypt %q: %w", name, err)
	}
	raw, err := json.Marshal(object{Name: name, KeyURI: s.keyURI, DEK: dekTemplate, Size: len(data), Created: time.Now().UTC(), Ciphertext: ct})
	if err != nil {
		return fmt.Errorf("blobstore: %w", err)
	}
	tmp, err := os.CreateTemp(s.dir, ".put-*")
	if err != nil {
		return fmt.Errorf("blobstore: %w", err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename this finds nothing
	if _, err := tmp.Write(raw); err != nil {
		tmp.Close()
		return fmt.Errorf("blobstore: write %q: %w", name, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("blobstore: sync %q: %w", name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("blobstore: write %q: %w", name, err)
	}
	if err := os.Rename(tmp.Name(), s.path(name)); err != nil {
		return fmt.Errorf("blobstore: store %q: %w", name, err)
	}
	// The rename is durable only once the directory is: without this, a
	// power loss after "stored" could bring back the old object, or none.
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("blobstore: store %q: %w", name, err)
	}
	return nil
}

// syncDir flushes a directory's entries to stable storage.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Get decrypts and returns the object name. A tampered, truncated or moved
// object file fails with an error; it never returns partial data.
func (s *Store) Get(ctx context.Context, name string) ([]byte, error) {
	o, err := s.read(name)
	if err != nil {
		return nil, err
	}
	if o.DEK != dekTemplate {
		return nil, fmt.Errorf("blobstore: object %q uses DEK type %q; this blobstore reads %s", name, o.DEK, dekTemplate)
	}
	env, err := s.envelope(o.KeyURI)
	if err != nil {
		return nil, err
	}
	data, err := env.DecryptWithContext(ctx, o.Ciphertext, associatedData(name))
	if err != nil {
		return nil, fmt.Errorf("blobstore: decrypt %q: %w", name, err)
	}
	return data, nil
}

func (s *Store) read(name string) (*object, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	var o object
	if err := json.Unmarshal(raw, &o); err != nil {
		return nil, fmt.Errorf("blobstore: object %q is damaged: %w", name, err)
	}
	if o.Name != name {
		return nil, fmt.Errorf("blobstore: object file %q holds object %q", name, o.Name)
	}
	return &o, nil
}

// Info is what List tells about an object without decrypting it.
type Info struct {
	Name    string
	KeyURI  string
	Size    int
	Created time.Time
	// Fingerprint is a short hash of the stored ciphertext (not of the
	// plaintext, which List never sees).
	Fingerprint string
	// Damaged, if not empty, says why the object's file could not be read;
	// the other fields but Name are then empty.
	Damaged string
}

// List returns the objects in name order, from their public metadata. An
// object whose file cannot be read is listed with Damaged set.
func (s *Store) List() ([]Info, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	var out []Info
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".blob")
		if !ok || !e.Type().IsRegular() || validName(name) != nil {
			continue
		}
		o, err := s.read(name)
		if err != nil {
			// One damaged file must not hide the rest of the store.
			out = append(out, Info{Name: name, Damaged: err.Error()})
			continue
		}
		sum := sha256.Sum256(o.Ciphertext)
		out = append(out, Info{Name: o.Name, KeyURI: o.KeyURI, Size: o.Size, Created: o.Created, Fingerprint: hex.EncodeToString(sum[:6])})
	}
	slices.SortFunc(out, func(a, b Info) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Delete removes the object name. Its DEK existed only wrapped inside it, so
// the data is gone with the file (crypto-shredding a whole keyset is done
// in Cairn, by retiring its versions).
func (s *Store) Delete(name string) error {
	if err := validName(name); err != nil {
		return err
	}
	if err := os.Remove(s.path(name)); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	} else if err != nil {
		return fmt.Errorf("blobstore: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("blobstore: delete %q: %w", name, err)
	}
	return nil
}
