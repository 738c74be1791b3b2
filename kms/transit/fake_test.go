package transit_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"testing"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/key"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/transit"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// fakeKeyset is the one keyset the fake backend serves.
const fakeKeyset = "payments/ledger"

// internalAD is associated data on which the fake fails an item with
// Internal, for the batch status tests.
const internalAD = "fail-internally"

// fake is a Backend over a real Tink AEAD keyset (TINK prefix), holding one
// keyset, fakeKeyset, that every caller may use. It records what it was
// asked, sets the Call's request ID as the KMS does, and returns the error
// set for a method instead of answering.
type fake struct {
	a       tink.AEAD
	primary uint32
	params  key.Parameters

	mu       sync.Mutex
	ready    bool
	errs     map[string]error // by method name
	calls    []string         // method names, in order
	keysets  []string         // the keyset of each call
	ads      [][]byte         // the associated data of each item or call
	versions []uint32         // the version of each encrypting call
	n        int
}

func newFake(t *testing.T) *fake {
	t.Helper()
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		t.Fatal(err)
	}
	a, err := aead.New(h)
	if err != nil {
		t.Fatal(err)
	}
	e, err := h.Primary()
	if err != nil {
		t.Fatal(err)
	}
	return &fake{a: a, primary: e.KeyID(), params: e.Key().Parameters(), ready: true, errs: map[string]error{}}
}

func (f *fake) fail(method string, c codes.Code, msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs[method] = status.Error(c, msg)
}

// begin records a call and returns its set error.
func (f *fake) begin(ctx context.Context, method, ks string, version uint32, ads ...[]byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	if c := transit.CallFrom(ctx); c != nil {
		c.SetRequestID(fmt.Sprintf("audited-%d", f.n))
	}
	f.calls = append(f.calls, method)
	f.keysets = append(f.keysets, ks)
	f.ads = append(f.ads, ads...)
	f.versions = append(f.versions, version)
	if err := f.errs[method]; err != nil {
		return err
	}
	if ks != fakeKeyset {
		return status.Errorf(codes.NotFound, "kms: no such keyset %q in region us-east", ks)
	}
	if version != 0 && version != f.primary {
		return status.Errorf(codes.InvalidArgument, "kms: invalid request: key_version %d: not the primary", version)
	}
	return nil
}

func (f *fake) record() (calls, keysets []string, ads [][]byte, versions []uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls, f.keysets, f.ads, f.versions
}

func (f *fake) Encrypt(ctx context.Context, version uint32, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	if err := f.begin(ctx, "Encrypt", req.GetKeyset(), version, req.GetAssociatedData()); err != nil {
		return nil, err
	}
	ct, err := f.a.Encrypt(req.GetPlaintext(), req.GetAssociatedData())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &kmsv1.EncryptResponse{Ciphertext: ct, KeyId: f.primary}, nil
}

func (f *fake) EncryptBatch(ctx context.Context, version uint32, req *kmsv1.EncryptBatchRequest) (*kmsv1.EncryptBatchResponse, error) {
	var ads [][]byte
	for _, it := range req.GetItems() {
		ads = append(ads, it.GetAssociatedData())
	}
	if err := f.begin(ctx, "EncryptBatch", req.GetKeyset(), version, ads...); err != nil {
		return nil, err
	}
	out := &kmsv1.EncryptBatchResponse{}
	for _, it := range req.GetItems() {
		if string(it.GetAssociatedData()) == internalAD {
			out.Results = append(out.Results, &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Error{Error: &kmsv1.ItemError{Code: uint32(codes.Internal), Message: "kms: encryption failed"}}})
			continue
		}
		ct, err := f.a.Encrypt(it.GetPlaintext(), it.GetAssociatedData())
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		out.Results = append(out.Results, &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Ok{Ok: &kmsv1.EncryptResponse{Ciphertext: ct, KeyId: f.primary}}})
	}
	return out, nil
}

func (f *fake) open(ct, ad []byte) ([]byte, error) {
	if string(ad) == internalAD {
		return nil, status.Error(codes.Internal, "kms: internal")
	}
	pt, err := f.a.Decrypt(ct, ad)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "kms: ciphertext does not decrypt")
	}
	return pt, nil
}

func (f *fake) Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	if err := f.begin(ctx, "Decrypt", req.GetKeyset(), 0, req.GetAssociatedData()); err != nil {
		return nil, err
	}
	pt, err := f.open(req.GetCiphertext(), req.GetAssociatedData())
	if err != nil {
		return nil, err
	}
	id, _ := keystore.KeyIDOf(req.GetCiphertext())
	return &kmsv1.DecryptResponse{Plaintext: pt, KeyId: id}, nil
}

func (f *fake) DecryptBatch(ctx context.Context, req *kmsv1.DecryptBatchRequest) (*kmsv1.DecryptBatchResponse, error) {
	var ads [][]byte
	for _, it := range req.GetItems() {
		ads = append(ads, it.GetAssociatedData())
	}
	if err := f.begin(ctx, "DecryptBatch", req.GetKeyset(), 0, ads...); err != nil {
		return nil, err
	}
	out := &kmsv1.DecryptBatchResponse{}
	for _, it := range req.GetItems() {
		pt, err := f.open(it.GetCiphertext(), it.GetAssociatedData())
		if err != nil {
			st := status.Convert(err)
			out.Results = append(out.Results, &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Error{Error: &kmsv1.ItemError{Code: uint32(st.Code()), Message: st.Message()}}})
			continue
		}
		out.Results = append(out.Results, &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Ok{Ok: &kmsv1.DecryptResponse{Plaintext: pt, KeyId: f.primary}}})
	}
	return out, nil
}

func (f *fake) Rewrap(ctx context.Context, version uint32, req *kmsv1.RewrapRequest) (*kmsv1.RewrapResponse, error) {
	if err := f.begin(ctx, "Rewrap", req.GetKeyset(), version, req.GetAssociatedData()); err != nil {
		return nil, err
	}
	pt, err := f.open(req.GetCiphertext(), req.GetAssociatedData())
	if err != nil {
		return nil, err
	}
	ct, err := f.a.Encrypt(pt, req.GetAssociatedData())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &kmsv1.RewrapResponse{Ciphertext: ct, SourceKeyId: f.primary, KeyId: f.primary}, nil
}

func (f *fake) GenerateDataKey(ctx context.Context, version uint32, req *kmsv1.GenerateDataKeyRequest) (*kmsv1.GenerateDataKeyResponse, error) {
	if err := f.begin(ctx, "GenerateDataKey", req.GetKeyset(), version, req.GetAssociatedData()); err != nil {
		return nil, err
	}
	if req.GetFormat() != kmsv1.DataKeyFormat_DATA_KEY_FORMAT_RAW {
		return nil, status.Error(codes.InvalidArgument, "want RAW")
	}
	n := map[string]int{"AES128_GCM": 16, "AES256_GCM": 32}[req.GetTemplate()]
	if n == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "template %q", req.GetTemplate())
	}
	dk := make([]byte, n)
	_, _ = rand.Read(dk)
	ct, err := f.a.Encrypt(dk, req.GetAssociatedData())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &kmsv1.GenerateDataKeyResponse{PlaintextKey: dk, WrappedKey: ct, KeyId: f.primary}, nil
}

func (f *fake) ReadKey(ctx context.Context, name string) (*transit.Key, error) {
	if err := f.begin(ctx, "ReadKey", name, 0); err != nil {
		return nil, err
	}
	return &transit.Key{Name: name, Primary: f.primary, Versions: []transit.KeyVersion{{ID: f.primary, Parameters: f.params}}}, nil
}

func (f *fake) Ready() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ready
}
