package kms

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"strconv"
	"time"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/kms/keystore"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// op names a served method, for metrics.
type op int

const (
	opEncrypt op = iota
	opDecrypt
	opEncryptBatch
	opDecryptBatch
	opGenerateDataKey
	opRewrap
	opApplyBundle
	opGetStatus
	opProbe
	numOps
)

var opNames = [numOps]string{"encrypt", "decrypt", "encrypt_batch", "decrypt_batch", "generate_data_key", "rewrap", "apply_bundle", "get_status", "probe"}

// maxCiphertextOverhead is the most a ciphertext of any Cairn keyset
// template is longer than its plaintext: the 5-byte TINK prefix, a nonce (24
// bytes for XChaCha20-Poly1305) and a 16-byte tag.
const maxCiphertextOverhead = 5 + 24 + 16

// rawKeySizes are the templates GenerateDataKey may return as RAW key bytes.
var rawKeySizes = map[string]int{"AES128_GCM": 16, "AES256_GCM": 32}

// kmsAPI is the data plane (kms.v1.KMS). The request path reads the current
// snapshot once, looks the keyset up in its map, matches the caller against
// the keyset's ACL without allocating, and counts the use with atomics: no
// lock and no network.
type kmsAPI struct {
	kmsv1.UnimplementedKMSServer
	s *Server
}

// keyset returns the named keyset if the server is ready and the caller may
// perform op with it, and names it in the audit record.
func (s *Server) keyset(ctx context.Context, name string, kop keystore.Op) (*keystore.Keyset, error) {
	cur := s.cur.Load()
	if cur == nil {
		_, reason := s.State()
		return nil, fmt.Errorf("%w: %s", errNotReady, reason)
	}
	audit.AddTarget(ctx, audit.Target{Region: s.cfg.Region})
	k, ok := cur.store.Keyset(name)
	id, _ := identity.FromContext(ctx)
	if ok && k.Allows(kop, id) {
		return k, nil
	}
	if !ok || !onSomeACL(k, id) {
		return nil, s.hiddenKeyset(id, name)
	}
	// The caller is on another of the keyset's ACLs: it knows the keyset
	// exists, and is told what it lacks.
	return nil, fmt.Errorf("%w: %s may not %s with keyset %q", errDenied, id, kop, k.Name())
}

// hiddenKeyset is the refusal of a keyset to a caller on none of its ACLs,
// the same, byte for byte, whether the keyset exists or not: such a caller
// cannot enumerate keyset names.
func (s *Server) hiddenKeyset(id identity.ID, name string) error {
	return fmt.Errorf("%w: %s may not use keyset %q in region %s, or it does not exist", errDenied, id, truncate(name), s.cfg.Region)
}

// truncate bounds a client-supplied string echoed in an error.
func truncate(s string) string {
	if len(s) > 128 {
		return s[:128] + "..."
	}
	return s
}

func (s *Server) checkSize(what string, b []byte, limit int) error {
	if len(b) > limit {
		return fmt.Errorf("%w: %s is %d bytes, more than the limit of %d", errInvalid, what, len(b), limit)
	}
	return nil
}

// checkPlaintext checks what an encrypting call encrypts: sizes, and no
// associated data in the golden ciphertexts' reserved form.
func (s *Server) checkPlaintext(pt, ad []byte) error {
	if err := s.checkSize("plaintext", pt, s.cfg.MaxPayload); err != nil {
		return err
	}
	if err := s.checkSize("associated data", ad, s.cfg.MaxPayload); err != nil {
		return err
	}
	return checkReservedAD(ad)
}

func (s *Server) checkCiphertext(ct, ad []byte) error {
	if err := s.checkSize("ciphertext", ct, s.cfg.MaxPayload+maxCiphertextOverhead); err != nil {
		return err
	}
	return s.checkSize("associated data", ad, s.cfg.MaxPayload)
}

// Encrypt implements kms.v1.KMS.
func (a *kmsAPI) Encrypt(ctx context.Context, req *kmsv1.EncryptRequest) (resp *kmsv1.EncryptResponse, err error) {
	s := a.s
	defer s.observeData(opEncrypt, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpEncrypt)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkPlaintext(req.GetPlaintext(), req.GetAssociatedData()); err != nil {
		return nil, toStatus(err)
	}
	ct, v, err := k.Encrypt(req.GetPlaintext(), req.GetAssociatedData(), s.cfg.Now())
	if v != nil {
		audit.AddTarget(ctx, audit.Target{KeyVersion: v.KeyID()})
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return &kmsv1.EncryptResponse{Ciphertext: ct, KeyId: v.KeyID()}, nil
}

// Decrypt implements kms.v1.KMS.
func (a *kmsAPI) Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (resp *kmsv1.DecryptResponse, err error) {
	s := a.s
	defer s.observeData(opDecrypt, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpDecrypt)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkCiphertext(req.GetCiphertext(), req.GetAssociatedData()); err != nil {
		return nil, toStatus(err)
	}
	pt, v, err := k.Decrypt(req.GetCiphertext(), req.GetAssociatedData(), s.cfg.Now())
	if v != nil {
		audit.AddTarget(ctx, audit.Target{KeyVersion: v.KeyID()})
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return &kmsv1.DecryptResponse{Plaintext: pt, KeyId: v.KeyID()}, nil
}

// itemError is a batch item's failure.
func itemError(err error) *kmsv1.ItemError {
	st := toStatus(err)
	return &kmsv1.ItemError{Code: uint32(codeOf(st)), Message: statusMessage(st)}
}

// EncryptBatch implements kms.v1.KMS. The keyset lookup and the ACL check
// are made once for the batch; the response takes a fixed number of
// allocations, all ciphertexts carved from one buffer (see batch.go).
func (a *kmsAPI) EncryptBatch(ctx context.Context, req *kmsv1.EncryptBatchRequest) (resp *kmsv1.EncryptBatchResponse, err error) {
	s := a.s
	defer s.observeData(opEncryptBatch, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpEncrypt)
	if err != nil {
		return nil, toStatus(err)
	}
	items := req.GetItems()
	if len(items) > s.cfg.MaxBatch {
		return nil, batchTooLarge(len(items), s.cfg.MaxBatch)
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: k.Primary().KeyID()})
	out, slots, buf := encryptResults(items)
	out.MaxItems = s.maxItems()
	b := k.NewBatch(len(items), s.cfg.Now())
	defer b.Done()
	for i, it := range items {
		if err := s.checkPlaintext(it.GetPlaintext(), it.GetAssociatedData()); err != nil {
			out.Results[i] = &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Error{Error: itemError(err)}}
			continue
		}
		start := len(buf)
		var v *keystore.Version
		buf, v, err = b.EncryptAppend(buf, it.GetPlaintext(), it.GetAssociatedData())
		if err != nil {
			out.Results[i] = &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Error{Error: itemError(err)}}
			continue
		}
		sl := &slots[i]
		sl.resp.Ciphertext, sl.resp.KeyId = carve(buf, start), v.KeyID()
		sl.ok.Ok = &sl.resp
		sl.res.Result = &sl.ok
		out.Results[i] = &sl.res
	}
	return out, nil
}

// DecryptBatch implements kms.v1.KMS. The keyset lookup and the ACL check
// are made once for the batch, the version lookup once per run of items
// under one version; the response takes a fixed number of allocations, all
// plaintexts carved from one buffer (see batch.go).
func (a *kmsAPI) DecryptBatch(ctx context.Context, req *kmsv1.DecryptBatchRequest) (resp *kmsv1.DecryptBatchResponse, err error) {
	s := a.s
	defer s.observeData(opDecryptBatch, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpDecrypt)
	if err != nil {
		return nil, toStatus(err)
	}
	items := req.GetItems()
	if len(items) > s.cfg.MaxBatch {
		return nil, batchTooLarge(len(items), s.cfg.MaxBatch)
	}
	out, slots, buf := decryptResults(items)
	out.MaxItems = s.maxItems()
	b := k.NewBatch(len(items), s.cfg.Now())
	defer b.Done()
	// The audit record names the key version if every item that decrypted
	// used the same one (the usual case: one object's DEKs).
	var used uint32
	mixed := false
	for i, it := range items {
		if err := s.checkCiphertext(it.GetCiphertext(), it.GetAssociatedData()); err != nil {
			out.Results[i] = &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Error{Error: itemError(err)}}
			continue
		}
		start := len(buf)
		var v *keystore.Version
		buf, v, err = b.DecryptAppend(buf, it.GetCiphertext(), it.GetAssociatedData())
		if err != nil {
			out.Results[i] = &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Error{Error: itemError(err)}}
			continue
		}
		if used != 0 && used != v.KeyID() {
			mixed = true
		}
		used = v.KeyID()
		sl := &slots[i]
		sl.resp.Plaintext, sl.resp.KeyId = carve(buf, start), v.KeyID()
		sl.ok.Ok = &sl.resp
		sl.res.Result = &sl.ok
		out.Results[i] = &sl.res
	}
	if !mixed {
		audit.AddTarget(ctx, audit.Target{KeyVersion: used})
	}
	return out, nil
}

// GenerateDataKey implements kms.v1.KMS.
func (a *kmsAPI) GenerateDataKey(ctx context.Context, req *kmsv1.GenerateDataKeyRequest) (resp *kmsv1.GenerateDataKeyResponse, err error) {
	s := a.s
	defer s.observeData(opGenerateDataKey, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpGenerateDataKey)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkPlaintext(nil, req.GetAssociatedData()); err != nil {
		return nil, toStatus(err)
	}
	key, err := newDataKey(req.GetTemplate(), req.GetFormat())
	if err != nil {
		return nil, toStatus(err)
	}
	wrapped, v, err := k.Encrypt(key, req.GetAssociatedData(), s.cfg.Now())
	if v != nil {
		audit.AddTarget(ctx, audit.Target{KeyVersion: v.KeyID()})
	}
	if err != nil {
		clear(key)
		return nil, toStatus(err)
	}
	return &kmsv1.GenerateDataKeyResponse{PlaintextKey: key, WrappedKey: wrapped, KeyId: v.KeyID()}, nil
}

// newDataKey makes a fresh data key of the named template: a serialized
// Tink keyset of one new key (TINK_KEYSET, the default), or raw key bytes
// from crypto/rand (RAW, only for AES128_GCM and AES256_GCM).
func newDataKey(template string, format kmsv1.DataKeyFormat) ([]byte, error) {
	switch format {
	case kmsv1.DataKeyFormat_DATA_KEY_FORMAT_UNSPECIFIED, kmsv1.DataKeyFormat_DATA_KEY_FORMAT_TINK_KEYSET:
		// Template's refusal quotes the name whole: a name longer than
		// truncate keeps is no template's, so it is looked up truncated,
		// for a refusal of bounded size that still lists the templates.
		t, err := keysets.Template(truncate(template))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errInvalid, err)
		}
		h, err := keyset.NewHandle(t)
		if err != nil {
			return nil, fmt.Errorf("kms: new data key: %w", err)
		}
		var buf bytes.Buffer
		if err := insecurecleartextkeyset.Write(h, keyset.NewBinaryWriter(&buf)); err != nil {
			clear(buf.Bytes())
			return nil, fmt.Errorf("kms: serializing the data key: %w", err)
		}
		return buf.Bytes(), nil
	case kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW:
		if template == "" {
			template = keysets.DefaultTemplate
		}
		n, ok := rawKeySizes[template]
		if !ok {
			return nil, fmt.Errorf("%w: format RAW is only for the AES128_GCM and AES256_GCM templates, not %q", errInvalid, truncate(template))
		}
		key := make([]byte, n)
		_, _ = rand.Read(key) // crypto/rand.Read never fails (Go 1.24+)
		return key, nil
	}
	return nil, fmt.Errorf("%w: unknown data key format %v", errInvalid, format)
}

// Rewrap implements kms.v1.KMS: decrypt, then encrypt under the current
// primary, inside the server.
func (a *kmsAPI) Rewrap(ctx context.Context, req *kmsv1.RewrapRequest) (resp *kmsv1.RewrapResponse, err error) {
	s := a.s
	defer s.observeData(opRewrap, req.GetKeyset(), time.Now(), &err)
	k, err := s.keyset(ctx, req.GetKeyset(), keystore.OpRewrap)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkCiphertext(req.GetCiphertext(), req.GetAssociatedData()); err != nil {
		return nil, toStatus(err)
	}
	if err := checkReservedAD(req.GetAssociatedData()); err != nil {
		return nil, toStatus(err)
	}
	now := s.cfg.Now()
	pt, src, err := k.Decrypt(req.GetCiphertext(), req.GetAssociatedData(), now)
	if src != nil {
		audit.AddTarget(ctx, audit.Target{KeyVersion: src.KeyID()})
	}
	if err != nil {
		return nil, toStatus(err)
	}
	defer clear(pt)
	ct, dst, err := k.Encrypt(pt, req.GetAssociatedData(), now)
	if err != nil {
		return nil, toStatus(err)
	}
	// The record's key version is the one written; the one read is named too.
	audit.AddTarget(ctx, audit.Target{KeyVersion: dst.KeyID(), Resource: "source_key_id=" + strconv.FormatUint(uint64(src.KeyID()), 10)})
	return &kmsv1.RewrapResponse{Ciphertext: ct, SourceKeyId: src.KeyID(), KeyId: dst.KeyID()}, nil
}
