package kms_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

func TestApplyBundleRefusalsChangeNothing(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	other := kmstest.NewKeyset(t, "payments/other", kmstest.ACL("client/us-east/app"))
	e.apply(s, e.bundle(e.ks, other)) // serial 1
	served := e.bundle(e.ks, other)   // serial 2
	e.apply(s, served)
	c := e.client(appID, s)
	// Both keysets' primaries are used now, within their TTL.
	ct := encrypt(t, c, ledger, []byte("dek"), nil).GetCiphertext()
	encrypt(t, c, "payments/other", []byte("dek"), nil)
	s.clock.Advance(time.Hour)
	before := s.status(t).GetBundle()
	beforeFile := s.persisted(t)

	stranger := kmstest.NewSigner(t)
	foreignKeys := kmstest.NewRegionKeys()
	foreignKeys.AddVersion(t, region)
	e.keys.AddVersion(t, "eu-west")
	sign := func(b *bundlev1.Bundle) *bundlev1.SignedBundle { return e.signer.Sign(t, b) }
	next := func(kss ...*kmstest.Keyset) *bundlev1.Bundle {
		return kmstest.Bundle(t, e.keys, region, 3, kss...)
	}
	clone := func(k *kmstest.Keyset) *kmstest.Keyset { c := *k; return &c }

	tests := []struct {
		name string
		req  func(t *testing.T) *kmsv1.ApplyBundleRequest
		code codes.Code
		msg  string // a substring of the refusal
	}{
		{"bad signature", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			sb := sign(next(e.ks, other))
			sb.Signature[0] ^= 1
			return &kmsv1.ApplyBundleRequest{Bundle: sb}
		}, codes.InvalidArgument, "signature does not verify"},
		{"tampered bytes", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			sb := sign(next(e.ks, other))
			sb.Bundle[len(sb.Bundle)/2] ^= 1
			return &kmsv1.ApplyBundleRequest{Bundle: sb}
		}, codes.InvalidArgument, "signature does not verify"},
		{"unpinned key", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: stranger.Sign(t, next(e.ks, other))}
		}, codes.InvalidArgument, "signature does not verify"},
		{"no bundle", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{}
		}, codes.InvalidArgument, "empty"},
		{"wrong region", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(kmstest.Bundle(t, e.keys, "eu-west", 3, clone(e.ks)))}
		}, codes.InvalidArgument, `the bundle is for region "eu-west", this server serves "us-east"`},
		{"older serial", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(kmstest.Bundle(t, e.keys, region, 1, e.ks, other))}
		}, codes.FailedPrecondition, "no replay: serial 1 is older than the applied serial 2"},
		{"same serial, other content", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(kmstest.Bundle(t, e.keys, region, 2, e.ks))}
		}, codes.FailedPrecondition, "no replay: serial 2 is already applied with different content"},
		{"drops a keyset used within its TTL", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next(e.ks))}
		}, codes.FailedPrecondition, `keyset "payments/other" version ` + fmt.Sprint(other.Primary()) +
			` cannot leave the decrypt set: region us-east server (this server) encrypted with it at 2026-11-01T12:00:00Z (effective TTL 24h0m0s, window 1ns); earliest safe time 2026-11-02T12:00:01Z`},
		{"drops a version used within its TTL, even with a shrink override", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			k := kmstest.NewKeyset(t, ledger, e.ks.ACL) // the same name, none of its keys
			b := next(k, other)
			b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: "testing", ForcedBy: adminID}
			return &kmsv1.ApplyBundleRequest{Bundle: sign(b)}
		}, codes.FailedPrecondition, fmt.Sprintf(`keyset "payments/ledger" version %d cannot leave the decrypt set`, e.ks.Primary())},
		{"drops every keyset (the shrink guard)", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next())}
		}, codes.FailedPrecondition, "bundle: shrink guard: against the served serial 2, the bundle drops 2 of 2 keysets (100%, more than 10% and more than 1): payments/ledger, payments/other"},
		{"keyset does not decrypt under the region key", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			b := next(e.ks, other)
			b.Keysets[0] = e.ks.Config(t, foreignKeys, region, 1)
			return &kmsv1.ApplyBundleRequest{Bundle: sign(b)}
		}, codes.InvalidArgument, `keyset "payments/ledger": region key version 1: keysets: encrypted keyset does not decrypt under this region key`},
		{"keyset encrypted for another region", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			k := clone(e.ks)
			k.Region, k.RegionKeyVersion = "eu-west", 1
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next(k, other))}
		}, codes.InvalidArgument, `keyset "payments/ledger": region key version 1`},
		{"force in the request", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next(e.ks, other)), Force: true, ForceReason: "INC-42"}
		}, codes.InvalidArgument, "force in the request is no longer accepted: a shrink override is signed into the bundle (regionctl bundle build --force-shrink --reason TEXT)"},
		{"a force reason in the request", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next(e.ks, other)), ForceReason: "INC-42"}
		}, codes.InvalidArgument, "force in the request is no longer accepted"},
		{"region key version unavailable", func(t *testing.T) *kmsv1.ApplyBundleRequest {
			k := clone(e.ks)
			k.RegionKeyVersion = e.keys.AddVersion(t, region)
			e.keys.Fail(errors.New("root KMS down"))
			t.Cleanup(func() { e.keys.Fail(nil) })
			return &kmsv1.ApplyBundleRequest{Bundle: sign(next(k, other))}
		}, codes.Unavailable, "root KMS down"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.admin.ApplyBundle(ctx(t), tt.req(t))
			if status.Code(err) != tt.code || !strings.Contains(status.Convert(err).Message(), tt.msg) {
				t.Fatalf("ApplyBundle(%s) = %v, want %v containing %q", tt.name, err, tt.code, tt.msg)
			}
			if got := s.status(t).GetBundle(); !refEqual(got, before) {
				t.Errorf("after a refused bundle, serving %v; want %v", got, before)
			}
			if got := s.persisted(t); !bytes.Equal(got, beforeFile) {
				t.Errorf("after a refused bundle, the bundle file changed")
			}
			if got := decrypt(t, c, ledger, ct, nil).GetPlaintext(); string(got) != "dek" {
				t.Errorf("Decrypt after a refused bundle = %q", got)
			}
		})
	}
	var refused int
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Operation == "/cairn.kms.v1.KMSAdmin/ApplyBundle" && r.Outcome == audit.OutcomeError {
			refused++
		}
	}
	if refused != len(tests) {
		t.Errorf("audited ApplyBundle errors = %d, want %d", refused, len(tests))
	}
}

func TestApplyBundleAccepted(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	c := e.client(appID, s)
	first := e.bundle(e.ks)
	r := e.apply(s, first)
	if r.GetPrevious() != nil || r.GetApplied().GetSerial() != 1 || r.GetApplied().GetRegion() != region {
		t.Errorf("first ApplyBundle = %v, want serial 1 applied, no previous", r)
	}
	old := e.ks.Primary()
	ct := encrypt(t, c, ledger, []byte("dek"), nil).GetCiphertext()

	// A newer serial.
	second := e.bundle(e.ks)
	r = e.apply(s, second)
	if !refEqual(r.GetPrevious(), refOf(t, first)) || !refEqual(r.GetApplied(), refOf(t, second)) {
		t.Errorf("ApplyBundle(serial 2) = %v, want applied %v previous %v", r, refOf(t, second), refOf(t, first))
	}
	fileAfter2 := s.persisted(t)
	if !bytes.Equal(fileAfter2, mustMarshal(t, second)) {
		t.Errorf("the bundle file does not hold serial 2")
	}
	if fi, err := os.Stat(filepath.Join(s.dir, kms.BundleFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("bundle file mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}

	// The same serial and content again: an idempotent success.
	r = e.apply(s, second)
	if !refEqual(r.GetApplied(), refOf(t, second)) || !refEqual(r.GetPrevious(), refOf(t, second)) {
		t.Errorf("re-applying serial 2 = %v, want applied = previous = serial 2", r)
	}

	// A new version, served decrypt-only first.
	next := e.ks.AddVersion(t)
	e.apply(s, e.bundle(e.ks))
	fileAfter2 = s.persisted(t)
	served := s.status(t).GetBundle()

	// A dry run checks and builds, but changes nothing.
	e.ks.SetPrimary(t, next)
	e.ks.Delete(t, old)
	dry := e.bundle(e.ks)
	_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: dry, DryRun: true})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("dry run dropping a version used now = %v, want FailedPrecondition", err)
	}
	// Once the TTL has passed since the last use, dropping it is safe.
	s.clock.Advance(kmstest.DefaultTTL + time.Second)
	r, err = s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: dry, DryRun: true})
	if err != nil || !refEqual(r.GetApplied(), refOf(t, dry)) {
		t.Fatalf("dry run after the TTL = %v, %v; want success", r, err)
	}
	if got := s.status(t).GetBundle(); !refEqual(got, served) || !bytes.Equal(s.persisted(t), fileAfter2) {
		t.Errorf("a dry run changed the served bundle (%v) or the file", got)
	}
	r = e.apply(s, dry)
	if got := s.status(t).GetBundle(); !refEqual(got, refOf(t, dry)) {
		t.Errorf("serving %v, want %v", got, refOf(t, dry))
	}
	if _, err := c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct}); status.Code(err) != codes.NotFound {
		t.Errorf("Decrypt under the dropped version = %v, want NotFound (the version is gone)", err)
	}
	if got := encrypt(t, c, ledger, []byte("x"), nil).GetKeyId(); got != next {
		t.Errorf("Encrypt after the swap used %d, want %d", got, next)
	}

	// A shrink override is accepted even where not needed, warned about
	// and audited.
	e.serial++
	ob := kmstest.Bundle(t, e.keys, region, e.serial, e.ks)
	ob.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: "INC-42 emergency", ForcedBy: adminID}
	forced := e.signer.Sign(t, ob)
	r, err = s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: forced})
	if err != nil || len(r.GetWarnings()) != 1 || !strings.Contains(r.GetWarnings()[0], "not needed against serial") {
		t.Fatalf("ApplyBundle(with a shrink override) = %v, %v; want success with a warning that it was not needed", r, err)
	}
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, rec := range recs {
		if rec.Reason == "shrink override by "+adminID+": INC-42 emergency" && rec.Identity == adminID && strings.Contains(rec.Target.Resource, fmt.Sprintf("bundle serial %d sha256 %x", refOf(t, forced).GetSerial(), refOf(t, forced).GetSha256())) {
			found = true
		}
	}
	if !found {
		t.Errorf("no audit record of the shrink override with its reason")
	}
	// A keyset never used may be dropped at once.
	unused := kmstest.NewKeyset(t, "payments/unused", nil)
	e.apply(s, e.bundle(e.ks, unused))
	e.apply(s, e.bundle(e.ks))
	if got := s.status(t).GetKeysetCount(); got != 1 {
		t.Errorf("keyset_count = %d, want 1", got)
	}
}

func refOf(t *testing.T, sb *bundlev1.SignedBundle) *bundlev1.BundleRef {
	t.Helper()
	var b bundlev1.Bundle
	if err := proto.Unmarshal(sb.GetBundle(), &b); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(sb.GetBundle())
	return &bundlev1.BundleRef{Region: b.GetRegion(), Serial: b.GetSerial(), Sha256: h[:]}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRestart(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	a := e.start(kms1ID, dir)
	b := e.start(kms2ID, "")
	sb := e.bundle(e.ks)
	e.apply(a, sb)
	e.apply(b, sb)
	ct := encrypt(t, e.client(appID, a), ledger, []byte("dek"), nil).GetCiphertext()
	a.Close()

	// Restarted on the same state dir, it serves the persisted bundle
	// without a push, after fetching the region keys once.
	calls := e.keys.Calls()
	a2 := e.start(kms1ID, dir)
	waitReady(t, a2)
	if got := e.keys.Calls() - calls; got != 1 {
		t.Errorf("region key fetches at boot = %d, want 1", got)
	}
	if st := a2.status(t); !refEqual(st.GetBundle(), refOf(t, sb)) || st.GetState() != kmsv1.ServingState_SERVING_STATE_SERVING {
		t.Errorf("after restart GetStatus = %v, want SERVING serial 1", st)
	}
	if got := decrypt(t, e.client(appID, a2), ledger, ct, nil).GetPlaintext(); string(got) != "dek" {
		t.Errorf("Decrypt after restart = %q", got)
	}
	a2.Close()

	// With the root KMS unreachable it stays not ready and says why; the
	// other server keeps serving from RAM.
	e.keys.Fail(errors.New("connection refused"))
	a3 := e.start(kms1ID, dir)
	deadline := time.Now().Add(10 * time.Second)
	for e.keys.Calls() < calls+4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond) // let it retry a few times
	}
	st := a3.status(t)
	if st.GetState() != kmsv1.ServingState_SERVING_STATE_NOT_READY || !strings.Contains(st.GetNotReadyReason(), "connection refused") || a3.Ready() {
		t.Errorf("GetStatus with the root KMS down = %v, want NOT_READY naming the cause", st)
	}
	// It holds a bundle it will serve: regionctl must count it as unknown.
	if p := st.GetPendingBundle(); p.GetSerial() == 0 || len(p.GetSha256()) == 0 {
		t.Errorf("GetStatus with the root KMS down: pending_bundle = %v, want the persisted bundle", p)
	}
	_, err := e.client(appID, a3).Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct})
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "connection refused") {
		t.Errorf("Decrypt on the not-ready server = %v, want Unavailable naming the cause", err)
	}
	for i := range 20 {
		if got := decrypt(t, e.client(appID, b), ledger, ct, nil).GetPlaintext(); string(got) != "dek" {
			t.Fatalf("Decrypt %d on the serving server = %q", i, got)
		}
	}
	// A newer bundle pushed meanwhile is refused (its keys cannot be
	// fetched) and the persisted one is not replaced.
	if _, err := a3.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(e.ks)}); status.Code(err) != codes.Unavailable {
		t.Errorf("ApplyBundle while the root KMS is down = %v, want Unavailable", err)
	}
	// An older one is refused as a replay even before anything is served.
	e.serial = 0
	if _, err := a3.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle()}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("ApplyBundle(serial 1, other content) before boot finished = %v, want FailedPrecondition", err)
	}
	// When the root KMS is back, the retry loop gets there.
	e.keys.Fail(nil)
	waitReady(t, a3)
	if got := decrypt(t, e.client(appID, a3), ledger, ct, nil).GetPlaintext(); string(got) != "dek" {
		t.Errorf("Decrypt after recovery = %q", got)
	}
}

func TestCorruptStateRefusedAtBoot(t *testing.T) {
	for _, tt := range []struct {
		name string
		file func(t *testing.T, e *env) []byte
		want string
	}{
		{"garbage", func(*testing.T, *env) []byte { return []byte("\xff\xff\xff") }, "does not decode"},
		{"unsigned", func(t *testing.T, e *env) []byte {
			sb := e.bundle(e.ks)
			sb.Signature = nil
			return mustMarshal(t, sb)
		}, "signature does not verify"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// The env (and so the server's Close) belongs to the subtest:
			// its state directory must outlive the server.
			e := newEnv(t)
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, kms.BundleFile), tt.file(t, e), 0o600); err != nil {
				t.Fatal(err)
			}
			s := e.start(kms1ID, dir)
			st := s.status(t)
			if st.GetState() != kmsv1.ServingState_SERVING_STATE_NOT_READY || !strings.Contains(st.GetNotReadyReason(), tt.want) {
				t.Errorf("GetStatus = %v, want NOT_READY containing %q", st, tt.want)
			}
			// An admin can recover it with a push.
			e.apply(s, e.bundle(e.ks))
			if !s.Ready() {
				t.Errorf("not ready after a push")
			}
		})
	}
}

func TestUsageAndProbe(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	c := e.client(appID, s)
	first := e.ks.Primary()
	ad := []byte("ad")
	ct := encrypt(t, c, ledger, []byte("golden"), ad).GetCiphertext()
	encrypt(t, c, ledger, []byte("x"), nil)
	s.clock.Advance(time.Minute)
	decrypt(t, c, ledger, ct, ad)
	c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct}) // fails: not a use

	// A new version arrives; the counters of the old one carry over.
	added := e.ks.AddVersion(t)
	e.apply(s, e.bundle(e.ks))
	st := s.status(t)
	if st.GetKeysetCount() != 1 || len(st.GetKeysets()) != 1 {
		t.Fatalf("GetStatus = %v, want one keyset", st)
	}
	ku := st.GetKeysets()[0]
	if ku.GetKeyset() != ledger || ku.GetPrimaryKeyId() != first || len(ku.GetVersions()) != 2 {
		t.Fatalf("keyset usage = %v", ku)
	}
	v1, v2 := ku.GetVersions()[0], ku.GetVersions()[1]
	if v1.GetKeyId() != first || v1.GetEncryptCount() != 2 || v1.GetDecryptCount() != 1 || !v1.GetLastUsed().AsTime().Equal(t0.Add(time.Minute)) {
		t.Errorf("usage of %d = %v, want 2 encrypts, 1 decrypt, last used %v", first, v1, t0.Add(time.Minute))
	}
	if v2.GetKeyId() != added || v2.GetEncryptCount() != 0 || v2.GetLastUsed() != nil || v2.GetStatus().String() != "KEY_STATUS_ENABLED" {
		t.Errorf("usage of the new version = %v, want unused, enabled", v2)
	}

	// Golden ciphertexts, as the root KMS makes them: only those may be
	// probed by an admin on no decrypt ACL.
	gct, gad, sum := golden(t, e.ks, ledger)
	junk := append(bytes.Clone(gct[:5]), "junk"...)
	nope, nopeAD, _ := golden(t, e.ks, "payments/nope")
	probes := []struct {
		p      *kmsv1.GoldenProbe
		ok     bool
		keyID  uint32
		detail string
	}{
		{&kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: gct, AssociatedData: gad, PlaintextSha256: sum[:]}, true, first, ""},
		{&kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: gct, AssociatedData: gad, PlaintextSha256: make([]byte, 32)}, false, first, "does not match"},
		{&kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: gct, AssociatedData: gad}, false, first, "does not match"},
		{&kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: flipLast(gct), AssociatedData: gad, PlaintextSha256: sum[:]}, false, first, "did not decrypt"},
		{&kmsv1.GoldenProbe{Keyset: ledger, Ciphertext: junk, AssociatedData: gad, PlaintextSha256: sum[:]}, false, first, "did not decrypt"},
		{&kmsv1.GoldenProbe{Keyset: "payments/nope", Ciphertext: nope, AssociatedData: nopeAD}, false, 0, `no keyset "payments/nope"`},
	}
	req := &kmsv1.ProbeRequest{}
	for _, p := range probes {
		req.Probes = append(req.Probes, p.p)
	}
	resp, err := s.admin.Probe(ctx(t), req)
	if err != nil || len(resp.GetResults()) != len(probes) {
		t.Fatalf("Probe = %v, %v", resp, err)
	}
	for i, r := range resp.GetResults() {
		p := probes[i]
		if r.GetOk() != p.ok || r.GetKeyId() != p.keyID || !strings.Contains(r.GetDetail(), p.detail) {
			t.Errorf("Probe %d = %v, want ok=%v key %d detail %q", i, r, p.ok, p.keyID, p.detail)
		}
	}
	// Probes are not uses.
	if got := s.status(t).GetKeysets()[0].GetVersions()[0].GetDecryptCount(); got != 1 {
		t.Errorf("decrypt count after probes = %d, want 1", got)
	}
	if _, err := kmsv1.NewKMSAdminClient(e.conn(appID, s.addr)).Probe(ctx(t), req); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Probe by a client = %v, want PermissionDenied", err)
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	c := e.client(appID, s)
	scrape := func() string {
		rec := httptest.NewRecorder()
		s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		b, _ := io.ReadAll(rec.Result().Body)
		return string(b)
	}
	if m := scrape(); !strings.Contains(m, "cairn_kms_ready 0") {
		t.Errorf("metrics before a bundle lack cairn_kms_ready 0:\n%s", m)
	}
	e.apply(s, e.bundle(e.ks))
	ct := encrypt(t, c, ledger, []byte("x"), nil).GetCiphertext()
	decrypt(t, c, ledger, ct, nil)
	c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: ledger, Ciphertext: ct[:9]})
	c.Decrypt(ctx(t), &kmsv1.DecryptRequest{Keyset: "payments/nope", Ciphertext: ct})
	m := scrape()
	for _, want := range []string{
		"cairn_kms_ready 1",
		"cairn_kms_keysets 1",
		"cairn_kms_bundle_serial 1",
		`cairn_kms_requests_total{code="OK",op="encrypt"} 1`,
		`cairn_kms_requests_total{code="OK",op="decrypt"} 1`,
		`cairn_kms_requests_total{code="InvalidArgument",op="decrypt"} 1`,
		`cairn_kms_requests_total{code="PermissionDenied",op="decrypt"} 1`,
		`cairn_kms_requests_total{code="OK",op="apply_bundle"} 1`,
		`cairn_kms_request_duration_seconds_count{op="decrypt"} 3`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Only the per-keyset counter names a keyset, and only one the bundle
	// holds (cardinality).
	for line := range strings.Lines(m) {
		if strings.Contains(line, "payments/nope") || strings.Contains(line, ledger) && !strings.HasPrefix(line, "cairn_kms_keyset_requests_total{") {
			t.Errorf("metrics line names a keyset: %s", line)
		}
	}
	if want := `cairn_kms_keyset_requests_total{keyset="payments/ledger",op="decrypt",outcome="error"} 1`; !strings.Contains(m, want) {
		t.Errorf("metrics lack %q", want)
	}
}

// TestUsageSurvivesRestart: the usage history is written to the state dir
// and read back at boot, so a restarted server still refuses a bundle that
// drops a version used within its TTL: once it serves again, and also while
// it serves nothing yet (root KMS down), against the persisted history.
func TestUsageSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	a := e.start(kms1ID, dir)
	e.apply(a, e.bundle(e.ks))
	c := e.client(appID, a)
	var ct []byte
	for range 3 {
		ct = encrypt(t, c, ledger, []byte("dek"), nil).GetCiphertext()
	}
	decrypt(t, c, ledger, ct, nil)
	a.Close() // writes the history

	fi, err := os.Stat(filepath.Join(dir, kms.UsageFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s after Close: %v, %v; want mode 0600", kms.UsageFile, fi, err)
	}

	// Restarted: the counts and the last use are back.
	a2 := e.start(kms1ID, dir)
	waitReady(t, a2)
	var got *kmsv1.KeyVersionUsage
	for _, k := range a2.status(t).GetKeysets() {
		for _, v := range k.GetVersions() {
			if k.GetKeyset() == ledger && v.GetKeyId() == e.ks.Primary() {
				got = v
			}
		}
	}
	if got.GetEncryptCount() != 3 || got.GetDecryptCount() != 1 || got.GetLastUsed() == nil {
		t.Errorf("usage after restart = %v, want 3 encrypts, 1 decrypt, a last use", got)
	}
	dropAll := e.emptied() // no keysets: drops the ledger keyset
	if _, err := a2.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: dropAll}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cannot leave the decrypt set") {
		t.Errorf("ApplyBundle(dropping a keyset used before the restart) = %v, want FailedPrecondition (cannot leave the decrypt set)", err)
	}
	a2.Close()

	// Restarted with the root KMS down: nothing is served, and the
	// persisted history still refuses the drop.
	e.keys.Fail(errors.New("connection refused"))
	a3 := e.start(kms1ID, dir)
	if _, err := a3.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.emptied()}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cannot leave the decrypt set") {
		t.Errorf("ApplyBundle(dropping it) while nothing is served = %v, want FailedPrecondition (cannot leave the decrypt set)", err)
	}
	if a3.Ready() {
		t.Error("the refused bundle was served")
	}

	// A damaged history does not stop the server, but it fails closed: the
	// file is set aside (not overwritten) and every decrypting version of
	// the persisted bundle counts as used at boot. The same when the file is
	// gone although a bundle was served.
	a3.Close()
	e.keys.Fail(nil)
	for _, lose := range []struct {
		name string
		do   func() error
	}{
		{"damaged", func() error { return os.WriteFile(filepath.Join(dir, kms.UsageFile), []byte("{not json"), 0o600) }},
		{"deleted", func() error { return os.Remove(filepath.Join(dir, kms.UsageFile)) }},
		{"a last use in the future", func() error {
			future := time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano() // within int64 nanoseconds
			return os.WriteFile(filepath.Join(dir, kms.UsageFile), fmt.Appendf(nil, "cairn-kms-usage 1\npayments/ledger\t1\t1\t1\t0\t0\t%d\n", future), 0o600)
		}},
	} {
		if err := lose.do(); err != nil {
			t.Fatal(err)
		}
		s := e.start(kms1ID, dir)
		waitReady(t, s)
		if _, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.emptied()}); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cannot leave the decrypt set") {
			t.Errorf("history %s: ApplyBundle(dropping the keyset) = %v, want FailedPrecondition (cannot leave the decrypt set)", lose.name, err)
		}
		s.Close()
	}
	if aside, _ := filepath.Glob(filepath.Join(dir, kms.UsageFile+".unusable-*")); len(aside) == 0 {
		t.Error("no unusable usage file was set aside")
	}
}

// TestFirstStartHasNoHistory: a state dir with neither bundle nor history is
// a new server: its first bundle, and one dropping keysets after it, are
// judged on what it has served itself (nothing yet).
func TestFirstStartHasNoHistory(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	e.apply(s, e.bundle(e.ks))
	e.apply(s, e.emptied()) // unused: may be dropped
}
