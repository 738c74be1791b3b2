package kms_test

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestBatchLimitReported: both batch responses carry the server's batch
// limit, and a batch over it is refused whole with INVALID_ARGUMENT whose
// message says the limit and whose details carry it machine-readably (an
// ErrorInfo and a BadRequest, as kms.proto documents).
func TestBatchLimitReported(t *testing.T) {
	for _, limit := range []int{0, 7} { // 0: the default
		t.Run(fmt.Sprint("MaxBatch=", limit), func(t *testing.T) {
			e := newEnv(t)
			s := e.start(kms1ID, "", func(c *kms.Config) { c.MaxBatch = limit })
			e.apply(s, e.bundle(e.ks))
			c := e.client(appID, s)
			want := limit
			if want == 0 {
				want = kms.DefaultMaxBatch
			}

			enc, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: []*kmsv1.EncryptItem{{Plaintext: []byte("dek")}}})
			if err != nil {
				t.Fatalf("EncryptBatch = %v", err)
			}
			if got := enc.GetMaxItems(); got != uint32(want) {
				t.Errorf("EncryptBatch max_items = %d, want %d", got, want)
			}
			dec, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger})
			if err != nil {
				t.Fatalf("DecryptBatch = %v", err)
			}
			if got := dec.GetMaxItems(); got != uint32(want) {
				t.Errorf("DecryptBatch max_items = %d, want %d", got, want)
			}

			over := want + 1
			encItems := make([]*kmsv1.EncryptItem, over)
			decItems := make([]*kmsv1.DecryptItem, over)
			for i := range encItems {
				encItems[i], decItems[i] = &kmsv1.EncryptItem{Plaintext: []byte("x")}, &kmsv1.DecryptItem{Ciphertext: []byte("x")}
			}
			for name, call := range map[string]func() error{
				"EncryptBatch": func() error {
					_, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: encItems})
					return err
				},
				"DecryptBatch": func() error {
					_, err := c.DecryptBatch(ctx(t), &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: decItems})
					return err
				},
			} {
				st := status.Convert(call())
				wantMsg := fmt.Sprintf("kms: invalid request: %d items, more than the limit of %d", over, want)
				if st.Code() != codes.InvalidArgument || st.Message() != wantMsg {
					t.Errorf("%s of %d items = %v %q, want InvalidArgument %q", name, over, st.Code(), st.Message(), wantMsg)
				}
				var info *errdetails.ErrorInfo
				var bad *errdetails.BadRequest
				for _, d := range st.Details() {
					switch d := d.(type) {
					case *errdetails.ErrorInfo:
						info = d
					case *errdetails.BadRequest:
						bad = d
					}
				}
				wantInfo := &errdetails.ErrorInfo{Reason: "BATCH_TOO_LARGE", Domain: "cairn.kms.v1",
					Metadata: map[string]string{"max_items": fmt.Sprint(want), "items": fmt.Sprint(over)}}
				if diff := cmp.Diff(wantInfo, info, protocmp.Transform()); diff != "" {
					t.Errorf("%s refusal ErrorInfo (-want +got):\n%s", name, diff)
				}
				wantBad := &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
					Field: "items", Reason: "BATCH_TOO_LARGE", Description: fmt.Sprintf("at most %d items per batch", want)}}}
				if diff := cmp.Diff(wantBad, bad, protocmp.Transform()); diff != "" {
					t.Errorf("%s refusal BadRequest (-want +got):\n%s", name, diff)
				}
			}
		})
	}
}

// TestBatchAcrossRotations: one DecryptBatch holds items under a retired
// version and the new primary, interleaved, plus items that fail (another
// keyset's ciphertext, wrong associated data); each item decrypts under its
// own version or fails with Decrypt's code and message, and the audit
// record names no single key version (the items used two). An EncryptBatch
// after the rotation seals every item under the new primary.
func TestBatchAcrossRotations(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	old := e.ks.Primary()
	ad := []byte("ad")
	oldCT := encrypt(t, c, ledger, []byte("old dek"), ad).GetCiphertext()

	// Rotate: ship the new version decrypt-only, then promote it.
	fresh := e.ks.AddVersion(t)
	other := kmstest.NewKeyset(t, "payments/other", kmstest.ACL("client/us-east/app"))
	e.apply(s, e.bundle(e.ks, other))
	e.ks.SetPrimary(t, fresh)
	e.apply(s, e.bundle(e.ks, other))
	freshCT := encrypt(t, c, ledger, []byte("new dek"), ad).GetCiphertext()
	otherCT := encrypt(t, c, "payments/other", []byte("dek"), ad).GetCiphertext()

	items := []*kmsv1.DecryptItem{
		{Ciphertext: oldCT, AssociatedData: ad},
		{Ciphertext: freshCT, AssociatedData: ad},
		{Ciphertext: otherCT, AssociatedData: ad},
		{Ciphertext: oldCT, AssociatedData: ad},
		{Ciphertext: freshCT, AssociatedData: []byte("wrong")},
		{Ciphertext: freshCT, AssociatedData: ad},
	}
	req := &kmsv1.DecryptBatchRequest{Keyset: ledger, Items: items}
	resp, err := c.DecryptBatch(ctx(t), req)
	if err != nil {
		t.Fatalf("DecryptBatch = %v", err)
	}
	if len(resp.GetResults()) != len(items) {
		t.Fatalf("DecryptBatch results = %d, want %d", len(resp.GetResults()), len(items))
	}
	for i, it := range items {
		r := resp.GetResults()[i]
		single, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: it.GetCiphertext(), AssociatedData: it.GetAssociatedData()})
		if err != nil {
			st := status.Convert(err)
			if r.GetError().GetCode() != uint32(st.Code()) || r.GetError().GetMessage() != st.Message() {
				t.Errorf("DecryptBatch item %d = %v, want Decrypt's %v %q", i, r, st.Code(), st.Message())
			}
			continue
		}
		if !bytes.Equal(r.GetOk().GetPlaintext(), single.GetPlaintext()) || r.GetOk().GetKeyId() != single.GetKeyId() {
			t.Errorf("DecryptBatch item %d = %v, want Decrypt's %q under %d", i, r, single.GetPlaintext(), single.GetKeyId())
		}
	}
	for i, want := range map[int]uint32{0: old, 1: fresh, 3: old, 5: fresh} {
		if got := resp.GetResults()[i].GetOk().GetKeyId(); got != want {
			t.Errorf("DecryptBatch item %d key_id = %d, want %d", i, got, want)
		}
	}
	if got := resp.GetResults()[2].GetError().GetCode(); got != uint32(codes.NotFound) {
		t.Errorf("DecryptBatch of another keyset's ciphertext = %v, want NotFound", resp.GetResults()[2])
	}
	var batchVersions []uint32
	for _, r := range readAudit(t, s) {
		if r.Operation == "/cairn.kms.v1.KMS/DecryptBatch" || r.Operation == "cairn.kms.v1.KMS/DecryptBatch" {
			batchVersions = append(batchVersions, r.Target.KeyVersion)
		}
	}
	if want := []uint32{0}; !cmp.Equal(batchVersions, want) {
		t.Errorf("DecryptBatch audit key versions = %v, want %v (two versions used: none named)", batchVersions, want)
	}

	enc, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: []*kmsv1.EncryptItem{
		{Plaintext: []byte("a")}, {Plaintext: []byte("b"), AssociatedData: ad}}})
	if err != nil {
		t.Fatalf("EncryptBatch = %v", err)
	}
	for i, r := range enc.GetResults() {
		ct := r.GetOk().GetCiphertext()
		if r.GetOk().GetKeyId() != fresh || len(ct) != 1+5+12+16 {
			t.Errorf("EncryptBatch item %d = %v, want a %d-byte ciphertext under the primary %d", i, r, 1+5+12+16, fresh)
		}
	}
	if got := decrypt(t, c, ledger, enc.GetResults()[1].GetOk().GetCiphertext(), ad); string(got.GetPlaintext()) != "b" {
		t.Errorf("Decrypt(EncryptBatch item 1) = %q, want %q", got.GetPlaintext(), "b")
	}
}
