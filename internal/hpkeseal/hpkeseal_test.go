package hpkeseal_test

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hpke"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/cairnkms/cairn/internal/hpkeseal"
	"github.com/cairnkms/cairn/internal/secret"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func newRecipient(t testing.TB) *hpkeseal.Recipient {
	t.Helper()
	r, err := hpkeseal.NewRecipient()
	if err != nil {
		t.Fatalf("NewRecipient() error = %v", err)
	}
	t.Cleanup(r.Close)
	return r
}

func seal(t testing.TB, to *cryptov1.HpkePublicKey, info, plaintext []byte) *cryptov1.HpkeSealed {
	t.Helper()
	sealed, err := hpkeseal.Seal(to, info, plaintext)
	if err != nil {
		t.Fatalf("Seal(%v, %q, %d bytes) error = %v", to, info, len(plaintext), err)
	}
	return sealed
}

func mustInfo(t testing.TB, label string, parts ...string) []byte {
	t.Helper()
	info, err := hpkeseal.Info(label, parts...)
	if err != nil {
		t.Fatalf("Info(%q, %q) error = %v", label, parts, err)
	}
	return info
}

// pattern returns n bytes that are not all equal.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + 7)
	}
	return b
}

func TestSuite(t *testing.T) {
	got := [3]uint16{hpkeseal.KEM, hpkeseal.KDF, hpkeseal.AEAD}
	want := [3]uint16{hpke.DHKEM(ecdh.X25519()).ID(), hpke.HKDFSHA256().ID(), hpke.AES256GCM().ID()}
	if got != want {
		t.Errorf("KEM, KDF, AEAD = %#04x, want %#04x", got, want)
	}
}

func TestRoundTrip(t *testing.T) {
	r := newRecipient(t)
	pub := r.PublicKey()
	wantPub := &cryptov1.HpkePublicKey{KemId: 0x0020, PublicKey: pub.GetPublicKey()}
	if diff := cmp.Diff(wantPub, pub, protocmp.Transform()); diff != "" || len(pub.GetPublicKey()) != 32 {
		t.Fatalf("PublicKey() = %v, want a 32-byte key for KEM 0x0020 (-want +got):\n%s", pub, diff)
	}
	for _, tc := range []struct {
		name      string
		info      []byte
		plaintext []byte
	}{
		{"1 byte, nil info", nil, []byte{0}},
		{"32 bytes, empty info", []byte{}, pattern(32)},
		{"32 bytes, Info", mustInfo(t, "cairn/test/v1", "from", "to"), pattern(32)},
		{"1000 bytes", []byte("info"), pattern(1000)},
		{"64 KiB", []byte("info"), pattern(64 << 10)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sealed := seal(t, pub, tc.info, tc.plaintext)
			want := &cryptov1.HpkeSealed{KemId: 0x0020, KdfId: 0x0001, AeadId: 0x0002, Ciphertext: sealed.GetCiphertext()}
			if diff := cmp.Diff(want, sealed, protocmp.Transform()); diff != "" {
				t.Errorf("Seal() suite ids mismatch (-want +got):\n%s", diff)
			}
			if got, want := len(sealed.GetCiphertext()), len(tc.plaintext)+hpkeseal.Overhead; got != want {
				t.Errorf("len(Seal().Ciphertext) = %d, want %d", got, want)
			}
			got, err := r.Open(sealed, tc.info)
			if err != nil {
				t.Fatalf("Open() error = %v, want nil", err)
			}
			if want := secret.New(tc.plaintext); !got.Equal(want) {
				t.Errorf("Open() plaintext differs from the sealed plaintext")
			}
			got.Wipe()
		})
	}
}

// TestPublicKeyIsACopy checks that a caller cannot change the Recipient's
// key through the returned message.
func TestPublicKeyIsACopy(t *testing.T) {
	r := newRecipient(t)
	pub := r.PublicKey()
	pub.PublicKey[0] ^= 0xff
	if got := r.PublicKey(); bytes.Equal(got.GetPublicKey(), pub.GetPublicKey()) {
		t.Errorf("PublicKey() after modifying an earlier result = %x, want the original key", got.GetPublicKey())
	}
}

// TestOpenFails checks that every way of breaking a message yields ErrOpen,
// unwrapped, and a zero secret.
func TestOpenFails(t *testing.T) {
	r := newRecipient(t)
	other := newRecipient(t)
	info := mustInfo(t, "cairn/test/v1", "a", "b")
	plaintext := pattern(32)
	sealed := seal(t, r.PublicKey(), info, plaintext)
	ct := sealed.GetCiphertext()

	with := func(edit func(m *cryptov1.HpkeSealed)) *cryptov1.HpkeSealed {
		m := proto.CloneOf(sealed)
		edit(m)
		return m
	}
	// sealedWith seals pt to r with crypto/hpke directly, in any suite, and
	// labels the result with the given ids.
	sealedWith := func(kdf hpke.KDF, aead hpke.AEAD, kemID, kdfID, aeadID uint32, pt []byte) *cryptov1.HpkeSealed {
		pk, err := hpke.DHKEM(ecdh.X25519()).NewPublicKey(r.PublicKey().GetPublicKey())
		if err != nil {
			t.Fatalf("NewPublicKey() error = %v", err)
		}
		c, err := hpke.Seal(pk, kdf, aead, info, pt)
		if err != nil {
			t.Fatalf("hpke.Seal() error = %v", err)
		}
		return &cryptov1.HpkeSealed{KemId: kemID, KdfId: kdfID, AeadId: aeadID, Ciphertext: c}
	}

	type testCase struct {
		name   string
		r      *hpkeseal.Recipient
		sealed *cryptov1.HpkeSealed
		info   []byte
	}
	cases := []testCase{
		{"other recipient", other, sealed, info},
		{"nil recipient", nil, sealed, info},
		{"zero Recipient", &hpkeseal.Recipient{}, sealed, info},
		{"other info", r, sealed, mustInfo(t, "cairn/test/v1", "a", "c")},
		{"info prefix", r, sealed, info[:len(info)-1]},
		{"nil info", r, sealed, nil},
		{"nil message", r, nil, info},
		{"empty message", r, &cryptov1.HpkeSealed{}, info},
		{"nil ciphertext", r, with(func(m *cryptov1.HpkeSealed) { m.Ciphertext = nil }), info},
		{"byte appended", r, with(func(m *cryptov1.HpkeSealed) { m.Ciphertext = append(m.Ciphertext, 0) }), info},
		{"kem id 0", r, with(func(m *cryptov1.HpkeSealed) { m.KemId = 0 }), info},
		{"kem id 0x0021", r, with(func(m *cryptov1.HpkeSealed) { m.KemId = 0x0021 }), info},
		{"kem id 0x10020", r, with(func(m *cryptov1.HpkeSealed) { m.KemId = 0x10020 }), info},
		{"kdf id 0", r, with(func(m *cryptov1.HpkeSealed) { m.KdfId = 0 }), info},
		{"kdf id 0x0002", r, with(func(m *cryptov1.HpkeSealed) { m.KdfId = 0x0002 }), info},
		{"aead id 0x0001", r, with(func(m *cryptov1.HpkeSealed) { m.AeadId = 0x0001 }), info},
		{"aead id 0x0003", r, with(func(m *cryptov1.HpkeSealed) { m.AeadId = 0x0003 }), info},
		{"aead id 0xffff", r, with(func(m *cryptov1.HpkeSealed) { m.AeadId = 0xffff }), info},
		// Messages that crypto/hpke would open with the suite they name are
		// still refused if the suite is not Cairn's.
		{"ChaCha20Poly1305 labelled as such", r, sealedWith(hpke.HKDFSHA256(), hpke.ChaCha20Poly1305(), 0x0020, 0x0001, 0x0003, plaintext), info},
		{"AES-128-GCM labelled as such", r, sealedWith(hpke.HKDFSHA256(), hpke.AES128GCM(), 0x0020, 0x0001, 0x0001, plaintext), info},
		{"HKDF-SHA512 labelled as such", r, sealedWith(hpke.HKDFSHA512(), hpke.AES256GCM(), 0x0020, 0x0003, 0x0002, plaintext), info},
		{"ChaCha20Poly1305 labelled AES-256-GCM", r, sealedWith(hpke.HKDFSHA256(), hpke.ChaCha20Poly1305(), 0x0020, 0x0001, 0x0002, plaintext), info},
		{"HKDF-SHA512 labelled HKDF-SHA256", r, sealedWith(hpke.HKDFSHA512(), hpke.AES256GCM(), 0x0020, 0x0001, 0x0002, plaintext), info},
		// Seal refuses an empty plaintext; Open refuses one made elsewhere.
		{"empty plaintext", r, sealedWith(hpke.HKDFSHA256(), hpke.AES256GCM(), 0x0020, 0x0001, 0x0002, nil), info},
	}
	for i := range ct {
		cases = append(cases, testCase{
			fmt.Sprintf("bit flipped in byte %d", i), r,
			with(func(m *cryptov1.HpkeSealed) { m.Ciphertext[i] ^= 0x01 }), info,
		})
	}
	for n := range len(ct) {
		cases = append(cases, testCase{
			fmt.Sprintf("truncated to %d bytes", n), r,
			with(func(m *cryptov1.HpkeSealed) { m.Ciphertext = m.Ciphertext[:n] }), info,
		})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.r.Open(tc.sealed, tc.info)
			if err != hpkeseal.ErrOpen { // exactly ErrOpen, not a wrapper
				t.Errorf("Open() error = %v, want exactly ErrOpen", err)
			}
			if !got.IsZero() {
				t.Errorf("Open() secret IsZero = false, want true")
			}
		})
	}

	// The untouched message still opens: the cases above failed for their
	// edits, not because the message was bad to begin with.
	got, err := r.Open(sealed, info)
	if err != nil || !got.Equal(secret.New(plaintext)) {
		t.Errorf("Open(original) = %v, %v, want the plaintext, nil", got, err)
	}
}

func TestSealRefuses(t *testing.T) {
	good := newRecipient(t).PublicKey()
	withKey := func(kem uint32, key []byte) *cryptov1.HpkePublicKey {
		return &cryptov1.HpkePublicKey{KemId: kem, PublicKey: key}
	}
	for _, tc := range []struct {
		name      string
		to        *cryptov1.HpkePublicKey
		plaintext []byte
		want      string
	}{
		{"nil key", nil, pattern(32), "hpkeseal: nil public key"},
		{"empty key message", &cryptov1.HpkePublicKey{}, pattern(32), "hpkeseal: public key for KEM 0x0000, want 0x0020"},
		{"kem 0x0010 (P-256)", withKey(0x0010, good.GetPublicKey()), pattern(32), "hpkeseal: public key for KEM 0x0010"},
		{"kem 0x0021 (X448)", withKey(0x0021, good.GetPublicKey()), pattern(32), "hpkeseal: public key for KEM 0x0021"},
		{"kem 0x10020", withKey(0x10020, good.GetPublicKey()), pattern(32), "hpkeseal: public key for KEM 0x10020"},
		{"nil key bytes", withKey(0x0020, nil), pattern(32), "hpkeseal: public key is 0 bytes, want 32"},
		{"31 byte key", withKey(0x0020, good.GetPublicKey()[:31]), pattern(32), "hpkeseal: public key is 31 bytes, want 32"},
		{"33 byte key", withKey(0x0020, append(good.GetPublicKey(), 0)), pattern(32), "hpkeseal: public key is 33 bytes, want 32"},
		{"65 byte key", withKey(0x0020, pattern(65)), pattern(32), "hpkeseal: public key is 65 bytes, want 32"},
		{"low-order key 0", withKey(0x0020, make([]byte, 32)), pattern(32), "hpkeseal: seal: "},
		{"low-order key 1", withKey(0x0020, append([]byte{1}, make([]byte, 31)...)), pattern(32), "hpkeseal: seal: "},
		{"nil plaintext", good, nil, "hpkeseal: empty plaintext"},
		{"empty plaintext", good, []byte{}, "hpkeseal: empty plaintext"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := hpkeseal.Seal(tc.to, []byte("info"), tc.plaintext)
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("Seal(%v) error = %v, want prefix %q", tc.to, err, tc.want)
			}
			if got != nil {
				t.Errorf("Seal(%v) = %v, want nil", tc.to, got)
			}
		})
	}
}

// TestSealIsRandomized checks that every Seal uses a fresh ephemeral key.
func TestSealIsRandomized(t *testing.T) {
	r := newRecipient(t)
	const n = 20
	plaintext := pattern(32)
	seen := map[string]bool{}
	encs := map[string]bool{}
	for range n {
		ct := seal(t, r.PublicKey(), []byte("info"), plaintext).GetCiphertext()
		seen[string(ct)] = true
		encs[string(ct[:hpkeseal.PublicKeySize])] = true
	}
	if len(seen) != n || len(encs) != n {
		t.Errorf("%d Seal() calls of one plaintext gave %d distinct ciphertexts and %d distinct encapsulated keys, want %d", n, len(seen), len(encs), n)
	}
}

func TestClose(t *testing.T) {
	r := newRecipient(t)
	pub := r.PublicKey()
	sealed := seal(t, pub, []byte("info"), pattern(32))
	r.Close()
	if got, err := r.Open(sealed, []byte("info")); err != hpkeseal.ErrOpen || !got.IsZero() {
		t.Errorf("Open() after Close = %v, %v, want zero secret, ErrOpen", got, err)
	}
	if got := r.PublicKey(); got != nil {
		t.Errorf("PublicKey() after Close = %v, want nil", got)
	}
	r.Close() // a second Close is harmless
	var nilR *hpkeseal.Recipient
	nilR.Close()
	if got := nilR.PublicKey(); got != nil {
		t.Errorf("nil Recipient PublicKey() = %v, want nil", got)
	}
}

// TestConcurrent opens one message from several goroutines while another
// closes the Recipient; run it with -race.
func TestConcurrent(t *testing.T) {
	r := newRecipient(t)
	plaintext := pattern(32)
	sealed := seal(t, r.PublicKey(), nil, plaintext)
	want := secret.New(plaintext)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 8 {
		wg.Go(func() {
			for range 8 {
				got, err := r.Open(sealed, nil)
				switch {
				case errors.Is(err, hpkeseal.ErrOpen): // closed meanwhile
				case err != nil:
					errs <- fmt.Errorf("Open() error = %v, want nil or ErrOpen", err)
				case !got.Equal(want):
					errs <- errors.New("Open() plaintext differs from the sealed plaintext")
				}
			}
		})
	}
	wg.Go(r.Close)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, err := r.Open(sealed, nil); err != hpkeseal.ErrOpen {
		t.Errorf("Open() after concurrent Close = %v, want ErrOpen", err)
	}
}

func TestInfo(t *testing.T) {
	for _, tc := range []struct {
		label string
		parts []string
		want  []byte
	}{
		{"cairn/x/v1", nil, []byte("cairn/x/v1")},
		{"cairn/x/v1", []string{"a"}, []byte("cairn/x/v1\x00a")},
		{"cairn/x/v1", []string{"a", "b"}, []byte("cairn/x/v1\x00a\x00b")},
		{"cairn/x/v1", []string{""}, []byte("cairn/x/v1\x00")},
		{"cairn/x/v1", []string{"", ""}, []byte("cairn/x/v1\x00\x00")},
		{"l", []string{"spiffe://a/b", "région"}, []byte("l\x00spiffe://a/b\x00région")},
	} {
		got, err := hpkeseal.Info(tc.label, tc.parts...)
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("Info(%q, %q) = %q, %v, want %q, nil", tc.label, tc.parts, got, err, tc.want)
		}
	}
}

func TestInfoRefuses(t *testing.T) {
	for _, tc := range []struct {
		label string
		parts []string
		want  string
	}{
		{"", nil, "hpkeseal: empty info label"},
		{"", []string{"a"}, "hpkeseal: empty info label"},
		{"a\x00b", nil, `hpkeseal: info label "a\x00b" contains NUL`},
		{"\x00", nil, `hpkeseal: info label "\x00" contains NUL`},
		{"l", []string{"\x00"}, `hpkeseal: info part 0 ("\x00") contains NUL`},
		{"l", []string{"a", "b\x00"}, `hpkeseal: info part 1 ("b\x00") contains NUL`},
		// Without the check these two would collide with Info("l", "a", "b").
		{"l\x00a", []string{"b"}, `hpkeseal: info label "l\x00a" contains NUL`},
		{"l", []string{"a\x00b"}, `hpkeseal: info part 0 ("a\x00b") contains NUL`},
	} {
		got, err := hpkeseal.Info(tc.label, tc.parts...)
		if err == nil || err.Error() != tc.want || got != nil {
			t.Errorf("Info(%q, %q) = %q, %v, want nil, %s", tc.label, tc.parts, got, err, tc.want)
		}
	}
}

func BenchmarkSealOpen32(b *testing.B) {
	r := newRecipient(b)
	pub := r.PublicKey()
	info := []byte("cairn/bench/v1")
	plaintext := pattern(32)
	for b.Loop() {
		sealed, err := hpkeseal.Seal(pub, info, plaintext)
		if err != nil {
			b.Fatalf("Seal() error = %v", err)
		}
		got, err := r.Open(sealed, info)
		if err != nil {
			b.Fatalf("Open() error = %v", err)
		}
		got.Wipe()
	}
}
