package pkcs11safe

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

// TestReadOnlyTokenDir (RELIABILITY row 6 a): a SoftHSM2 token whose
// directory is read-only (immutable as root, chmod a-w otherwise; see
// softhsmtest.MakeReadOnly) fails clearly and without a panic wherever it
// must write, and keeps doing what needs no write:
//   - a token that has no sealing key yet cannot get one: Open fails,
//     naming the token and the key it could not generate, and releases the
//     module;
//   - a token that has its key opens, unseals and lists its shares, so an
//     officer can still release a share from it;
//   - Seal and Destroy fail naming the token and the operation; the failed
//     Seal stores nothing and the failed Destroy loses nothing: once the
//     module is reloaded the share is there and unseals.
func TestReadOnlyTokenDir(t *testing.T) {
	ctx := context.Background()
	env := softhsmtest.New(t)
	env.InitToken("ro-keyed", soPIN, userPIN)
	env.InitToken("ro-fresh", soPIN, userPIN)
	keyed, fresh := config(t, env, "ro-keyed"), config(t, env, "ro-fresh")
	r1, r2 := ref(0, 1), ref(0, 2)
	func() {
		s, err := Open(ctx, keyed)
		if err != nil {
			t.Fatalf("Open(%s) while writable = %v", keyed.TokenLabel, err)
		}
		defer s.Close()
		if err := s.Seal(ctx, r1, shareFor(r1)); err != nil {
			t.Fatalf("Seal(%v) while writable = %v", r1, err)
		}
	}()
	env.MakeReadOnly("ro-keyed")
	env.MakeReadOnly("ro-fresh")

	if s, err := Open(ctx, fresh); err == nil {
		s.Close()
		t.Errorf("Open(read-only token without a key) = a safe, want an error")
	} else if !strings.Contains(err.Error(), `token "ro-fresh"`) || !strings.Contains(err.Error(), `generating key "cairn-share-key"`) {
		t.Errorf("Open(read-only token without a key) = %v, want an error naming the token and the key it could not generate", err)
	}
	assertNoModules(t)

	func() {
		s, err := Open(ctx, keyed)
		if err != nil {
			t.Fatalf("Open(read-only token with its key) = %v, want it to open (nothing to write)", err)
		}
		defer func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close(read-only token) = %v", err)
			}
		}()
		if got, err := s.Unseal(ctx, r1); err != nil || !got.Equal(shareFor(r1)) {
			t.Errorf("Unseal(%v) on a read-only token = %v, want the share", r1, err)
		}
		if refs, err := s.List(ctx); err != nil || !slices.Equal(refs, []safe.ShareRef{r1}) {
			t.Errorf("List() on a read-only token = %v, %v; want [%v]", refs, err, r1)
		}
		err = s.Seal(ctx, r2, shareFor(r2))
		if err == nil || !strings.Contains(err.Error(), "seal "+r2.String()+` on token "ro-keyed"`) || errors.Is(err, safe.ErrExists) || errors.Is(err, safe.ErrTampered) {
			t.Errorf("Seal(%v) on a read-only token = %v, want an error naming the seal and the token (not ErrExists or ErrTampered)", r2, err)
		}
		if _, err := s.Unseal(ctx, r2); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Unseal(%v) after a refused Seal = %v, want ErrNotFound", r2, err)
		}
		err = s.Destroy(ctx, r1)
		if err == nil || !strings.Contains(err.Error(), "destroy "+r1.String()+` on token "ro-keyed"`) {
			t.Errorf("Destroy(%v) on a read-only token = %v, want an error naming the destroy and the token", r1, err)
		}
		// SoftHSM2 drops the object from its in-memory view even though
		// it could not delete the file; what counts is the token.
		_, err = s.Unseal(ctx, r1)
		t.Logf("Unseal(%v) in the same process after the refused Destroy = %v", r1, err)
	}()
	assertNoModules(t)

	s := open(t, keyed)
	if got, err := s.Unseal(ctx, r1); err != nil || !got.Equal(shareFor(r1)) {
		t.Errorf("Unseal(%v) after a refused Destroy and a reload = %v, want the share still there", r1, err)
	}
}
