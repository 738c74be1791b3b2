package pkcs11safe

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/miekg/pkcs11"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Test PINs. softhsm2-util wants 4 to 255 characters.
const (
	soPIN   = "so-pin-0000"
	userPIN = "user-pin-1234"
)

const gid = "00112233445566778899aabbccddeeff"

func ref(epoch, index uint32) safe.ShareRef {
	return safe.ShareRef{GenesisID: gid, Epoch: epoch, Index: index}
}

// shareFor is a recognisable 33-byte share for r.
func shareFor(r safe.ShareRef) secret.Bytes {
	b := make([]byte, 33)
	for i := range b {
		b[i] = byte(r.Epoch*31 + r.Index*7 + uint32(i))
	}
	return secret.New(b)
}

// config returns a Config for the token labelled label in env, with the user
// PIN in a 0600 file and the attempt counter in env's directory.
func config(t testing.TB, env *softhsmtest.Env, label string) Config {
	t.Helper()
	return Config{
		Module:     env.Module(),
		TokenLabel: label,
		PIN:        PINSource{File: softhsmtest.WritePINFile(t, env.Dir(), label+".pin", userPIN)},
		AttemptDir: filepath.Join(env.Dir(), "attempts"),
	}
}

// open opens a Safe and closes it when the test ends.
func open(t testing.TB, cfg Config) *Safe {
	t.Helper()
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open(%q) = %v", cfg.TokenLabel, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close(%q) = %v", cfg.TokenLabel, err)
		}
	})
	return s
}

// newSafe makes a token labelled label in a fresh env and opens it.
func newSafe(t testing.TB, label string) (*Safe, *softhsmtest.Env, Config) {
	t.Helper()
	env := softhsmtest.New(t)
	env.InitToken(label, soPIN, userPIN)
	cfg := config(t, env, label)
	return open(t, cfg), env, cfg
}

// rawSession opens a session of its own on s's token, bypassing the pool.
// The login is per token, so it is logged in while s is.
func rawSession(t testing.TB, s *Safe) pkcs11.SessionHandle {
	t.Helper()
	sh, err := s.mod.ctx.OpenSession(s.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("OpenSession = %v", err)
	}
	t.Cleanup(func() { _ = s.mod.ctx.CloseSession(sh) })
	return sh
}

// rawRecords finds the data objects stored for r, with a template written
// out here rather than taken from the package.
func rawRecords(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle, r safe.ShareRef) []pkcs11.ObjectHandle {
	t.Helper()
	objs, err := findObjects(p, sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, rawLabel(r)),
	})
	if err != nil {
		t.Fatalf("finding the records of %v: %v", r, err)
	}
	return objs
}

// rawLabel is the record label for r, spelled out independently of
// recordLabel.
func rawLabel(r safe.ShareRef) string {
	return fmt.Sprintf("cairn-share:%s:%d:%d", r.GenesisID, r.Epoch, r.Index)
}

// readRaw returns the CKA_VALUE of the one record stored for r.
func readRaw(t testing.TB, s *Safe, r safe.ShareRef) []byte {
	t.Helper()
	sh := rawSession(t, s)
	objs := rawRecords(t, s.mod.ctx, sh, r)
	if len(objs) != 1 {
		t.Fatalf("records stored for %v = %d, want 1", r, len(objs))
	}
	attrs, err := s.mod.ctx.GetAttributeValue(sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		t.Fatalf("GetAttributeValue(CKA_VALUE) of %v = %v", r, err)
	}
	return attrs[0].Value
}

// writeRaw replaces the record stored for r with data. Records are created
// with CKA_MODIFIABLE=false, so it destroys and recreates the object.
func writeRaw(t testing.TB, s *Safe, r safe.ShareRef, data []byte) {
	t.Helper()
	sh := rawSession(t, s)
	for _, obj := range rawRecords(t, s.mod.ctx, sh, r) {
		if err := s.mod.ctx.DestroyObject(sh, obj); err != nil {
			t.Fatalf("DestroyObject(record of %v) = %v", r, err)
		}
	}
	_, err := s.mod.ctx.CreateObject(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, "cairn"),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, rawLabel(r)),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, data),
	})
	if err != nil {
		t.Fatalf("CreateObject(record of %v) = %v", r, err)
	}
}

// withLogin loads the module of env, logs in to the token labelled label
// with pin, and runs f, without any Safe; it cleans up before returning.
func withLogin(t testing.TB, env *softhsmtest.Env, label, pin string, f func(p *pkcs11.Ctx, sh pkcs11.SessionHandle)) {
	t.Helper()
	mod, err := acquireModule(env.Module())
	if err != nil {
		t.Fatalf("acquireModule = %v", err)
	}
	defer func() {
		if err := mod.release(); err != nil {
			t.Errorf("module release = %v", err)
		}
	}()
	slot, _, err := findToken(mod, env.Module(), label)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := mod.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("OpenSession = %v", err)
	}
	defer mod.ctx.CloseSession(sh)
	if err := mod.ctx.Login(sh, pkcs11.CKU_USER, pin); err != nil {
		t.Fatalf("C_Login(%s, right PIN) = %v, want success", label, err)
	}
	defer mod.ctx.Logout(sh)
	f(mod.ctx, sh)
}

// loadedModules returns how many libraries the registry holds and the
// reference count of each.
func loadedModules() map[string]int {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	out := map[string]int{}
	for path, m := range modules.m {
		out[path] = m.refs
	}
	return out
}

// assertNoModules fails t if a library is still loaded (a Safe leaked).
func assertNoModules(t testing.TB) {
	t.Helper()
	if got := loadedModules(); len(got) != 0 {
		t.Errorf("loaded modules = %v, want none", got)
	}
}
