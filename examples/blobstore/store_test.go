package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
)

// localKEK stands in for the Cairn AEAD in these unit tests of the store's
// own logic (the end-to-end test in tests/ runs blobstore against a real
// chain): a Tink AES-GCM AEAD that counts calls and can be made to fail.
type localKEK struct {
	a              tink.AEAD
	encrypts, decs atomic.Int32
	fail           atomic.Bool
}

func newLocalKEK(t *testing.T) *localKEK {
	t.Helper()
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		t.Fatal(err)
	}
	a, err := aead.New(h)
	if err != nil {
		t.Fatal(err)
	}
	return &localKEK{a: a}
}

var errKEKDown = errors.New("kek down")

func (k *localKEK) EncryptWithContext(_ context.Context, pt, ad []byte) ([]byte, error) {
	k.encrypts.Add(1)
	if k.fail.Load() {
		return nil, errKEKDown
	}
	return k.a.Encrypt(pt, ad)
}

func (k *localKEK) DecryptWithContext(_ context.Context, ct, ad []byte) ([]byte, error) {
	k.decs.Add(1)
	if k.fail.Load() {
		return nil, errKEKDown
	}
	return k.a.Decrypt(ct, ad)
}

func newTestStore(t *testing.T, dir, uri string, keks map[string]*localKEK) *Store {
	t.Helper()
	s, err := NewStore(dir, uri, func(u string) (tink.AEADWithContext, error) {
		k, ok := keks[u]
		if !ok {
			return nil, errors.New("unknown key URI")
		}
		return k, nil
	})
	if err != nil {
		t.Fatalf("NewStore = %v", err)
	}
	return s
}

const uri1, uri2 = "cairn-kms://us-east/demo/blobs", "cairn-kms://us-east/demo/blobs-2027"

func TestPutGetListDelete(t *testing.T) {
	dir := t.TempDir()
	kek := newLocalKEK(t)
	s := newTestStore(t, dir, uri1, map[string]*localKEK{uri1: kek})
	ctx := t.Context()
	objects := map[string][]byte{"a.txt": []byte("alpha secret"), "b.bin": bytes.Repeat([]byte{0, 1, 2}, 100_000), "empty": {}}
	for name, data := range objects {
		if err := s.Put(ctx, name, data); err != nil {
			t.Fatalf("Put(%s) = %v", name, err)
		}
	}
	if n := kek.encrypts.Load(); n != 3 {
		t.Errorf("KEK wrapped %d DEKs for 3 objects, want 3 (one fresh DEK per object)", n)
	}
	for name, data := range objects {
		got, err := s.Get(ctx, name)
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("Get(%s) = %d bytes, %v; want the %d bytes put", name, len(got), err, len(data))
		}
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].Name != "a.txt" || list[1].Name != "b.bin" || list[2].Name != "empty" || list[1].Size != 300_000 || list[0].KeyURI != uri1 {
		t.Errorf("List = %+v, want a.txt, b.bin (300000 bytes), empty, under %s", list, uri1)
	}
	// Nothing on disk holds the plaintext.
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	for _, f := range files {
		raw, _ := os.ReadFile(f)
		if bytes.Contains(raw, []byte("alpha secret")) {
			t.Errorf("%s holds the plaintext", f)
		}
	}
	if err := s.Delete("a.txt"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "a.txt"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(deleted) = %v, want ErrNotFound", err)
	}
	if err := s.Delete("a.txt"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete(deleted) = %v, want ErrNotFound", err)
	}
}

func TestTamperedOrMovedObjectsDoNotDecrypt(t *testing.T) {
	dir := t.TempDir()
	s := newTestStore(t, dir, uri1, map[string]*localKEK{uri1: newLocalKEK(t)})
	ctx := t.Context()
	for _, n := range []string{"x", "y"} {
		if err := s.Put(ctx, n, []byte("data of "+n)); err != nil {
			t.Fatal(err)
		}
	}
	// y's file copied over x, with the name inside changed to match: the
	// ciphertext is bound to "y".
	raw, _ := os.ReadFile(s.path("y"))
	if err := os.WriteFile(s.path("x"), bytes.Replace(raw, []byte(`"name":"y"`), []byte(`"name":"x"`), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, "x"); err == nil || got != nil {
		t.Errorf("Get(x holding y's ciphertext) = %q, %v; want an error and no data", got, err)
	}
	// A flipped ciphertext byte.
	raw, _ = os.ReadFile(s.path("y"))
	i := bytes.Index(raw, []byte(`"ciphertext":"`)) + len(`"ciphertext":"`) + 40
	raw[i] ^= 1
	if err := os.WriteFile(s.path("y"), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, "y"); err == nil || got != nil {
		t.Errorf("Get(tampered y) = %q, %v; want an error and no data", got, err)
	}
	// Truncated.
	if err := os.WriteFile(s.path("y"), raw[:len(raw)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "y"); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("Get(truncated y) = %v, want a damaged-object error", err)
	}
	// List still shows everything, the damaged object marked.
	list, err := s.List()
	if err != nil || len(list) != 2 || list[0].Name != "x" || list[0].Damaged != "" || list[1].Name != "y" || !strings.Contains(list[1].Damaged, "damaged") {
		t.Errorf("List with y damaged = %+v, %v; want x fine and y marked damaged", list, err)
	}
}

func TestOldObjectsDecryptAfterKeyChange(t *testing.T) {
	dir := t.TempDir()
	keks := map[string]*localKEK{uri1: newLocalKEK(t), uri2: newLocalKEK(t)}
	ctx := t.Context()
	if err := newTestStore(t, dir, uri1, keks).Put(ctx, "old", []byte("written under the first keyset")); err != nil {
		t.Fatal(err)
	}
	s2 := newTestStore(t, dir, uri2, keks)
	if err := s2.Put(ctx, "new", []byte("written under the second")); err != nil {
		t.Fatal(err)
	}
	for name, uri := range map[string]string{"old": uri1, "new": uri2} {
		if _, err := s2.Get(ctx, name); err != nil {
			t.Errorf("Get(%s) after the key change = %v", name, err)
		}
		list, _ := s2.List()
		for _, o := range list {
			if o.Name == name && o.KeyURI != uri {
				t.Errorf("List: %s under %s, want %s", name, o.KeyURI, uri)
			}
		}
	}
	if keks[uri1].decs.Load() != 1 || keks[uri2].decs.Load() != 1 {
		t.Errorf("unwraps: first keyset %d, second %d; want 1 each", keks[uri1].decs.Load(), keks[uri2].decs.Load())
	}
}

func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	kek := newLocalKEK(t)
	s := newTestStore(t, dir, uri1, map[string]*localKEK{uri1: kek})
	ctx := t.Context()
	for _, name := range []string{"", ".hidden", "a/b", "../x", "a b", strings.Repeat("n", 201)} {
		if err := s.Put(ctx, name, []byte("x")); err == nil {
			t.Errorf("Put(%q) = nil, want a name error", name)
		}
	}
	if err := s.Put(ctx, "big", make([]byte, MaxObjectSize+1)); err == nil {
		t.Errorf("Put(%d bytes) = nil, want a size error", MaxObjectSize+1)
	}
	// The KMS is down: the put fails and leaves nothing behind, and an
	// existing object is untouched.
	if err := s.Put(ctx, "keep", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	kek.fail.Store(true)
	if err := s.Put(ctx, "keep", []byte("v2")); !errors.Is(err, errKEKDown) {
		t.Errorf("Put with the KEK down = %v, want errKEKDown", err)
	}
	kek.fail.Store(false)
	if got, err := s.Get(ctx, "keep"); err != nil || string(got) != "v1" {
		t.Errorf("Get(keep) after a failed overwrite = %q, %v; want v1", got, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("store holds %d files after a failed put, want 1 (no temporary left)", len(entries))
	}
	if _, err := NewStore(dir, "cairn-kms://nowhere/x", func(string) (tink.AEADWithContext, error) { return nil, errors.New("no endpoints") }); err == nil {
		t.Error("NewStore(unusable key URI) = nil error")
	}
}
