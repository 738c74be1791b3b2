package pkcs11safe

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/miekg/pkcs11"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe/softhsmtest"
	"github.com/cairnkms/cairn/safe/safetest"
)

// TestConformance runs the safe.Safe suite against a fresh SoftHSM2 token per
// subtest.
func TestConformance(t *testing.T) {
	safetest.Run(t, func(t *testing.T) safetest.Harness {
		s, _, cfg := newSafe(t, "conformance")
		return safetest.Harness{
			Safe: s,
			Reopen: func(t *testing.T) safe.Safe {
				s2, err := Open(context.Background(), cfg)
				if err != nil {
					t.Fatalf("Open(%q) again = %v", cfg.TokenLabel, err)
				}
				t.Cleanup(func() { s2.Close() })
				return s2
			},
			ReadRaw:  func(t *testing.T, r safe.ShareRef) []byte { return readRaw(t, s, r) },
			WriteRaw: func(t *testing.T, r safe.ShareRef, data []byte) { writeRaw(t, s, r, data) },
		}
	})
	assertNoModules(t)
}

// TestKeyNonExtractable pins the sealing key's template: what the token
// made must keep the key inside it.
func TestKeyNonExtractable(t *testing.T) {
	s, _, _ := newSafe(t, "key")
	p := s.mod.ctx
	sh := rawSession(t, s)
	keys, err := findObjects(p, sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, DefaultKeyLabel),
	})
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys labelled %q = %v, %v, want one", DefaultKeyLabel, keys, err)
	}
	key := keys[0]

	bools := []struct {
		name string
		attr uint
		want bool
	}{
		{"CKA_TOKEN", pkcs11.CKA_TOKEN, true},
		{"CKA_PRIVATE", pkcs11.CKA_PRIVATE, true},
		{"CKA_SENSITIVE", pkcs11.CKA_SENSITIVE, true},
		{"CKA_ALWAYS_SENSITIVE", pkcs11.CKA_ALWAYS_SENSITIVE, true},
		{"CKA_EXTRACTABLE", pkcs11.CKA_EXTRACTABLE, false},
		{"CKA_NEVER_EXTRACTABLE", pkcs11.CKA_NEVER_EXTRACTABLE, true},
		{"CKA_ENCRYPT", pkcs11.CKA_ENCRYPT, true},
		{"CKA_DECRYPT", pkcs11.CKA_DECRYPT, true},
		{"CKA_WRAP", pkcs11.CKA_WRAP, false},
		{"CKA_UNWRAP", pkcs11.CKA_UNWRAP, false},
		{"CKA_SIGN", pkcs11.CKA_SIGN, false},
		{"CKA_VERIFY", pkcs11.CKA_VERIFY, false},
		{"CKA_DERIVE", pkcs11.CKA_DERIVE, false},
		{"CKA_MODIFIABLE", pkcs11.CKA_MODIFIABLE, false},
	}
	for _, b := range bools {
		attrs, err := p.GetAttributeValue(sh, key, []*pkcs11.Attribute{pkcs11.NewAttribute(b.attr, nil)})
		if err != nil {
			t.Errorf("GetAttributeValue(%s) = %v", b.name, err)
			continue
		}
		if got := attrBool(attrs[0]); got != b.want || len(attrs[0].Value) != 1 {
			t.Errorf("%s = %v (% x), want %v", b.name, got, attrs[0].Value, b.want)
		}
	}
	attrs, err := p.GetAttributeValue(sh, key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
	})
	if err != nil {
		t.Fatalf("GetAttributeValue(CKA_VALUE_LEN, CKA_KEY_TYPE) = %v", err)
	}
	if n, _ := attrUint(attrs[0]); n != 32 {
		t.Errorf("CKA_VALUE_LEN = %d, want 32", n)
	}
	if kt, _ := attrUint(attrs[1]); kt != pkcs11.CKK_AES {
		t.Errorf("CKA_KEY_TYPE = %#x, want CKK_AES", kt)
	}

	if _, err := p.GetAttributeValue(sh, key, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); !isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		t.Errorf("GetAttributeValue(CKA_VALUE) = %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
	for _, a := range []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
	} {
		// The key is CKA_MODIFIABLE=false, so PKCS#11 3.0 says
		// CKR_ACTION_PROHIBITED (SoftHSM2's answer); CKR_ATTRIBUTE_READ_ONLY
		// is what a token checking the attribute's own rules first returns
		// (CKA_EXTRACTABLE and CKA_SENSITIVE only ever move towards
		// safety). Any other error (say, a rejected template) would not
		// show that the flip is refused.
		if err := p.SetAttributeValue(sh, key, []*pkcs11.Attribute{a}); !isRV(err, pkcs11.CKR_ACTION_PROHIBITED) && !isRV(err, pkcs11.CKR_ATTRIBUTE_READ_ONLY) {
			t.Errorf("SetAttributeValue(%#x = % x) = %v, want CKR_ACTION_PROHIBITED (0x1B) or CKR_ATTRIBUTE_READ_ONLY (0x10)", a.Type, a.Value, err)
		}
	}

	// Wrapping it out with a key made for wrapping must fail too.
	wrapper, err := p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
	})
	if err != nil {
		t.Fatalf("GenerateKey(wrapping key) = %v", err)
	}
	for _, mech := range []uint{pkcs11.CKM_AES_KEY_WRAP, pkcs11.CKM_AES_KEY_WRAP_PAD} {
		// CKR_KEY_UNEXTRACTABLE is the code PKCS#11 gives a key with
		// CKA_EXTRACTABLE=false. An unsupported mechanism or a wrapping
		// key problem would fail with another code and prove nothing.
		blob, err := p.WrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, wrapper, key)
		if !isRV(err, pkcs11.CKR_KEY_UNEXTRACTABLE) {
			t.Errorf("WrapKey(mechanism %#x, sealing key) = %d bytes, %v; want CKR_KEY_UNEXTRACTABLE (0x6A)", mech, len(blob), err)
		}
	}
}

// TestRecordObject pins how a record is stored, and that List ignores other
// data objects.
func TestRecordObject(t *testing.T) {
	s, _, _ := newSafe(t, "record")
	ctx := context.Background()
	r := ref(3, 7)
	if err := s.Seal(ctx, r, shareFor(r)); err != nil {
		t.Fatal(err)
	}
	p := s.mod.ctx
	sh := rawSession(t, s)
	objs := rawRecords(t, p, sh, r)
	if len(objs) != 1 {
		t.Fatalf("records for %v = %d, want 1", r, len(objs))
	}
	attrs, err := p.GetAttributeValue(sh, objs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, nil),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprintf("token=%v private=%v modifiable=%v application=%q label=%q",
		attrBool(attrs[0]), attrBool(attrs[1]), attrBool(attrs[2]), attrs[3].Value, attrs[4].Value)
	want := fmt.Sprintf("token=true private=true modifiable=false application=%q label=%q", "cairn", rawLabel(r))
	if got != want {
		t.Errorf("record attributes = %s, want %s", got, want)
	}
	if err := p.SetAttributeValue(sh, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("x"))}); err == nil {
		t.Errorf("SetAttributeValue(record CKA_VALUE) = nil, want an error (records are not modifiable)")
	}

	// Objects List must not report: another application's, and ours with
	// labels that are not canonical.
	for _, o := range []struct{ app, label string }{
		{"other", rawLabel(ref(0, 1))},
		{"cairn", "cairn-share:" + gid + ":0"},
		{"cairn", "cairn-share:" + gid + ":00:1"},
		{"cairn", "cairn-share:" + gid + ":0:0"},
		{"cairn", "cairn-share:" + strings.ToUpper(gid) + ":0:1"},
		{"cairn", "something-else"},
	} {
		if _, err := p.CreateObject(sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, o.app),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, o.label),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("not a record")),
		}); err != nil {
			t.Fatal(err)
		}
	}
	refs, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]safe.ShareRef{r}, refs); diff != "" {
		t.Errorf("List() mismatch (-want +got):\n%s", diff)
	}
}

func TestParseLabel(t *testing.T) {
	tests := []struct {
		label string
		want  safe.ShareRef
		ok    bool
	}{
		{"cairn-share:" + gid + ":0:1", ref(0, 1), true},
		{"cairn-share:" + gid + ":4294967295:255", ref(4294967295, 255), true},
		{"cairn-share:" + gid + ":4294967296:1", safe.ShareRef{}, false},
		{"cairn-share:" + gid + ":0:256", safe.ShareRef{}, false},
		{"cairn-share:" + gid + ":0:0", safe.ShareRef{}, false},
		{"cairn-share:" + gid + ":01:1", safe.ShareRef{}, false},
		{"cairn-share:" + gid + ":+1:1", safe.ShareRef{}, false},
		{"cairn-share:" + gid + ":1:1:1", safe.ShareRef{}, false},
		{"cairn-share:" + gid + "0:1:1", safe.ShareRef{}, false},
		{"cairn-share::1:1", safe.ShareRef{}, false},
		{"cairn-key:" + gid + ":1:1", safe.ShareRef{}, false},
		{"", safe.ShareRef{}, false},
	}
	for _, tt := range tests {
		got, ok := parseLabel(tt.label)
		if got != tt.want || ok != tt.ok {
			t.Errorf("parseLabel(%q) = %v, %v, want %v, %v", tt.label, got, ok, tt.want, tt.ok)
		}
		if ok && recordLabel(got) != tt.label {
			t.Errorf("recordLabel(%v) = %q, want %q", got, recordLabel(got), tt.label)
		}
	}
}

// TestWrongPIN checks the attempt limiter around C_Login: SoftHSM2 never
// locks its PIN, so the Safe must.
func TestWrongPIN(t *testing.T) {
	env := softhsmtest.New(t)
	const label = "pins"
	env.InitToken(label, soPIN, userPIN)
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := func() time.Time { return now }
	const maxAttempts = 3
	const cooldown = time.Hour
	attempts := filepath.Join(env.Dir(), "attempts")
	prompts := 0
	withPIN := func(pin string) Config {
		return Config{
			Module:     env.Module(),
			TokenLabel: label,
			PIN: PINSource{Prompt: func() (secret.Bytes, error) {
				prompts++
				return secret.New([]byte(pin)), nil
			}},
			AttemptDir:  attempts,
			MaxAttempts: maxAttempts,
			Cooldown:    cooldown,
			Now:         clock,
		}
	}
	ctx := context.Background()
	const wrongPIN = "wrong-pin-9876"
	openErr := func(pin string) error {
		t.Helper()
		s, err := Open(ctx, withPIN(pin))
		if err == nil {
			if cerr := s.Close(); cerr != nil {
				t.Errorf("Close = %v", cerr)
			}
		}
		assertNoModules(t)
		return err
	}

	for i := range maxAttempts {
		err := openErr(wrongPIN)
		if !errors.Is(err, safe.ErrBadCredential) {
			t.Fatalf("Open(wrong PIN) #%d = %v, want ErrBadCredential", i+1, err)
		}
		if strings.Contains(err.Error(), wrongPIN) {
			t.Errorf("Open(wrong PIN) error %q contains the PIN", err)
		}
	}
	prompts = 0
	if err := openErr(userPIN); !errors.Is(err, safe.ErrLocked) {
		t.Fatalf("Open(right PIN) after %d failures = %v, want ErrLocked", maxAttempts, err)
	}
	if prompts != 0 {
		t.Errorf("a locked safe asked for the PIN %d times, want 0", prompts)
	}
	// A restarted process: a fresh Config, same attempt directory.
	restarted := withPIN(userPIN)
	restarted.Now = func() time.Time { return now.Add(cooldown - time.Second) }
	if _, err := Open(ctx, restarted); !errors.Is(err, safe.ErrLocked) {
		t.Fatalf("Open(right PIN) after a restart within the cooldown = %v, want ErrLocked", err)
	}
	assertNoModules(t)

	// SoftHSM2 itself did not lock: the right PIN logs in at the token.
	withLogin(t, env, label, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
		info, err := p.GetSessionInfo(sh)
		if err != nil || info.State != pkcs11.CKS_RW_USER_FUNCTIONS {
			t.Errorf("session state after C_Login(right PIN) = %v, %v, want CKS_RW_USER_FUNCTIONS", info.State, err)
		}
		ti, err := p.GetTokenInfo(info.SlotID)
		if err != nil || ti.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0 {
			t.Errorf("token flags = %#x, %v, want CKF_USER_PIN_LOCKED clear", ti.Flags, err)
		}
	})

	// After the cooldown the right PIN works and resets the counter.
	now = now.Add(cooldown + time.Second)
	if err := openErr(userPIN); err != nil {
		t.Fatalf("Open(right PIN) after the cooldown = %v", err)
	}
	for i := range maxAttempts - 1 {
		if err := openErr(wrongPIN); !errors.Is(err, safe.ErrBadCredential) {
			t.Fatalf("Open(wrong PIN) #%d after a reset = %v, want ErrBadCredential", i+1, err)
		}
	}
	if err := openErr(userPIN); err != nil {
		t.Fatalf("Open(right PIN) after %d failures (< %d) = %v", maxAttempts-1, maxAttempts, err)
	}
}

func TestPINSources(t *testing.T) {
	env := softhsmtest.New(t)
	const label = "sources"
	env.InitToken(label, soPIN, userPIN)
	base := Config{Module: env.Module(), TokenLabel: label, AttemptDir: filepath.Join(env.Dir(), "attempts")}
	pinFile := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(env.Dir(), name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	const envVar = "CAIRN_TEST_TOKEN_PIN"
	t.Setenv(envVar, userPIN)
	var prompted secret.Bytes

	tests := []struct {
		name        string
		pin         PINSource
		invalid     bool   // Validate fails
		wantErr     string // Open fails with this text; "" = succeeds
		wantErrIs   error
		wantNoCount bool
	}{
		{name: "file 0600", pin: PINSource{File: softhsmtest.WritePINFile(t, env.Dir(), "ok.pin", userPIN)}},
		{name: "file 0400 without newline", pin: PINSource{File: pinFile("ro.pin", userPIN, 0o400)}},
		{name: "file with CRLF", pin: PINSource{File: pinFile("crlf.pin", userPIN+"\r\n", 0o600)}},
		{name: "file 0644", pin: PINSource{File: pinFile("world.pin", userPIN+"\n", 0o644)}, wantErr: "must not be accessible to group or others"},
		{name: "file 0640", pin: PINSource{File: pinFile("group.pin", userPIN+"\n", 0o640)}, wantErr: "must not be accessible to group or others"},
		{name: "file 0602", pin: PINSource{File: pinFile("otherw.pin", userPIN+"\n", 0o602)}, wantErr: "must not be accessible to group or others"},
		{name: "file missing", pin: PINSource{File: filepath.Join(env.Dir(), "missing.pin")}, wantErr: "missing.pin", wantErrIs: fs.ErrNotExist},
		{name: "file is a directory", pin: PINSource{File: env.Dir()}, wantErr: "not a regular file"},
		{name: "file empty", pin: PINSource{File: pinFile("empty.pin", "\n", 0o600)}, wantErr: "PIN is empty"},
		{name: "file too large", pin: PINSource{File: pinFile("big.pin", strings.Repeat("1", 2000), 0o600)}, wantErr: "larger than"},
		{name: "env", pin: PINSource{Env: envVar}},
		{name: "env unset", pin: PINSource{Env: "CAIRN_TEST_NO_SUCH_VARIABLE"}, wantErr: "CAIRN_TEST_NO_SUCH_VARIABLE is not set"},
		{name: "prompt", pin: PINSource{Prompt: func() (secret.Bytes, error) {
			prompted = secret.New([]byte(userPIN))
			return prompted, nil
		}}},
		{name: "prompt fails", pin: PINSource{Prompt: func() (secret.Bytes, error) { return secret.Bytes{}, errors.New("no terminal") }}, wantErr: "no terminal"},
		{name: "prompt empty", pin: PINSource{Prompt: func() (secret.Bytes, error) { return secret.Bytes{}, nil }}, wantErr: "PIN is empty"},
		{name: "none", pin: PINSource{}, invalid: true, wantErr: "no PIN source"},
		{name: "file and env", pin: PINSource{File: "/x", Env: envVar}, invalid: true, wantErr: "several PIN sources"},
		{name: "env and prompt", pin: PINSource{Env: envVar, Prompt: func() (secret.Bytes, error) { return secret.Bytes{}, nil }}, invalid: true, wantErr: "several PIN sources"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			cfg.PIN = tt.pin
			verr := cfg.Validate()
			if (verr != nil) != tt.invalid {
				t.Fatalf("Validate() = %v, want error: %v", verr, tt.invalid)
			}
			s, err := Open(context.Background(), cfg)
			if err == nil {
				if cerr := s.Close(); cerr != nil {
					t.Errorf("Close = %v", cerr)
				}
			}
			assertNoModules(t)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Open(%s) = %v, want success", tt.name, err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("Open(%s) = %v, want an error containing %q", tt.name, err, tt.wantErr)
			case tt.wantErrIs != nil && !errors.Is(err, tt.wantErrIs):
				t.Errorf("Open(%s) = %v, want errors.Is %v", tt.name, err, tt.wantErrIs)
			}
			if err != nil && strings.Contains(err.Error(), userPIN) {
				t.Errorf("Open(%s) error %q contains the PIN", tt.name, err)
			}
		})
	}
	if !prompted.IsZero() {
		t.Errorf("the PIN returned by Prompt was not wiped")
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{Module: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "t", PIN: PINSource{Env: "X"}, AttemptDir: "/tmp/a"}
	tests := []struct {
		name    string
		edit    func(c *Config)
		wantErr string
	}{
		{"good", func(*Config) {}, ""},
		{"no module", func(c *Config) { c.Module = "" }, "Module"},
		{"relative module", func(c *Config) { c.Module = "libsofthsm2.so" }, "not an absolute path"},
		{"dot-relative module", func(c *Config) { c.Module = "./lib/libsofthsm2.so" }, "not an absolute path"},
		{"no token label", func(c *Config) { c.TokenLabel = "" }, "TokenLabel is required"},
		{"long token label", func(c *Config) { c.TokenLabel = strings.Repeat("x", 33) }, "longer than 32"},
		{"32-byte token label", func(c *Config) { c.TokenLabel = strings.Repeat("x", 32) }, ""},
		{"token label trailing space", func(c *Config) { c.TokenLabel = "t " }, "ends in a space"},
		{"negative sessions", func(c *Config) { c.MaxSessions = -1 }, "MaxSessions"},
		{"negative attempts", func(c *Config) { c.MaxAttempts = -1 }, "MaxAttempts"},
		{"negative cooldown", func(c *Config) { c.Cooldown = -time.Second }, "Cooldown"},
		{"no attempt dir", func(c *Config) { c.AttemptDir = "" }, "AttemptDir"},
		{"no PIN", func(c *Config) { c.PIN = PINSource{} }, "no PIN source"},
	}
	for _, tt := range tests {
		c := good
		tt.edit(&c)
		err := c.Validate()
		if got := fmt.Sprint(err); (tt.wantErr == "") != (err == nil) || !strings.Contains(got, tt.wantErr) {
			t.Errorf("Validate(%s) = %v, want error containing %q", tt.name, err, tt.wantErr)
		}
	}
	if d := good.withDefaults(); d.KeyLabel != DefaultKeyLabel || d.MaxSessions != DefaultMaxSessions {
		t.Errorf("withDefaults() = KeyLabel %q, MaxSessions %d, want %q, %d", d.KeyLabel, d.MaxSessions, DefaultKeyLabel, DefaultMaxSessions)
	}
}

// genKey makes a secret key on the token from a template.
func genKey(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle, mech uint, attrs ...*pkcs11.Attribute) {
	t.Helper()
	if _, err := p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, attrs); err != nil {
		t.Fatalf("GenerateKey = %v", err)
	}
}

// aesKey is a token AES key template labelled label, with the given
// sensitivity and extractability.
func aesKey(label string, size int, sensitive, extractable bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, size),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, sensitive),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, extractable),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
}

func TestOpenErrors(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, env *softhsmtest.Env, cfg *Config)
		wantErr string
	}{
		{
			name:    "relative module",
			setup:   func(t *testing.T, env *softhsmtest.Env, cfg *Config) { cfg.Module = "libsofthsm2.so" },
			wantErr: `Module "libsofthsm2.so" is not an absolute path`,
		},
		{
			name:    "missing module",
			setup:   func(t *testing.T, env *softhsmtest.Env, cfg *Config) { cfg.Module = "/nonexistent/libpkcs11.so" },
			wantErr: "/nonexistent/libpkcs11.so",
		},
		{
			name: "not a library",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				cfg.Module = filepath.Join(env.Dir(), "garbage.so")
				if err := os.WriteFile(cfg.Module, []byte("not an ELF file"), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "cannot load PKCS#11 module",
		},
		{
			// RELIABILITY row 6 b: SoftHSM2 answers a missing config with
			// a bare CKR_GENERAL_ERROR; the error must name the config.
			name: "C_Initialize fails on a missing config",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				t.Setenv("SOFTHSM2_CONF", filepath.Join(env.Dir(), "missing-softhsm2.conf"))
			},
			wantErr: "/missing-softhsm2.conf: check that the file exists",
		},
		{
			name:    "unknown token label",
			setup:   func(t *testing.T, env *softhsmtest.Env, cfg *Config) { cfg.TokenLabel = "no-such-token" },
			wantErr: `no token labelled "no-such-token"`,
		},
		{
			name: "extractable key with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				withLogin(t, env, cfg.TokenLabel, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
					genKey(t, p, sh, pkcs11.CKM_AES_KEY_GEN, aesKey(DefaultKeyLabel, 32, true, true)...)
				})
			},
			wantErr: "extractable",
		},
		{
			name: "non-sensitive key with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				withLogin(t, env, cfg.TokenLabel, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
					genKey(t, p, sh, pkcs11.CKM_AES_KEY_GEN, aesKey(DefaultKeyLabel, 32, false, false)...)
				})
			},
			wantErr: "not sensitive",
		},
		{
			name: "imported key with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				withLogin(t, env, cfg.TokenLabel, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
					tmpl := append(aesKey(DefaultKeyLabel, 32, true, false)[:2:2], aesKey(DefaultKeyLabel, 32, true, false)[3:]...)
					tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE, bytes.Repeat([]byte{7}, 32)))
					if _, err := p.CreateObject(sh, tmpl); err != nil {
						t.Fatalf("CreateObject(AES key) = %v", err)
					}
				})
			},
			wantErr: "not always sensitive",
		},
		{
			name: "AES-128 key with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				withLogin(t, env, cfg.TokenLabel, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
					genKey(t, p, sh, pkcs11.CKM_AES_KEY_GEN, aesKey(DefaultKeyLabel, 16, true, false)...)
				})
			},
			wantErr: "not 32 bytes long",
		},
		{
			name: "two keys with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				withLogin(t, env, cfg.TokenLabel, userPIN, func(p *pkcs11.Ctx, sh pkcs11.SessionHandle) {
					genKey(t, p, sh, pkcs11.CKM_AES_KEY_GEN, aesKey("dup", 32, true, false)...)
					genKey(t, p, sh, pkcs11.CKM_AES_KEY_GEN, aesKey("dup", 32, true, false)...)
				})
				cfg.KeyLabel = "dup"
			},
			wantErr: `2 secret keys labelled "dup"`,
		},
		{
			name: "shares on the token but no key with the label",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				s, err := Open(context.Background(), *cfg)
				if err != nil {
					t.Fatal(err)
				}
				r := ref(0, 1)
				if err := s.Seal(context.Background(), r, shareFor(r)); err != nil {
					t.Fatal(err)
				}
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				cfg.KeyLabel = "typo-key"
			},
			wantErr: `holds 1 sealed shares but no key labelled "typo-key"`,
		},
		{
			name: "token already open in this process",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				open(t, *cfg)
			},
			wantErr: "already open in this process",
		},
		{
			name: "cancelled context",
			setup: func(t *testing.T, env *softhsmtest.Env, cfg *Config) {
				cfg.PIN = PINSource{Prompt: func() (secret.Bytes, error) {
					t.Error("a cancelled Open asked for the PIN")
					return secret.Bytes{}, nil
				}}
			},
			wantErr: context.Canceled.Error(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := softhsmtest.New(t)
			env.InitToken("errors", soPIN, userPIN)
			cfg := config(t, env, "errors")
			tt.setup(t, env, &cfg)
			ctx, cancel := context.WithCancel(context.Background())
			if tt.name == "cancelled context" {
				cancel()
			}
			defer cancel()
			s, err := Open(ctx, cfg)
			if err == nil {
				s.Close()
				t.Fatalf("Open(%s) = nil error, want %q", tt.name, tt.wantErr)
			}
			t.Logf("Open(%s) = %v", tt.name, err)
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Open(%s) = %v, want an error containing %q", tt.name, err, tt.wantErr)
			}
			if strings.Contains(err.Error(), userPIN) {
				t.Errorf("Open(%s) error %q contains the PIN", tt.name, err)
			}
		})
		assertNoModules(t)
	}
}

// TestPoolConcurrency runs many operations through a pool of two sessions,
// then checks deadlines while the pool is busy and closing while operations
// are running.
func TestPoolConcurrency(t *testing.T) {
	env := softhsmtest.New(t)
	env.InitToken("pool", soPIN, userPIN)
	cfg := config(t, env, "pool")
	cfg.MaxSessions = 2
	s := open(t, cfg)
	ctx := context.Background()

	t.Run("64 goroutines", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for g := range uint32(64) {
			wg.Go(func() {
				for epoch := range uint32(3) {
					r := ref(epoch, g+1)
					if err := s.Seal(ctx, r, shareFor(r)); err != nil {
						errs <- fmt.Errorf("Seal(%v) = %w", r, err)
						return
					}
					for range 2 {
						got, err := s.Unseal(ctx, r)
						if err != nil {
							errs <- fmt.Errorf("Unseal(%v) = %w", r, err)
							return
						}
						if !got.Equal(shareFor(r)) {
							errs <- fmt.Errorf("Unseal(%v) returned another share", r)
						}
						got.Wipe()
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		refs, err := s.List(ctx)
		if err != nil || len(refs) != 64*3 {
			t.Errorf("List() = %d refs, %v, want %d", len(refs), err, 64*3)
		}
	})

	t.Run("deadline while the pool is busy", func(t *testing.T) {
		// Hold both sessions: nothing else can run.
		held := []pkcs11.SessionHandle{}
		for range cfg.MaxSessions {
			sh, err := s.pool.acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, sh)
		}
		r := ref(9, 1)
		dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		if err := s.Seal(dctx, r, shareFor(r)); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Seal(busy pool, deadline) = %v, want context.DeadlineExceeded", err)
		}
		if _, err := s.Unseal(dctx, ref(0, 1)); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Unseal(busy pool, deadline) = %v, want context.DeadlineExceeded", err)
		}
		for _, sh := range held {
			s.pool.release(sh, nil)
		}
		if _, err := s.Unseal(ctx, r); !errors.Is(err, safe.ErrNotFound) {
			t.Errorf("Unseal(%v) after a Seal that timed out = %v, want ErrNotFound", r, err)
		}
	})

	t.Run("broken session is replaced", func(t *testing.T) {
		// Close every pooled session behind the pool's back.
		var handles []pkcs11.SessionHandle
		for range cfg.MaxSessions {
			sh, err := s.pool.acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			handles = append(handles, sh)
		}
		for _, sh := range handles {
			if err := s.mod.ctx.CloseSession(sh); err != nil {
				t.Fatal(err)
			}
			s.pool.release(sh, nil)
		}
		r := ref(0, 1)
		for i := range cfg.MaxSessions {
			_, err := s.Unseal(ctx, r)
			var rv pkcs11.Error
			if !errors.As(err, &rv) || uint(rv) != pkcs11.CKR_SESSION_HANDLE_INVALID || errors.Is(err, safe.ErrTampered) {
				t.Errorf("Unseal #%d on a closed session = %v, want CKR_SESSION_HANDLE_INVALID (not ErrTampered)", i+1, err)
			}
		}
		for i := range 2 * cfg.MaxSessions {
			if got, err := s.Unseal(ctx, r); err != nil || !got.Equal(shareFor(r)) {
				t.Errorf("Unseal #%d after the sessions were replaced = %v", i+1, err)
			}
		}
	})

	t.Run("close waits for operations", func(t *testing.T) {
		entered := make(chan struct{}, 8)
		unblock := make(chan struct{})
		s.hookHeld = func(context.Context) {
			entered <- struct{}{}
			<-unblock
		}
		type result struct {
			share secret.Bytes
			err   error
		}
		results := make(chan result, 3)
		for i := range 3 {
			go func() {
				r := ref(0, uint32(i+1))
				got, err := s.Unseal(ctx, r)
				if err == nil && !got.Equal(shareFor(r)) {
					err = fmt.Errorf("Unseal(%v) returned another share", r)
				}
				results <- result{got, err}
			}()
		}
		// Two hold the sessions; the third waits for one.
		<-entered
		<-entered
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		for !s.isClosed() {
			time.Sleep(time.Millisecond)
		}
		// The waiter gives up; new calls are refused.
		if r := <-results; !errors.Is(r.err, safe.ErrClosed) {
			t.Errorf("an operation waiting for a session during Close = %v, want ErrClosed", r.err)
		}
		checkClosed(t, s)
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) while operations were running", err)
		case <-time.After(100 * time.Millisecond):
		}
		close(unblock)
		for range 2 {
			if r := <-results; r.err != nil {
				t.Errorf("an operation running during Close = %v, want success", r.err)
			}
		}
		if err := <-closed; err != nil {
			t.Errorf("Close = %v", err)
		}
		checkClosed(t, s)
		if err := s.Close(); err != nil {
			t.Errorf("second Close = %v, want nil", err)
		}
		assertNoModules(t)
	})
}

func (s *Safe) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// checkClosed asserts that every operation of s returns safe.ErrClosed.
func checkClosed(t *testing.T, s *Safe) {
	t.Helper()
	ctx := context.Background()
	r := ref(5, 5)
	if err := s.Seal(ctx, r, shareFor(r)); !errors.Is(err, safe.ErrClosed) {
		t.Errorf("Seal after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Unseal(ctx, r); !errors.Is(err, safe.ErrClosed) {
		t.Errorf("Unseal after Close = %v, want ErrClosed", err)
	}
	if _, err := s.List(ctx); !errors.Is(err, safe.ErrClosed) {
		t.Errorf("List after Close = %v, want ErrClosed", err)
	}
	if err := s.Destroy(ctx, r); !errors.Is(err, safe.ErrClosed) {
		t.Errorf("Destroy after Close = %v, want ErrClosed", err)
	}
}

// TestTwoSafesOneModule opens two tokens at once: they share the library and
// its initialization but keep separate logins and keys.
func TestTwoSafesOneModule(t *testing.T) {
	env := softhsmtest.New(t)
	env.InitToken("alpha", soPIN, userPIN)
	env.InitToken("beta", soPIN+"-b", userPIN+"-b")
	ctx := context.Background()
	a, err := Open(ctx, config(t, env, "alpha"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	bcfg := config(t, env, "beta")
	bcfg.PIN = PINSource{File: softhsmtest.WritePINFile(t, env.Dir(), "beta-b.pin", userPIN+"-b")}
	// The same library under another name (Debian's path is a symlink) is
	// still one module.
	resolved, err := filepath.EvalSymlinks(env.Module())
	if err != nil {
		t.Fatal(err)
	}
	bcfg.Module = resolved
	b, err := Open(ctx, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	loaded := loadedModules()
	if len(loaded) != 1 {
		t.Fatalf("loaded modules = %v, want one", loaded)
	}
	for path, refs := range loaded {
		if refs != 2 {
			t.Errorf("references to %s = %d, want 2", path, refs)
		}
	}

	r := ref(0, 1)
	shareA, shareB := shareFor(ref(1, 1)), shareFor(ref(2, 2))
	if err := a.Seal(ctx, r, shareA); err != nil {
		t.Fatal(err)
	}
	if err := b.Seal(ctx, r, shareB); err != nil {
		t.Fatal(err)
	}
	if got, err := a.Unseal(ctx, r); err != nil || !got.Equal(shareA) {
		t.Errorf("alpha.Unseal(%v) = %v, want alpha's share", r, err)
	}
	// Same key label, different keys: a record copied from alpha to beta
	// does not open there.
	moved := ref(0, 2)
	writeRaw(t, b, moved, readRaw(t, a, r))
	if _, err := b.Unseal(ctx, moved); !errors.Is(err, safe.ErrTampered) {
		t.Errorf("beta.Unseal(record copied from alpha) = %v, want ErrTampered", err)
	}
	if err := b.Destroy(ctx, moved); err != nil {
		t.Fatal(err)
	}

	if err := a.Close(); err != nil {
		t.Fatalf("alpha.Close = %v", err)
	}
	for path, refs := range loadedModules() {
		if refs != 1 {
			t.Errorf("references to %s after closing alpha = %d, want 1", path, refs)
		}
	}
	if got, err := b.Unseal(ctx, r); err != nil || !got.Equal(shareB) {
		t.Errorf("beta.Unseal(%v) after alpha closed = %v, want beta's share", r, err)
	}
	if err := b.Seal(ctx, ref(0, 3), shareB); err != nil {
		t.Errorf("beta.Seal after alpha closed = %v", err)
	}
	if refs, err := b.List(ctx); err != nil || len(refs) != 2 {
		t.Errorf("beta.List() = %v, %v, want 2 refs", refs, err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("beta.Close = %v", err)
	}
	assertNoModules(t)
}

// BenchmarkSealUnseal measures a real SoftHSM2 token: a full seal (encrypt,
// decrypt check, create and read back a token object) with an unseal and a
// destroy, and an unseal alone.
func BenchmarkSealUnseal(b *testing.B) {
	s, _, _ := newSafe(b, "bench")
	ctx := context.Background()
	r := ref(0, 1)
	share := shareFor(r)

	b.Run("seal+unseal+destroy", func(b *testing.B) {
		for b.Loop() {
			if err := s.Seal(ctx, r, share); err != nil {
				b.Fatal(err)
			}
			got, err := s.Unseal(ctx, r)
			if err != nil {
				b.Fatal(err)
			}
			got.Wipe()
			if err := s.Destroy(ctx, r); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
	})

	b.Run("unseal", func(b *testing.B) {
		if err := s.Seal(ctx, r, share); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			got, err := s.Unseal(ctx, r)
			if err != nil {
				b.Fatal(err)
			}
			got.Wipe()
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
		if err := s.Destroy(ctx, r); err != nil {
			b.Fatal(err)
		}
	})
}

// TestLoggedOutBehindItsBack: when something else logs the process out,
// private records become invisible. The Safe must say so rather than report
// them missing.
func TestLoggedOutBehindItsBack(t *testing.T) {
	s, _, _ := newSafe(t, "logout")
	ctx := context.Background()
	r := ref(0, 1)
	if err := s.Seal(ctx, r, shareFor(r)); err != nil {
		t.Fatal(err)
	}
	if err := s.mod.ctx.Logout(rawSession(t, s)); err != nil {
		t.Fatalf("C_Logout = %v", err)
	}
	wantLoggedOut := func(op string, err error) {
		t.Helper()
		if !isRV(err, pkcs11.CKR_USER_NOT_LOGGED_IN) || errors.Is(err, safe.ErrNotFound) {
			t.Errorf("%s after a logout = %v, want CKR_USER_NOT_LOGGED_IN, not ErrNotFound", op, err)
		}
	}
	_, err := s.Unseal(ctx, r)
	wantLoggedOut("Unseal", err)
	refs, err := s.List(ctx)
	wantLoggedOut("List", err)
	if len(refs) != 0 {
		t.Errorf("List after a logout = %v, want nothing", refs)
	}
	wantLoggedOut("Destroy", s.Destroy(ctx, r))
	wantLoggedOut("Seal", s.Seal(ctx, ref(0, 2), shareFor(r)))
}

// TestCancelDuringSeal cancels the context once Seal holds its session:
// Seal must return the context's error and store nothing.
func TestCancelDuringSeal(t *testing.T) {
	s, _, _ := newSafe(t, "cancel")
	ctx, cancel := context.WithCancel(context.Background())
	s.hookHeld = func(context.Context) { cancel() }
	r := ref(0, 1)
	if err := s.Seal(ctx, r, shareFor(r)); !errors.Is(err, context.Canceled) {
		t.Errorf("Seal(cancelled while running) = %v, want context.Canceled", err)
	}
	s.hookHeld = nil
	if _, err := s.Unseal(context.Background(), r); !errors.Is(err, safe.ErrNotFound) {
		t.Errorf("Unseal after a cancelled Seal = %v, want ErrNotFound", err)
	}
}
