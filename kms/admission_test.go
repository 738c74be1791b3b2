package kms_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// signed signs the next serial's bundle of kss, changed by edit.
func (e *env) signed(edit func(*bundlev1.Bundle), kss ...*kmstest.Keyset) *bundlev1.SignedBundle {
	e.t.Helper()
	e.serial++
	b := kmstest.Bundle(e.t, e.keys, region, e.serial, kss...)
	edit(b)
	return e.signer.Sign(e.t, b)
}

// quotaRecords returns the audit records of quota refusals of id.
func quotaRecords(t *testing.T, s *server, id string) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, r := range readAudit(t, s) {
		if r.Operation == "/cairn.kms.v1.KMS/*" && r.Identity == id {
			out = append(out, r)
		}
	}
	return out
}

// callRecords counts the per-call audit records of method by id.
func callRecords(t *testing.T, s *server, method, id string) int {
	t.Helper()
	n := 0
	for _, r := range readAudit(t, s) {
		if r.Operation == "/cairn.kms.v1.KMS/"+method && r.Identity == id {
			n++
		}
	}
	return n
}

// TestQuotaOverGRPC: a caller over its bundle quota gets RESOURCE_EXHAUSTED
// with a RetryInfo and the delay in the message, before any handler or
// per-call audit record; another caller is not affected; the refusals are
// audited once per window per caller, with their count.
func TestQuotaOverGRPC(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "", func(c *kms.Config) { c.QuotaAuditWindow = time.Hour })
	shared := kmstest.NewKeyset(t, "payments/shared", kmstest.ACL("client/us-east/*"))
	e.apply(s, e.signed(func(b *bundlev1.Bundle) {
		b.Quotas = []*bundlev1.Quota{{Pattern: "client/us-east/app", RequestsPerSecond: 1, Burst: 5}}
	}, shared))
	const calls = 20
	results := map[string]map[codes.Code]int{}
	for _, id := range []string{appID, otherID} {
		c := e.client(id, s)
		results[id] = map[codes.Code]int{}
		for range calls {
			_, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/shared", Plaintext: []byte("dek")})
			results[id][status.Code(err)]++
			if status.Code(err) != codes.ResourceExhausted {
				continue
			}
			st := status.Convert(err)
			var hint time.Duration
			for _, d := range st.Details() {
				if ri, ok := d.(*errdetails.RetryInfo); ok {
					hint = ri.GetRetryDelay().AsDuration()
				}
			}
			if hint <= 0 || hint > time.Second || !strings.Contains(st.Message(), fmt.Sprintf("retry after %v", hint)) {
				t.Errorf("refusal %q with RetryInfo %v: want a hint in (0, 1s] named in the message", st.Message(), hint)
			}
		}
	}
	t.Logf("20 calls each: over-quota caller %v, other caller %v", results[appID], results[otherID])
	// Burst 5 at 1/s: the calls take far less than a second.
	if ok, refused := results[appID][codes.OK], results[appID][codes.ResourceExhausted]; ok < 5 || ok > 6 || ok+refused != calls {
		t.Errorf("caller with a quota of burst 5: %v, want 5 (or 6) OK and the rest ResourceExhausted", results[appID])
	}
	if results[otherID][codes.OK] != calls {
		t.Errorf("caller without a quota of its own: %v, want all %d OK", results[otherID], calls)
	}
	// No refused call reached the audit interceptor.
	if n := callRecords(t, s, "Encrypt", appID); n != results[appID][codes.OK] {
		t.Errorf("Encrypt records of the over-quota caller = %d, want %d (its admitted calls only)", n, results[appID][codes.OK])
	}
	if recs := quotaRecords(t, s, appID); len(recs) != 0 {
		t.Errorf("quota records before the window ends = %+v, want none", recs)
	}
	s.Close() // ends the window
	recs := quotaRecords(t, s, appID)
	want := fmt.Sprintf("%d data-plane calls refused", results[appID][codes.ResourceExhausted])
	if len(recs) != 1 || recs[0].Outcome != audit.OutcomeDenied || recs[0].Code != "ResourceExhausted" || recs[0].Target.Region != region ||
		!strings.HasPrefix(recs[0].Reason, want) || !strings.Contains(recs[0].Reason, `quota "client/us-east/app": 1 requests/s, burst 5`) {
		t.Errorf("quota records = %+v, want one denied ResourceExhausted record beginning %q and naming the quota", recs, want)
	}
	if recs := quotaRecords(t, s, otherID); len(recs) != 0 {
		t.Errorf("quota records of the other caller = %+v, want none", recs)
	}
}

// TestDataMessageLimit: a data-plane request over MaxDataMsgSize (4 MiB by
// default) is refused with RESOURCE_EXHAUSTED naming the limit and without
// a retry hint (as gRPC refuses a request over its receive limit) before
// any handler runs (no audit record of the call, no request counted),
// while ApplyBundle takes bundles larger than that.
func TestDataMessageLimit(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		e := newEnv(t)
		s := e.start(kms1ID, "")
		e.apply(s, e.bundle(e.ks))
		c := e.client(appID, s)
		big := make([]byte, kms.DefaultMaxDataMsgSize+1)
		big[0] = 1
		_, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: big}, grpc.MaxCallSendMsgSize(64<<20))
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "more than the data plane's limit of 4194304 bytes") {
			t.Fatalf("Decrypt of %d bytes = %v, want ResourceExhausted naming the limit", len(big), err)
		}
		for _, d := range status.Convert(err).Details() {
			if _, ok := d.(*errdetails.RetryInfo); ok {
				t.Errorf("Decrypt of %d bytes refused with a retry hint %v, want none (the same request would be refused again)", len(big), d)
			}
		}
		if n := callRecords(t, s, "Decrypt", appID); n != 0 {
			t.Errorf("Decrypt audit records = %d, want 0: no handler, no interceptor ran", n)
		}
		if st := s.status(t).GetStats(); st.GetRequests() != 0 {
			t.Errorf("data-plane requests counted = %d, want 0: no handler ran", st.GetRequests())
		}
		// A request just under the limit reaches the handler (and fails
		// there, as a ciphertext).
		_, err = c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: big[:64<<10]})
		if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "holds no key version 0") {
			t.Errorf("Decrypt of 64 KiB = %v, want the handler's NotFound (it names key version 0)", err)
		}
		s.Close()
		if recs := quotaRecords(t, s, appID); len(recs) != 1 || !strings.Contains(recs[0].Reason, "message_size 1") {
			t.Errorf("refusal records = %+v, want one counting message_size 1", recs)
		}
	})
	t.Run("ApplyBundle past the data plane's limit", func(t *testing.T) {
		const limit = 32 << 10
		e := newEnv(t)
		s := e.start(kms1ID, "", func(c *kms.Config) { c.MaxDataMsgSize, c.MaxPayload = limit, 4<<10 })
		var kss []*kmstest.Keyset
		for i := range 200 {
			kss = append(kss, kmstest.NewKeyset(t, fmt.Sprintf("team%03d/keyset", i), kmstest.ACL("client/us-east/app")))
		}
		sb := e.bundle(kss...)
		if n := proto.Size(&kmsv1.ApplyBundleRequest{Bundle: sb}); n <= 2*limit {
			t.Fatalf("bundle of %d bytes, want more than %d for the test", n, 2*limit)
		}
		e.apply(s, sb)
		if st := s.status(t); st.GetKeysetCount() != 200 {
			t.Errorf("keysets served = %d, want 200", st.GetKeysetCount())
		}
		_, err := e.client(appID, s).EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: "team000/keyset",
			Items: []*kmsv1.EncryptItem{{Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)},
				{Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)},
				{Plaintext: make([]byte, 4<<10)}, {Plaintext: make([]byte, 4<<10)}}})
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), fmt.Sprintf("data plane's limit of %d bytes", limit)) {
			t.Errorf("EncryptBatch of 36 KiB = %v, want ResourceExhausted naming the data plane's limit", err)
		}
	})
}

// wireCodec sends and receives a call's encoded message as it is, so that
// a test can send what no generated client would.
type wireCodec struct{}

func (wireCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (wireCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
func (wireCodec) Name() string { return "proto" }

// emptyElements is a request of n empty elements of the repeated message
// field num: two bytes each, the most elements a request of its size holds.
func emptyElements(num protowire.Number, n int) []byte {
	b := make([]byte, 0, 2*n)
	for range n {
		b = protowire.AppendTag(b, num, protowire.BytesType)
		b = protowire.AppendVarint(b, 0)
	}
	return b
}

// TestOverLimitBatchesRefusedUndecoded: a batch of more items than
// MaxBatch (EncryptBatch, DecryptBatch) is refused with the handler's
// INVALID_ARGUMENT and its details, a Probe of more probes with the
// handler's refusal, before the request is decoded: a request of 4 MiB of
// empty items (two million of them), from a caller on no ACL, costs the
// process (client and server) no more than a few times its size, not the
// ~48 times decoding it took. The data-plane refusals are those of the gate: no handler, no
// per-call audit record, counted against the caller (batch_items) and
// audited once per window. A Probe's refusal still comes after the access
// policy, audited as every Probe. A batch of MaxBatch items is served.
func TestOverLimitBatchesRefusedUndecoded(t *testing.T) {
	const limit = 10
	e := newEnv(t)
	s := e.start(kms1ID, "", func(c *kms.Config) { c.MaxBatch, c.QuotaAuditWindow = limit, time.Hour })
	e.apply(s, e.bundle(e.ks))
	invoke := func(id, method string, req []byte) error {
		var resp []byte
		cc := e.conn(id, s.addr, grpc.WithDefaultCallOptions(grpc.ForceCodecV2(wireCodec{}), grpc.MaxCallSendMsgSize(64<<20)))
		return cc.Invoke(ctx(t), method, &req, &resp)
	}
	over := emptyElements(2, limit+1)
	for _, method := range []string{"EncryptBatch", "DecryptBatch"} {
		st := status.Convert(invoke(appID, "/cairn.kms.v1.KMS/"+method, over))
		want := "kms: invalid request: 11 items, more than the limit of 10"
		if st.Code() != codes.InvalidArgument || st.Message() != want {
			t.Errorf("%s of %d empty items = %v %q, want InvalidArgument %q", method, limit+1, st.Code(), st.Message(), want)
		}
		var info *errdetails.ErrorInfo
		for _, d := range st.Details() {
			if d, ok := d.(*errdetails.ErrorInfo); ok {
				info = d
			}
		}
		if info.GetReason() != "BATCH_TOO_LARGE" || info.GetMetadata()["items"] != "11" || info.GetMetadata()["max_items"] != "10" {
			t.Errorf("%s of %d empty items: ErrorInfo %v, want BATCH_TOO_LARGE with items 11 and max_items 10", method, limit+1, info)
		}
	}

	big := emptyElements(2, kms.DefaultMaxDataMsgSize/2)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err := invoke(otherID, "/cairn.kms.v1.KMS/DecryptBatch", big)
	runtime.ReadMemStats(&after)
	if want := fmt.Sprintf("kms: invalid request: %d items, more than the limit of 10", len(big)/2); status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != want {
		t.Errorf("DecryptBatch of %d empty items from a caller on no ACL = %v, want InvalidArgument %q", len(big)/2, err, want)
	}
	// The request's bytes, sent and received (and copied by gRPC on either
	// side), and no more.
	if n := after.TotalAlloc - before.TotalAlloc; n > 4*uint64(len(big)) {
		t.Errorf("DecryptBatch of a %d-byte request of empty items: the process allocated %d MiB during the call, want at most %d MiB",
			len(big), n>>20, 4*len(big)>>20)
	}

	items := make([]*kmsv1.EncryptItem, limit)
	for i := range items {
		items[i] = &kmsv1.EncryptItem{Plaintext: []byte("dek")}
	}
	if resp, err := e.client(appID, s).EncryptBatch(ctx(t), &kmsv1.EncryptBatchRequest{Keyset: ledger, Items: items}); err != nil || len(resp.GetResults()) != limit {
		t.Errorf("EncryptBatch of %d items = %d results, %v; want %d results", limit, len(resp.GetResults()), err, limit)
	}

	probes := emptyElements(1, limit+1)
	if err := invoke(appID, "/cairn.kms.v1.KMSAdmin/Probe", probes); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Probe of %d probes by a client = %v, want PermissionDenied (no admin)", limit+1, err)
	}
	want := "kms: invalid request: 11 probes, more than the limit of 10"
	if st := status.Convert(invoke(adminID, "/cairn.kms.v1.KMSAdmin/Probe", probes)); st.Code() != codes.InvalidArgument || st.Message() != want {
		t.Errorf("Probe of %d probes by an admin = %v %q, want InvalidArgument %q", limit+1, st.Code(), st.Message(), want)
	}
	huge := emptyElements(1, kms.DefaultMaxDataMsgSize/2+1)
	if err := invoke(adminID, "/cairn.kms.v1.KMSAdmin/Probe", huge); status.Code(err) != codes.ResourceExhausted ||
		!strings.Contains(err.Error(), "the Probe request is 4194306 bytes, more than the data plane's limit of 4194304 bytes") {
		t.Errorf("Probe of %d bytes = %v, want ResourceExhausted naming the data plane's limit", len(huge), err)
	}

	s.Close() // ends the window
	refusedRecords, probeRecords := 0, 0
	for _, r := range readAudit(t, s) {
		switch {
		case strings.HasPrefix(r.Operation, "/cairn.kms.v1.KMS/") && r.Code == codes.InvalidArgument.String():
			refusedRecords++
		case r.Operation == "/cairn.kms.v1.KMSAdmin/Probe":
			probeRecords++
		}
	}
	if refusedRecords != 0 {
		t.Errorf("audit records of the refused batches = %d, want 0: no handler, no interceptor ran", refusedRecords)
	}
	if probeRecords != 3 {
		t.Errorf("Probe audit records = %d, want 3 (every Probe, refused or not)", probeRecords)
	}
	if recs := quotaRecords(t, s, appID); len(recs) != 1 || !strings.Contains(recs[0].Reason, "batch_items 2") {
		t.Errorf("the client's refusal records = %+v, want one counting batch_items 2", recs)
	}
	if recs := quotaRecords(t, s, otherID); len(recs) != 1 || !strings.Contains(recs[0].Reason, "batch_items 1") {
		t.Errorf("the intruder's refusal records = %+v, want one counting batch_items 1", recs)
	}
}

// TestWithheldRequestsHoldNoSlot: calls whose client opens them and never
// sends the request take no admission slot: with more such calls open than
// the server admits at once (MaxInFlight) and than the caller's quota
// allows, the same caller and another are still served at once.
func TestWithheldRequestsHoldNoSlot(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "", func(c *kms.Config) { c.MaxInFlight = 8 })
	shared := kmstest.NewKeyset(t, "payments/shared", kmstest.ACL("client/us-east/*"))
	e.apply(s, e.signed(func(*bundlev1.Bundle) {}, shared))
	cc := e.conn(appID, s.addr)
	held, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range 3 * 8 {
		st, err := cc.NewStream(held, &grpc.StreamDesc{ClientStreams: true}, "/cairn.kms.v1.KMS/Decrypt")
		if err != nil {
			t.Fatalf("opening withheld call %d: %v", i, err)
		}
		_ = st // never sent to: the server waits for its request
	}
	for _, id := range []string{appID, otherID} {
		c := e.client(id, s)
		for i := range 10 {
			if _, err := c.Encrypt(ctx(t), &kmsv1.EncryptRequest{Keyset: "payments/shared", Plaintext: []byte("dek")}); err != nil {
				t.Fatalf("Encrypt %d by %s with 24 withheld calls open = %v, want success", i, id, err)
			}
		}
	}
}
