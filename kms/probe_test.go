package kms_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// golden makes a golden ciphertext of ks's primary as the root KMS does
// (rootkms/golden.go), for keyset name: a random 32-byte plaintext under the
// associated data "cairn/golden/v1\x00" || name || "\x00" || be32(key ID).
// It returns the ciphertext, the associated data and the plaintext's
// SHA-256.
func golden(t *testing.T, ks *kmstest.Keyset, name string) (ct, ad []byte, sum [32]byte) {
	t.Helper()
	a, err := aead.New(ks.Handle())
	if err != nil {
		t.Fatal(err)
	}
	ad = append([]byte("cairn/golden/v1\x00"+name+"\x00"), 0, 0, 0, 0)
	binary.BigEndian.PutUint32(ad[len(ad)-4:], ks.Primary())
	pt := make([]byte, 32)
	rand.Read(pt)
	if ct, err = a.Encrypt(pt, ad); err != nil {
		t.Fatal(err)
	}
	return ct, ad, sha256.Sum256(pt)
}

func flipLast(b []byte) []byte {
	out := bytes.Clone(b)
	out[len(out)-1] ^= 1
	return out
}

// TestProbeIsNoDecryptOracle: an admin may probe only golden ciphertexts
// (the golden associated data of the key ID the ciphertext names), unless
// it is on the keyset's decrypt ACL; a call with one other probe is refused
// whole, decrypting nothing; the data plane never encrypts under the golden
// form; every probe run is audited with its keyset and key version.
func TestProbeIsNoDecryptOracle(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	debug := kmstest.NewKeyset(t, "ops/debug", &bundlev1.Acl{Encrypt: []string{"client/us-east/app"}, Decrypt: []string{"regionctl/global/regionctl"}})
	e.apply(s, e.bundle(e.ks, debug))
	app := e.client(appID, s)
	secret := []byte("a customer's data key")
	custCT := encrypt(t, app, ledger, secret, []byte("object-1")).GetCiphertext()
	debugCT := encrypt(t, app, "ops/debug", secret, []byte("object-2")).GetCiphertext()
	secretSum := sha256.Sum256(secret)
	gct, gad, gsum := golden(t, e.ks, ledger)
	goldenProbe := &kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: gct, AssociatedData: gad, PlaintextSha256: gsum[:]}
	// The golden form for another key ID than the ciphertext names.
	otherAD := bytes.Clone(gad)
	otherAD[len(otherAD)-1] ^= 1
	// The golden form naming another keyset (with the right key ID).
	debugAD := append([]byte("cairn/golden/v1\x00ops/debug\x00"), gad[len(gad)-4:]...)

	refusedDetail := "refused, not decrypted: kms: permission denied: not a golden probe"
	tests := []struct {
		name    string
		probes  []*kmsv1.GoldenProbe
		refused []bool // per probe: refused (else run and passed)
	}{
		{"golden", []*kmsv1.GoldenProbe{goldenProbe}, []bool{false}},
		// With its associated data and the right hash, a decrypt would pass:
		// the refusal is all the admin learns.
		{"a customer's ciphertext", []*kmsv1.GoldenProbe{{Keyset: ledger, Ciphertext: custCT, AssociatedData: []byte("object-1"), PlaintextSha256: secretSum[:]}}, []bool{true}},
		{"a customer's ciphertext without its associated data", []*kmsv1.GoldenProbe{{Keyset: ledger, Ciphertext: custCT, PlaintextSha256: secretSum[:]}}, []bool{true}},
		{"golden form of another key ID", []*kmsv1.GoldenProbe{{Keyset: ledger, Ciphertext: gct, AssociatedData: otherAD, PlaintextSha256: gsum[:]}}, []bool{true}},
		{"golden form of another keyset", []*kmsv1.GoldenProbe{{Keyset: ledger, Ciphertext: gct, AssociatedData: debugAD, PlaintextSha256: gsum[:]}}, []bool{true}},
		{"golden, then a customer's", []*kmsv1.GoldenProbe{goldenProbe, {Keyset: ledger, Ciphertext: custCT, AssociatedData: []byte("object-1"), PlaintextSha256: secretSum[:]}},
			[]bool{false, true}},
		{"any ciphertext of a keyset the admin may decrypt with", []*kmsv1.GoldenProbe{{Keyset: "ops/debug", Ciphertext: debugCT, AssociatedData: []byte("object-2"), PlaintextSha256: secretSum[:]}},
			[]bool{false}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(probeRecords(t, s))
			resp, err := s.admin.Probe(ctx(t), &kmsv1.ProbeRequest{Probes: tt.probes})
			if err != nil || len(resp.GetResults()) != len(tt.probes) {
				t.Fatalf("Probe(%s) = %v, %v; want %d results", tt.name, resp, err, len(tt.probes))
			}
			recs := probeRecords(t, s)[before:]
			if len(recs) != len(tt.probes) {
				t.Fatalf("Probe(%s): %d probe records, want %d", tt.name, len(recs), len(tt.probes))
			}
			for i, r := range resp.GetResults() {
				refused := tt.refused[i]
				if r.GetOk() == refused || refused != strings.HasPrefix(r.GetDetail(), refusedDetail) {
					t.Errorf("Probe(%s) result %d = %v, want refused=%v (detail %q) or passed", tt.name, i, r, refused, refusedDetail)
				}
				want, _ := kmsv1KeyID(tt.probes[i].GetCiphertext())
				rec := recs[i]
				wantOutcome, wantCode := audit.OutcomeOK, ""
				if refused {
					wantOutcome, wantCode = audit.OutcomeDenied, "PermissionDenied"
				}
				if rec.Identity != adminID || rec.Target.Keyset != tt.probes[i].GetKeyset() || rec.Target.KeyVersion != want || rec.Target.Region != region ||
					rec.Outcome != wantOutcome || rec.Code != wantCode {
					t.Errorf("probe record %d = %+v, want %s probing keyset %s key version %d in %s, outcome %s %s",
						i, rec, adminID, tt.probes[i].GetKeyset(), want, region, wantOutcome, wantCode)
				}
			}
		})
	}

	// Nobody can make a ciphertext an admin could probe: the data plane
	// refuses the golden form.
	for _, call := range []struct {
		name string
		call func() error
	}{
		{"Encrypt", func() error {
			_, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: secret, AssociatedData: gad})
			return err
		}},
		{"EncryptBatch", func() error {
			r, err := app.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: []*kmsv1.EncryptItem{{Plaintext: secret, AssociatedData: gad}}})
			if err == nil && r.GetResults()[0].GetError() != nil {
				return status.Error(codes.Code(r.GetResults()[0].GetError().GetCode()), r.GetResults()[0].GetError().GetMessage())
			}
			return err
		}},
		{"GenerateDataKey", func() error {
			_, err := app.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, AssociatedData: gad})
			return err
		}},
		{"Rewrap", func() error {
			_, err := app.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: gct, AssociatedData: gad})
			return err
		}},
	} {
		if err := call.call(); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s with golden associated data = %v, want InvalidArgument", call.name, err)
		}
	}
}

// probeRecords returns the audit records of probes run.
func probeRecords(t *testing.T, s *server) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, r := range readAudit(t, s) {
		if r.Operation == "/cairn.kms.v1.KMSAdmin/Probe" && r.Target.Keyset != "" && r.Reason != "" {
			out = append(out, r)
		}
	}
	return out
}

func kmsv1KeyID(ct []byte) (uint32, bool) {
	if len(ct) < 5 || ct[0] != 1 {
		return 0, false
	}
	return binary.BigEndian.Uint32(ct[1:5]), true
}
