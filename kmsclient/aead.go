package kmsclient

import (
	"context"
	"fmt"

	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// AEAD is a Cairn keyset of one region as a Tink AEAD: Encrypt and Decrypt
// are calls to that region's KMS servers (with failover, retries and, for
// Decrypt, the region's fallbacks). Use it as the key-encryption AEAD of
// aead.NewKMSEnvelopeAEADWithContext or aead.NewKMSEnvelopeAEAD2, or as the
// master key of keyset.Write and keyset.Read. Safe for concurrent use.
//
// The associated data is sent to the KMS and bound to the ciphertext; note
// that Tink's envelope AEAD passes empty associated data to its
// key-encryption AEAD (see the package documentation).
type AEAD struct {
	c      *Client
	region *region
	keyset string
}

var (
	_ tink.AEAD            = (*AEAD)(nil)
	_ tink.AEADWithContext = (*AEAD)(nil)
)

// Region returns the AEAD's region.
func (a *AEAD) Region() string { return a.region.name }

// Keyset returns the AEAD's keyset name.
func (a *AEAD) Keyset() string { return a.keyset }

// Encrypt is EncryptWithContext with context.Background (the client's
// WithTimeout still bounds it).
func (a *AEAD) Encrypt(plaintext, associatedData []byte) ([]byte, error) {
	return a.EncryptWithContext(context.Background(), plaintext, associatedData)
}

// Decrypt is DecryptWithContext with context.Background (the client's
// WithTimeout still bounds it).
func (a *AEAD) Decrypt(ciphertext, associatedData []byte) ([]byte, error) {
	return a.DecryptWithContext(context.Background(), ciphertext, associatedData)
}

// EncryptWithContext encrypts plaintext with associatedData under the
// keyset's primary key version, in the AEAD's region only. Errors wrap the
// gRPC status (status.Code works) and never hold the plaintext.
func (a *AEAD) EncryptWithContext(ctx context.Context, plaintext, associatedData []byte) ([]byte, error) {
	if err := a.checkSizes(opEncrypt, "plaintext", plaintext, 0, associatedData); err != nil {
		return nil, err
	}
	req := &kmsv1.EncryptRequest{Keyset: a.keyset, Plaintext: plaintext, AssociatedData: associatedData}
	var ct []byte
	err := a.c.call(ctx, opEncrypt, a.region, a.keyset, func(ctx context.Context, kms kmsv1.KMSClient, _ *region) error {
		resp, err := kms.Encrypt(ctx, req)
		if err != nil {
			return err
		}
		ct = resp.GetCiphertext()
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(ct) == 0 {
		// Every Cairn ciphertext has at least a prefix, a nonce and a tag.
		return nil, fmt.Errorf("kmsclient: encrypt with keyset %q in region %s: the KMS answered with an empty ciphertext", a.keyset, a.region.name)
	}
	return ct, nil
}

// DecryptWithContext decrypts ciphertext with associatedData. A ciphertext
// that does not decrypt (wrong associated data, truncated, tampered, another
// keyset's) is an InvalidArgument error and a nil plaintext, never an empty
// plaintext with a nil error. Errors wrap the gRPC status and never hold the
// ciphertext.
func (a *AEAD) DecryptWithContext(ctx context.Context, ciphertext, associatedData []byte) ([]byte, error) {
	if err := a.checkSizes(opDecrypt, "ciphertext", ciphertext, ciphertextOverhead, associatedData); err != nil {
		return nil, err
	}
	req := &kmsv1.DecryptRequest{Keyset: a.keyset, Ciphertext: ciphertext, AssociatedData: associatedData}
	var pt []byte
	err := a.c.call(ctx, opDecrypt, a.region, a.keyset, func(ctx context.Context, kms kmsv1.KMSClient, _ *region) error {
		resp, err := kms.Decrypt(ctx, req)
		if err != nil {
			return err
		}
		pt = resp.GetPlaintext()
		return nil
	})
	if err != nil {
		return nil, err
	}
	if pt == nil {
		// The empty plaintext, which proto3 cannot tell from an absent one;
		// only a successful decrypt gets here.
		pt = []byte{}
	}
	return pt, nil
}

// checkSizes refuses, before any call, an input over the client's limit
// (WithMaxPayload); overhead is what a ciphertext may add.
func (a *AEAD) checkSizes(o op, what string, data []byte, overhead int, associatedData []byte) error {
	limit := a.c.opts.maxPayload
	for _, in := range [...]struct {
		what  string
		n     int
		limit int
	}{{what, len(data), limit + overhead}, {"associated data", len(associatedData), limit}} {
		if in.n > in.limit {
			return status.Errorf(codes.InvalidArgument, "kmsclient: %s with keyset %q in region %s: %s is %d bytes, more than the client's limit of %d (WithMaxPayload)",
				o, a.keyset, a.region.name, in.what, in.n, in.limit)
		}
	}
	return nil
}
