package kms_test

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestStatusStats: GetStatus counts the data-plane calls the server
// answered, OK and refused (a caller the ACL refuses counts as an error),
// and their latency as a cumulative histogram ending in +Inf; admin calls
// (ApplyBundle, GetStatus, Probe) are not counted.
func TestStatusStats(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	if st := s.status(t).GetStats(); st.GetRequests() != 0 || st.GetErrors() != 0 {
		t.Fatalf("stats before any call = %v, want 0 requests and 0 errors", st)
	}
	e.apply(s, e.bundle(e.ks))
	app, intruder := e.client(appID, s), e.client(otherID, s)
	ct := encrypt(t, app, ledger, []byte("dek"), nil).GetCiphertext()
	decrypt(t, app, ledger, ct, nil)
	if _, err := app.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, Template: "AES256_GCM"}); err != nil {
		t.Fatalf("GenerateDataKey = %v", err)
	}
	// Refused: an identity outside the ACL, an unknown keyset, a bad ciphertext.
	if _, err := intruder.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("x")}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Encrypt as %s = %v, want PermissionDenied", otherID, err)
	}
	if _, err := app.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/none", Plaintext: []byte("x")}); err == nil {
		t.Fatal("Encrypt with an unknown keyset succeeded")
	}
	if _, err := app.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: []byte("garbage")}); err == nil {
		t.Fatal("Decrypt of garbage succeeded")
	}
	s.status(t) // admin calls are not counted

	st := s.status(t).GetStats()
	if st.GetRequests() != 6 || st.GetErrors() != 3 {
		t.Errorf("stats = %d requests, %d errors; want 6, 3", st.GetRequests(), st.GetErrors())
	}
	lat := st.GetLatency()
	if len(lat) < 2 {
		t.Fatalf("latency = %v, want finite buckets and +Inf", lat)
	}
	last := lat[len(lat)-1]
	if !last.GetInfinite() || last.GetLeSeconds() != 0 || last.GetCount() != 6 {
		t.Errorf("last latency bucket = %v, want +Inf (le 0, infinite) with count 6", last)
	}
	for i, b := range lat[:len(lat)-1] {
		if b.GetInfinite() || b.GetLeSeconds() <= 0 {
			t.Errorf("latency bucket %d = %v, want a finite positive bound", i, b)
		}
		if i > 0 && (b.GetLeSeconds() <= lat[i-1].GetLeSeconds() || b.GetCount() < lat[i-1].GetCount()) {
			t.Errorf("latency buckets %d, %d = %v, %v: want rising bounds and cumulative counts", i-1, i, lat[i-1], b)
		}
		if b.GetCount() > last.GetCount() {
			t.Errorf("latency bucket %d count %d above the total %d", i, b.GetCount(), last.GetCount())
		}
	}
}
