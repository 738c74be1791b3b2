package kms_test

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestNoKeysetEnumeration: a caller on none of a keyset's ACLs gets, from
// every data-plane method (batches included) and from the transit API, the
// same code and the same message, byte for byte, whether the keyset exists
// or not; a caller on another of its ACLs is told what it lacks.
func TestNoKeysetEnumeration(t *testing.T) {
	e := newEnv(t)
	readOnly := kmstest.NewKeyset(t, "payments/readonly", &bundlev1.Acl{Decrypt: []string{"client/us-east/app"}})
	// with serves ledger; without serves the same region without it.
	with, without := e.start(kms1ID, ""), e.start(kms2ID, "")
	e.apply(with, e.bundle(e.ks, readOnly))
	e.apply(without, e.bundle(readOnly))
	ct := encrypt(t, e.client(appID, with), ledger, []byte("dek"), nil).GetCiphertext()

	calls := []struct {
		name string
		call func(c kmsv1.KMSClient, keyset string) error
	}{
		{"Encrypt", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ks, Plaintext: []byte("x")})
			return err
		}},
		{"Decrypt", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ks, Ciphertext: ct})
			return err
		}},
		{"EncryptBatch", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ks, Items: []*kmsv1.EncryptItem{{Plaintext: []byte("x")}}})
			return err
		}},
		{"DecryptBatch", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ks, Items: []*kmsv1.DecryptItem{{Ciphertext: ct}}})
			return err
		}},
		{"GenerateDataKey", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ks})
			return err
		}},
		{"Rewrap", func(c kmsv1.KMSClient, ks string) error {
			_, err := c.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ks, Ciphertext: ct})
			return err
		}},
	}
	const hidden = `kms: permission denied: spiffe://cairn.test/client/us-east/intruder may not use keyset "payments/ledger" in region us-east, or it does not exist`
	intruderWith, intruderWithout := e.client(otherID, with), e.client(otherID, without)
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			exists, gone := c.call(intruderWith, ledger), c.call(intruderWithout, ledger)
			for _, got := range []struct {
				what string
				err  error
			}{{"existing keyset", exists}, {"unknown keyset", gone}} {
				if st := status.Convert(got.err); st.Code() != codes.PermissionDenied || st.Message() != hidden {
					t.Errorf("%s(%s) by a caller on no ACL = %v, want PermissionDenied %q", c.name, got.what, got.err, hidden)
				}
			}
		})
	}

	// A caller on one of the keyset's ACLs learns what it may not do.
	app := e.client(appID, with)
	if _, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/readonly", Plaintext: []byte("x")}); status.Code(err) != codes.PermissionDenied ||
		status.Convert(err).Message() != `kms: permission denied: spiffe://cairn.test/client/us-east/app may not encrypt with keyset "payments/readonly"` {
		t.Errorf("Encrypt(decrypt-only keyset) by a caller on its decrypt ACL = %v, want PermissionDenied naming the operation", err)
	}

	// A caller on the decrypt ACL is told a ciphertext names a key version
	// the keyset does not hold (its key ID is in the clear): NotFound,
	// naming the version. Any other failure stays the one opaque error.
	gone := append([]byte{0x01, 0xde, 0xad, 0xbe, 0xef}, ct[5:]...)
	for _, tt := range []struct {
		name string
		call func() error
	}{
		{"Decrypt", func() error {
			_, err := app.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: gone})
			return err
		}},
		{"DecryptBatch", func() error {
			r, err := app.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: []*kmsv1.DecryptItem{{Ciphertext: gone}}})
			if err != nil {
				return err
			}
			ie := r.GetResults()[0].GetError()
			return status.Error(codes.Code(ie.GetCode()), ie.GetMessage())
		}},
	} {
		err := tt.call()
		if st := status.Convert(err); st.Code() != codes.NotFound || !strings.Contains(st.Message(), "key version 3735928559") {
			t.Errorf("%s(ciphertext naming a version the keyset lacks) by a caller on its ACL = %v, want NotFound naming key version 3735928559", tt.name, err)
		}
	}
	flipped := bytes.Clone(ct)
	flipped[len(flipped)-1] ^= 1
	if _, err := app.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: flipped}); status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != "kms: ciphertext does not decrypt" {
		t.Errorf("Decrypt(tampered) by a caller on its ACL = %v, want the one opaque InvalidArgument", err)
	}

	// The transit API answers alike: 403 and one body for both, on the
	// operations; 404 and one body for both, on the key read.
	intruder := e.httpsClient(otherID)
	baseWith, baseWithout := e.transitServer(with)+"/v1/transit/", e.transitServer(without)+"/v1/transit/"
	for _, op := range []struct {
		name, method, path string
		body               any
		code               int
	}{
		{"encrypt", http.MethodPost, "encrypt/" + ledger, map[string]string{"plaintext": b64([]byte("x"))}, http.StatusForbidden},
		{"read key", http.MethodGet, "keys/" + ledger, nil, http.StatusNotFound},
	} {
		a, b := call(t, intruder, op.method, baseWith+op.path, op.body), call(t, intruder, op.method, baseWithout+op.path, op.body)
		if a.code != op.code || b.code != op.code || a.body != b.body {
			t.Errorf("transit %s by a caller on no ACL: existing keyset %d %q, unknown keyset %d %q; want the same %d", op.name, a.code, a.body, b.code, b.body, op.code)
		}
	}
}
