package kmsclient

import (
	"context"
	"fmt"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// DataKeyFormat says how GenerateDataKey returns the plaintext key.
type DataKeyFormat int

const (
	// DataKeyTinkKeyset is a serialized google.crypto.tink.Keyset holding
	// the one new key (read it with insecurecleartextkeyset.Read and a
	// keyset.NewBinaryReader). Any Cairn keyset template may be asked for.
	DataKeyTinkKeyset DataKeyFormat = iota + 1
	// DataKeyRaw is the raw key bytes, for the AES128_GCM (16 bytes) and
	// AES256_GCM (32 bytes) templates only.
	DataKeyRaw
)

func (f DataKeyFormat) proto() (kmsv1.DataKeyFormat, bool) {
	switch f {
	case DataKeyTinkKeyset:
		return kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET, true
	case DataKeyRaw:
		return kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW, true
	}
	return 0, false
}

// DataKey is a fresh data key: in plaintext, and wrapped under the keyset's
// primary key version. Its String, GoString and LogValue never show the
// plaintext. Wipe it when done.
type DataKey struct {
	// Plaintext is the key, in the format asked for.
	Plaintext []byte
	// Wrapped is Plaintext encrypted under the keyset with the associated
	// data given to GenerateDataKey: Decrypt (with that associated data)
	// returns Plaintext.
	Wrapped []byte
	// KeyID is the Tink key ID of the key version that wrapped it.
	KeyID uint32
}

// Wipe zeroes the plaintext key and drops it.
func (k *DataKey) Wipe() {
	clear(k.Plaintext)
	k.Plaintext = nil
}

// String describes the key without its plaintext.
func (k DataKey) String() string {
	return fmt.Sprintf("kmsclient.DataKey{Plaintext: [%d bytes redacted], Wrapped: [%d bytes], KeyID: %d}", len(k.Plaintext), len(k.Wrapped), k.KeyID)
}

// GoString is String, so that %#v redacts too.
func (k DataKey) GoString() string { return k.String() }

// LogValue describes the key to log/slog without its plaintext.
func (k DataKey) LogValue() slog.Value {
	return slog.GroupValue(slog.Int("plaintext_bytes", len(k.Plaintext)), slog.Int("wrapped_bytes", len(k.Wrapped)), slog.Uint64("key_id", uint64(k.KeyID)))
}

// GenerateDataKey has the KMS make a fresh data key of a Tink key template
// ("AES128_GCM", "AES256_GCM", "AES256_GCM_SIV", "CHACHA20_POLY1305",
// "XCHACHA20_POLY1305"; "" is AES256_GCM) and return it in plaintext and
// wrapped under the keyset's primary key version with associatedData. The
// key comes from the KMS's crypto/rand; the KMS keeps no copy. It needs the
// keyset's generate_data_key permission. The call has Encrypt's deadline,
// failover and retry rules and, like Encrypt, never falls back to another
// region. An unknown template or a format the template does not allow is
// InvalidArgument.
func (a *AEAD) GenerateDataKey(ctx context.Context, template string, format DataKeyFormat, associatedData []byte) (*DataKey, error) {
	pf, ok := format.proto()
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "kmsclient: %s with keyset %q in region %s: unknown data key format %d; use DataKeyTinkKeyset or DataKeyRaw",
			opGenerateDataKey, a.keyset, a.region.name, int(format))
	}
	if err := a.checkSizes(opGenerateDataKey, "template name", []byte(template), 0, associatedData); err != nil {
		return nil, err
	}
	req := &kmsv1.GenerateDataKeyRequest{Keyset: a.keyset, Template: template, Format: pf, AssociatedData: associatedData}
	var resp *kmsv1.GenerateDataKeyResponse
	err := a.c.call(ctx, opGenerateDataKey, a.region, a.keyset, func(ctx context.Context, kms kmsv1.KMSClient, _ *region) error {
		r, err := kms.GenerateDataKey(ctx, req)
		if err != nil {
			return err
		}
		resp = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	k := &DataKey{Plaintext: resp.GetPlaintextKey(), Wrapped: resp.GetWrappedKey(), KeyID: resp.GetKeyId()}
	bad := ""
	switch {
	case len(k.Plaintext) == 0:
		bad = "no plaintext key"
	case len(k.Wrapped) == 0:
		bad = "no wrapped key"
	case format == DataKeyRaw && len(k.Plaintext) != 16 && len(k.Plaintext) != 32:
		bad = fmt.Sprintf("a raw key of %d bytes", len(k.Plaintext))
	}
	if bad != "" {
		k.Wipe()
		return nil, status.Errorf(codes.Internal, "kmsclient: %s with keyset %q in region %s: the KMS answered with %s", opGenerateDataKey, a.keyset, a.region.name, bad)
	}
	return k, nil
}
