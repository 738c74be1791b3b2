package kms_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// withCount is a lifecycle entry with a recorded fleet encrypt count.
func withCount(l *bundlev1.VersionLifecycle, n uint64) *bundlev1.VersionLifecycle {
	l.EncryptCount = n
	return l
}

// budgetRefusal checks err is the message-budget refusal of version id.
func budgetRefusal(t *testing.T, call string, err error, id uint32) {
	t.Helper()
	want := fmt.Sprintf(`keyset "payments/ledger" version %d reached its AES-GCM message budget (limit 5 encryptions)`, id)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), want) ||
		!strings.Contains(status.Convert(err).Message(), "regionctl keyset rotate payments/ledger") {
		t.Errorf("%s = %v, want FailedPrecondition %q and the rotate command", call, err, want)
	}
}

// TestMessageBudget: with a limit of 5 and a recorded count of 2, the
// server makes 3 encryptions (by any operation) with the primary, then
// refuses every encrypting operation while the version still decrypts; a
// bundle promoting the next version restores encryption.
func TestMessageBudget(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	c := e.client(appID, s)
	first := e.ks.Primary()
	e.ks.EncryptLimit = 5
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{withCount(lifecycle(first, t0.Add(-day), t0.Add(-day), time.Time{}), 2)}
	e.apply(s, e.bundle(e.ks))

	ad := []byte("ad")
	ct1 := encrypt(t, c, ledger, []byte("dek-1"), ad).GetCiphertext()
	gdk, err := c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger, AssociatedData: ad})
	if err != nil {
		t.Fatalf("GenerateDataKey (2nd encryption) = %v", err)
	}
	rw, err := c.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: ct1, AssociatedData: ad})
	if err != nil {
		t.Fatalf("Rewrap (3rd encryption) = %v", err)
	}

	// The budget is spent: every encrypting operation is refused.
	_, err = c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("dek-4"), AssociatedData: ad})
	budgetRefusal(t, "Encrypt (4th)", err, first)
	_, err = c.GenerateDataKey(ctx(t), &kmsv1.GenerateDataKeyRequest{Keyset: ledger})
	budgetRefusal(t, "GenerateDataKey", err, first)
	_, err = c.Rewrap(ctx(t), &kmsv1.RewrapRequest{Keyset: ledger, Ciphertext: ct1, AssociatedData: ad})
	budgetRefusal(t, "Rewrap", err, first)
	batch, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: []*kmsv1.EncryptItem{{Plaintext: []byte("a")}, {Plaintext: []byte("b")}}})
	if err != nil {
		t.Fatalf("EncryptBatch = %v", err)
	}
	for i, r := range batch.GetResults() {
		if codes.Code(r.GetError().GetCode()) != codes.FailedPrecondition || !strings.Contains(r.GetError().GetMessage(), "message budget") {
			t.Errorf("EncryptBatch item %d = %v, want FailedPrecondition (message budget)", i, r)
		}
	}
	if got := versionUsage(t, s, ledger, first).GetEncryptCount(); got != 3 {
		t.Errorf("encrypt_count after refusals = %d, want 3", got)
	}

	// Everything made so far still decrypts.
	for name, ct := range map[string][]byte{"Encrypt": ct1, "GenerateDataKey": gdk.GetWrappedKey(), "Rewrap": rw.GetCiphertext()} {
		if _, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct, AssociatedData: ad}); err != nil {
			t.Errorf("Decrypt(%s's ciphertext) = %v, want success", name, err)
		}
	}

	// Rotate: the next version served decrypt-only first (still refused),
	// then promoted.
	second := e.ks.AddVersion(t)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{withCount(lifecycle(first, t0.Add(-day), t0.Add(-day), time.Time{}), 3), lifecycle(second, time.Time{}, time.Time{}, time.Time{})}
	e.apply(s, e.bundle(e.ks))
	_, err = c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: ledger, Plaintext: []byte("x")})
	budgetRefusal(t, "Encrypt with the next version decrypt-only", err, first)

	s.clock.Advance(time.Hour)
	now := s.clock.Now()
	e.ks.SetPrimary(t, second)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{withCount(lifecycle(first, t0.Add(-day), t0.Add(-day), now), 3), lifecycle(second, now.Add(-time.Hour), now, time.Time{})}
	e.apply(s, e.bundle(e.ks))
	got := encrypt(t, c, ledger, []byte("dek-5"), ad)
	if got.GetKeyId() != second {
		t.Errorf("Encrypt after the promotion: key_id %d, want %d", got.GetKeyId(), second)
	}
	if pt := decrypt(t, c, ledger, ct1, ad).GetPlaintext(); string(pt) != "dek-1" {
		t.Errorf("Decrypt(first version's ciphertext) after the rotation = %q, want dek-1", pt)
	}
}

// TestMessageBudgetBatch: a batch spends one encryption per item; the items
// past the budget are refused, the others succeed.
func TestMessageBudgetBatch(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	c := e.client(appID, s)
	first := e.ks.Primary()
	e.ks.EncryptLimit = 5
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{withCount(lifecycle(first, t0.Add(-day), t0.Add(-day), time.Time{}), 2)}
	e.apply(s, e.bundle(e.ks))

	items := make([]*kmsv1.EncryptItem, 5)
	for i := range items {
		items[i] = &kmsv1.EncryptItem{Plaintext: []byte{byte(i)}}
	}
	r, err := c.EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: items})
	if err != nil {
		t.Fatalf("EncryptBatch = %v", err)
	}
	want := []codes.Code{codes.OK, codes.OK, codes.OK, codes.FailedPrecondition, codes.FailedPrecondition}
	for i, res := range r.GetResults() {
		if got := codes.Code(res.GetError().GetCode()); got != want[i] || (got == codes.OK) != (res.GetOk() != nil) {
			t.Errorf("EncryptBatch item %d = %v, want %v", i, res, want[i])
		}
	}
	if got := versionUsage(t, s, ledger, first).GetEncryptCount(); got != 3 {
		t.Errorf("encrypt_count after the batch = %d, want 3", got)
	}
}
