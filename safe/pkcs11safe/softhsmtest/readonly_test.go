package softhsmtest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMakeReadOnly: after MakeReadOnly nothing can be created in the token's
// directory and its files cannot be opened for writing, even as root; the
// other token stays writable; and the cleanup makes the directory writable
// again (else t.TempDir could not remove it).
func TestMakeReadOnly(t *testing.T) {
	env := New(t)
	env.InitToken("frozen", "so-pin-0000", "user-pin-1234")
	env.InitToken("thawed", "so-pin-0000", "user-pin-1234")
	frozen, thawed := env.TokenDir("frozen"), env.TokenDir("thawed")
	if frozen == thawed || filepath.Dir(frozen) != filepath.Join(env.Dir(), "tokens") {
		t.Fatalf("TokenDir(frozen) = %s, TokenDir(thawed) = %s; want two directories under %s", frozen, thawed, filepath.Join(env.Dir(), "tokens"))
	}
	// The subtest's cleanup undoes MakeReadOnly when the subtest ends.
	outer := env.t
	t.Run("read-only", func(t *testing.T) {
		env.t = t
		defer func() { env.t = outer }()
		env.MakeReadOnly("frozen")
		if err := os.WriteFile(filepath.Join(frozen, "new"), nil, 0o600); err == nil {
			t.Errorf("created a file in the read-only token directory")
		}
		if f, err := os.OpenFile(filepath.Join(frozen, "token.object"), os.O_WRONLY, 0); err == nil {
			f.Close()
			t.Errorf("opened token.object of the read-only token for writing")
		}
		if _, err := os.ReadFile(filepath.Join(frozen, "token.object")); err != nil {
			t.Errorf("reading token.object of the read-only token = %v, want it readable", err)
		}
		p := filepath.Join(thawed, "new")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Errorf("writing into the other token's directory = %v", err)
		}
		os.Remove(p)
	})
	// The subtest's cleanup ran: writable again.
	p := filepath.Join(frozen, "new")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Errorf("after the cleanup, writing into the token directory = %v, want it writable again", err)
	}
	os.Remove(p)
}
