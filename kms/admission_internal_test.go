package kms

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

var (
	noisy = identity.MustParse("spiffe://cairn.test/client/us-east/noisy")
	quiet = identity.MustParse("spiffe://cairn.test/client/us-east/quiet")
)

// testAdmission is an admission with a settable clock.
func testAdmission(t *testing.T, maxInFlight int, def Quota, b *bundlev1.Bundle) (*admission, *time.Duration) {
	t.Helper()
	var shed [numShed]counter
	m, err := newMetrics(nil, 1)
	if err != nil {
		t.Fatal(err)
	}
	shed = m.shed
	a := newAdmission(maxInFlight, def, &shed)
	now := new(time.Duration)
	a.clock = func() time.Duration { return *now }
	qs, err := newQuotaSet(b, def)
	if err != nil {
		t.Fatal(err)
	}
	a.setQuotas(qs)
	return a, now
}

func quotaBundle(quotas ...*bundlev1.Quota) *bundlev1.Bundle {
	return &bundlev1.Bundle{CreatedBy: kmstest.CreatedBy, Quotas: quotas}
}

// retryOf returns the RetryInfo delay of a refusal.
func retryOf(t *testing.T, err error) time.Duration {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("refusal %v, want ResourceExhausted", err)
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.GetRetryDelay().AsDuration()
		}
	}
	t.Fatalf("refusal %v has no RetryInfo", err)
	return 0
}

// TestAdmissionRate: a token bucket per caller; a refusal names the wait
// until the next token, as a RetryInfo and in the message; other callers
// are not affected.
func TestAdmissionRate(t *testing.T) {
	a, now := testAdmission(t, 100, Quota{}, quotaBundle(&bundlev1.Quota{Pattern: "client/us-east/noisy", RequestsPerSecond: 10, Burst: 3}))
	admit := func(id identity.ID) error {
		c, err := a.admit(id)
		if err == nil {
			a.release(c)
		}
		return err
	}
	for i := range 3 {
		if err := admit(noisy); err != nil {
			t.Fatalf("call %d of the burst = %v, want admitted", i, err)
		}
	}
	err := admit(noisy)
	if d := retryOf(t, err); d != 100*time.Millisecond {
		t.Errorf("retry hint after the burst = %v, want 100ms (one token at 10/s)", d)
	}
	if msg := status.Convert(err).Message(); msg != `kms: spiffe://cairn.test/client/us-east/noisy is over its quota "client/us-east/noisy": 10 requests/s, burst 3 on this server (over its rate); retry after 100ms` {
		t.Errorf("refusal message = %q", msg)
	}
	for i := range 50 {
		if err := admit(quiet); err != nil {
			t.Fatalf("quiet call %d = %v, want admitted (no quota matches it; the default sets no limit)", i, err)
		}
	}
	*now += 100 * time.Millisecond
	if err := admit(noisy); err != nil {
		t.Errorf("call a token later = %v, want admitted", err)
	}
	if err := admit(noisy); err == nil {
		t.Errorf("second call a token later admitted, want refused")
	}
	got := a.take(0)
	if len(got) != 1 || got[0].id != noisy.String() || got[0].counts[shedRate] != 2 {
		t.Errorf("take() = %+v, want one record of 2 rate refusals of %s", got, noisy)
	}
	if got := a.take(0); len(got) != 0 {
		t.Errorf("second take() = %+v, want nothing (counts are taken once)", got)
	}
}

// TestAdmissionConcurrencyAndOverload: a caller's calls in progress are
// capped by its quota, every caller's by MaxInFlight; a call shed by the
// server's cap gives its token back.
func TestAdmissionConcurrencyAndOverload(t *testing.T) {
	a, _ := testAdmission(t, 3, Quota{}, quotaBundle(&bundlev1.Quota{Pattern: "client/us-east/noisy", RequestsPerSecond: 1, Burst: 2, MaxConcurrent: 2}))
	n1, err := a.admit(noisy)
	if err != nil {
		t.Fatal(err)
	}
	n2, err := a.admit(noisy)
	if err != nil {
		t.Fatal(err)
	}
	// Its third at once: over its concurrency (and out of tokens).
	if _, err := a.admit(noisy); retryOf(t, err) != busyRetry {
		t.Errorf("third concurrent call = %v, want refused with the busy hint", err)
	}
	a.release(n1)
	a.release(n2)
	q1, err := a.admit(quiet)
	if err != nil {
		t.Fatal(err)
	}
	q2, _ := a.admit(quiet)
	q3, _ := a.admit(quiet)
	if _, err := a.admit(quiet); err == nil || !strings.Contains(status.Convert(err).Message(), "server overloaded") || retryOf(t, err) != busyRetry {
		t.Errorf("fourth call with MaxInFlight 3 = %v, want shed as overload with the busy hint", err)
	}
	for _, c := range []*caller{q1, q2, q3} {
		a.release(c)
	}
	if n := a.inflight.Load(); n != 0 {
		t.Errorf("in flight after every release = %d, want 0", n)
	}
	got := a.take(0)
	counts := map[string][numShed]uint64{}
	for _, r := range got {
		counts[r.id] = r.counts
	}
	if c := counts[noisy.String()]; c[shedConcurrency] != 1 {
		t.Errorf("noisy refusals = %v, want 1 over concurrency", c)
	}
	if c := counts[quiet.String()]; c[shedOverload] != 1 {
		t.Errorf("quiet refusals = %v, want 1 shed by overload", c)
	}
}

// TestAdmissionQuotaChanges: a swap to the same quotas keeps every
// caller's bucket; other quotas start afresh; idle callers leave the table.
func TestAdmissionQuotaChanges(t *testing.T) {
	q := &bundlev1.Quota{Pattern: "client/*/*", RequestsPerSecond: 1, Burst: 1}
	a, now := testAdmission(t, 100, Quota{}, quotaBundle(q))
	if _, err := a.admit(noisy); err != nil {
		t.Fatal(err)
	}
	same, _ := newQuotaSet(quotaBundle(q), Quota{})
	a.setQuotas(same)
	if _, err := a.admit(noisy); err == nil {
		t.Errorf("after a swap to the same quotas: admitted, want refused (the bucket is kept)")
	}
	other, _ := newQuotaSet(quotaBundle(&bundlev1.Quota{Pattern: "client/*/*", RequestsPerSecond: 2, Burst: 1}), Quota{})
	a.setQuotas(other)
	c, err := a.admit(noisy)
	if err != nil {
		t.Errorf("after a swap to other quotas: %v, want admitted (a new bucket)", err)
	} else {
		a.release(c)
	}
	if got := a.take(0); len(got) != 1 || got[0].counts[shedRate] != 1 {
		t.Errorf("take() = %+v, want the refusal under the old quotas", got)
	}
	*now += time.Hour
	a.take(int64(*now))
	if n := len(a.table.Load().callers); n != 0 {
		t.Errorf("callers after an idle hour = %d, want 0", n)
	}
}

// TestAdmissionAllocations: admitting a known caller allocates nothing.
func TestAdmissionAllocations(t *testing.T) {
	a, _ := testAdmission(t, 100, Quota{RequestsPerSecond: 1 << 30, MaxConcurrent: 10}, nil)
	if n := testing.AllocsPerRun(1000, func() {
		c, err := a.admit(quiet)
		if err != nil {
			t.Fatal(err)
		}
		a.release(c)
	}); n != 0 {
		t.Errorf("admit + release allocs = %v, want 0", n)
	}
	// The codec's check of a data-plane request within the limits, which
	// every call's request goes through.
	req := &kmsv1.DecryptBatchRequest{Keyset: "payments/ledger", Items: []*kmsv1.DecryptItem{{Ciphertext: make([]byte, 64), AssociatedData: []byte("ad")}}}
	b, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	codec := newBatchCodec(DefaultMaxDataMsgSize, DefaultMaxBatch).(batchCodec)
	data := mem.BufferSlice{mem.SliceBuffer(b)}
	if n := testing.AllocsPerRun(1000, func() {
		r := dataRequest{method: "DecryptBatch", msg: req}
		if err := codec.check(data, &r); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("data-plane limits check allocs = %v, want 0", n)
	}
}

func TestQuotaSet(t *testing.T) {
	b := quotaBundle(
		&bundlev1.Quota{Pattern: "client/us-east/noisy", RequestsPerSecond: 5},
		&bundlev1.Quota{Pattern: "client/*/*", MaxConcurrent: 7},
	)
	b.CreatedAt = timestamppb.Now()
	qs, err := newQuotaSet(b, Quota{RequestsPerSecond: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		id   identity.ID
		want string
	}{
		{noisy, `quota "client/us-east/noisy": 5 requests/s, burst 5`},
		{quiet, `quota "client/*/*": 7 calls at once`},
		{identity.MustParse("spiffe://cairn.test/regionctl/global/x"), "quota default (server): 1 requests/s, burst 1"},
	} {
		if got := qs.ruleFor(tt.id).desc; got != tt.want {
			t.Errorf("ruleFor(%s) = %q, want %q", tt.id, got, tt.want)
		}
	}
	b.DefaultQuota = &bundlev1.Quota{MaxConcurrent: 3}
	qs, _ = newQuotaSet(b, Quota{RequestsPerSecond: 1})
	if got := qs.ruleFor(identity.MustParse("spiffe://cairn.test/regionctl/global/x")).desc; got != "quota default (bundle): 3 calls at once" {
		t.Errorf("ruleFor(unmatched) with a bundle default = %q", got)
	}
}
