package kms_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// shrinkEnv serves a bundle of three keysets, none used (so that the Safety
// Condition lets any of them go and only the shrink guard is tested).
func shrinkEnv(t *testing.T) (*env, *server, []*kmstest.Keyset) {
	t.Helper()
	e := newEnv(t)
	s := e.start(kms1ID, "")
	kss := []*kmstest.Keyset{e.ks, kmstest.NewKeyset(t, "payments/refunds", nil), kmstest.NewKeyset(t, "search/index", nil)}
	e.apply(s, e.bundle(kss...))
	return e, s, kss
}

// overridden signs the next serial's bundle of kss with a shrink override.
func (e *env) overridden(reason string, kss ...*kmstest.Keyset) *bundlev1.SignedBundle {
	e.t.Helper()
	e.serial++
	b := kmstest.Bundle(e.t, e.keys, region, e.serial, kss...)
	b.ShrinkOverride = &bundlev1.ShrinkOverride{Reason: reason, ForcedBy: adminID}
	return e.signer.Sign(e.t, b)
}

// auditReasons returns the reasons of s's audit records of attempts on the
// bundle sb, in order.
func auditReasons(t *testing.T, s *server, sb *bundlev1.SignedBundle) []string {
	t.Helper()
	recs, err := audit.ReadFile(s.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	ref := refOf(t, sb)
	var out []string
	for _, r := range recs {
		if r.Outcome == audit.OutcomeAttempt && r.Identity == adminID && r.Operation == "/cairn.kms.v1.KMSAdmin/ApplyBundle" &&
			r.Target.Resource == fmt.Sprintf("bundle serial %d sha256 %x", ref.GetSerial(), ref.GetSha256()) {
			out = append(out, r.Reason)
		}
	}
	return out
}

// TestShrinkGuard: a truncated bundle is refused and changes nothing; the
// same content with a signed shrink override is audited before it applies
// (dry run too), and the response warns.
func TestShrinkGuard(t *testing.T) {
	e, s, kss := shrinkEnv(t)
	before, beforeFile := s.status(t).GetBundle(), s.persisted(t)

	truncated := e.bundle(kss[0]) // drops 2 of 3 keysets
	const want = "bundle: shrink guard: against the served serial 1, the bundle drops 2 of 3 keysets (67%, more than 10% and more than 1): payments/refunds, search/index; " +
		"if that is meant, build the bundle with regionctl bundle build --force-shrink --reason TEXT"
	for _, dry := range []bool{true, false} {
		_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: truncated, DryRun: dry})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), want) {
			t.Errorf("ApplyBundle(truncated, dry run %t) = %v, want FailedPrecondition containing %q", dry, err, want)
		}
	}
	if got := s.status(t).GetBundle(); !refEqual(got, before) || !bytes.Equal(s.persisted(t), beforeFile) || s.status(t).GetKeysetCount() != 3 {
		t.Errorf("after the refusal serving %v (file changed: %t); want %v and the file unchanged", got, !bytes.Equal(s.persisted(t), beforeFile), before)
	}

	const reason = "INC-2014: payments/refunds and search/index move to eu-west"
	forced := e.overridden(reason, kss[0])
	dry, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: forced, DryRun: true})
	if err != nil {
		t.Fatalf("ApplyBundle(with an override, dry run) = %v, want success", err)
	}
	if got := s.status(t).GetBundle(); !refEqual(got, before) {
		t.Errorf("after the dry run serving %v, want %v", got, before)
	}
	r, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: forced})
	if err != nil {
		t.Fatalf("ApplyBundle(with an override) = %v, want success", err)
	}
	for _, resp := range []*kmsv1.ApplyBundleResponse{dry, r} {
		w := strings.Join(resp.GetWarnings(), "\n")
		for _, sub := range []string{"shrink override by " + adminID + " (reason: " + reason + "), audited",
			"passed the shrink guard only by the override: drops 2 of 3 keysets", "the Safety Condition is never overridden"} {
			if !strings.Contains(w, sub) {
				t.Errorf("ApplyBundle warnings = %q, want %q", w, sub)
			}
		}
	}
	if got := s.status(t); !refEqual(got.GetBundle(), refOf(t, forced)) || got.GetKeysetCount() != 1 {
		t.Errorf("serving %v with %d keysets, want %v with 1", got.GetBundle(), got.GetKeysetCount(), refOf(t, forced))
	}
	wantAudit := []string{"dry run: shrink override by " + adminID + ": " + reason, "shrink override by " + adminID + ": " + reason}
	if got := auditReasons(t, s, forced); !slices.Equal(got, wantAudit) {
		t.Errorf("audit records of the override = %q, want %q", got, wantAudit)
	}
}

// TestShrinkGuardLaggingServer: a server that missed two retirements of its
// only keyset (it was down, or refused bundles meanwhile) takes both in one
// bundle when the bundle names them destroyed through the lifecycle, and
// refuses the same drop unnamed (a truncation) with nothing changed. This
// is the soak's stall: every bundle a lagging region was sent was refused,
// and its keysets' rotations stopped.
func TestShrinkGuardLaggingServer(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	ks := e.ks
	old1, old2 := ks.AddVersion(t), ks.AddVersion(t)
	ks.AddVersion(t)
	e.apply(s, e.bundle(ks))
	before := s.status(t).GetBundle()

	ks.Delete(t, old1)
	ks.Delete(t, old2)
	_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(ks)})
	if want := "drops 2 of 4 key versions of the keysets it keeps"; status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), want) {
		t.Fatalf("ApplyBundle(two versions dropped, not named destroyed) = %v, want FailedPrecondition containing %q", err, want)
	}
	if got := s.status(t).GetBundle(); !refEqual(got, before) {
		t.Fatalf("after the refusal serving %v, want %v", got, before)
	}

	ks.Destroyed = []uint32{min(old1, old2), max(old1, old2)}
	caughtUp := e.bundle(ks)
	r, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: caughtUp})
	if err != nil {
		t.Fatalf("ApplyBundle(the two versions named destroyed) = %v, want success", err)
	}
	if w := strings.Join(r.GetWarnings(), "\n"); strings.Contains(w, "shrink") {
		t.Errorf("ApplyBundle warnings = %q, want no shrink warning (no override was needed)", w)
	}
	if got := s.status(t).GetBundle(); !refEqual(got, refOf(t, caughtUp)) {
		t.Errorf("serving %v, want %v", got, refOf(t, caughtUp))
	}
}

// TestShrinkGuardWhilePending: a server that has not loaded its persisted
// bundle yet (the root KMS is down) guards against that bundle.
func TestShrinkGuardWhilePending(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	kss := []*kmstest.Keyset{e.ks, kmstest.NewKeyset(t, "payments/refunds", nil), kmstest.NewKeyset(t, "search/index", nil)}
	e.apply(s, e.bundle(kss...))
	s.Close()
	e.keys.Fail(errors.New("connection refused"))
	t.Cleanup(func() { e.keys.Fail(nil) })
	s = e.start(kms1ID, dir)
	_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.bundle(kss[0])})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "against the served serial 1, the bundle drops 2 of 3 keysets") {
		t.Errorf("ApplyBundle(truncated) while the persisted bundle waits = %v, want FailedPrecondition from the shrink guard", err)
	}
}

// TestPartialBundleAudited: a partial build applies with its record audited
// and a warning naming what it left out.
func TestPartialBundleAudited(t *testing.T) {
	e, s, kss := shrinkEnv(t)
	e.serial++
	b := kmstest.Bundle(t, e.keys, region, e.serial, kss...)
	b.Partial = &bundlev1.PartialBuild{Reason: "INC-9: ads team file broken", BuiltBy: adminID, LeftOut: []string{"ads/clicks: not in the record"}}
	sb := e.signer.Sign(t, b)
	r := e.apply(s, sb)
	want := "the bundle is a partial build by " + adminID + " (reason: INC-9: ads team file broken), audited; left out: ads/clicks: not in the record"
	if len(r.GetWarnings()) != 1 || r.GetWarnings()[0] != want {
		t.Errorf("ApplyBundle(partial) warnings = %q, want [%q]", r.GetWarnings(), want)
	}
	wantAudit := []string{"partial build by " + adminID + ": INC-9: ads team file broken; left out: ads/clicks: not in the record"}
	if got := auditReasons(t, s, sb); !slices.Equal(got, wantAudit) {
		t.Errorf("audit records of the partial build = %q, want %q", got, wantAudit)
	}
}

// TestStatusIncludeBundle: GetStatus returns the signed bundle served only
// when asked.
func TestStatusIncludeBundle(t *testing.T) {
	e := newEnv(t)
	s := e.start(kms1ID, "")
	st, err := s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
	if err != nil || st.GetServedBundle() != nil {
		t.Errorf("GetStatus(include_bundle) serving nothing = %v, %v; want no served_bundle", st, err)
	}
	sb := e.bundle(e.ks)
	e.apply(s, sb)
	st, err = s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
	if err != nil || !proto.Equal(st.GetServedBundle(), sb) {
		t.Errorf("GetStatus(include_bundle) = %v, %v; want served_bundle = the applied signed bundle", st.GetServedBundle(), err)
	}
	if st := s.status(t); st.GetServedBundle() != nil {
		t.Errorf("GetStatus() without include_bundle returned served_bundle")
	}
}

// TestStatusPreviousBundle: a server keeps the bundle it served before the
// current one (also across a restart), so a rollback can restore it after
// every server moved on.
func TestStatusPreviousBundle(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	first, second := e.bundle(e.ks), e.bundle(e.ks)
	e.apply(s, first)
	st, err := s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
	if err != nil || st.GetPreviousBundle() != nil {
		t.Errorf("GetStatus after the first bundle: previous_bundle = %v, %v; want none", st.GetPreviousBundle(), err)
	}
	e.apply(s, second)
	e.apply(s, second) // applying the served bundle again keeps the previous one
	st, err = s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
	if err != nil || !proto.Equal(st.GetPreviousBundle(), first) || !proto.Equal(st.GetServedBundle(), second) {
		t.Errorf("GetStatus after the second bundle: previous %v, served %v, %v; want the first and the second", st.GetPreviousBundle() != nil, st.GetServedBundle() != nil, err)
	}
	s.Close()
	s = e.start(kms1ID, dir)
	st = waitServingStatus(t, s)
	if !proto.Equal(st.GetPreviousBundle(), first) {
		t.Errorf("GetStatus after a restart: previous_bundle kept = %v, want the first bundle", st.GetPreviousBundle() != nil)
	}
}

// waitServingStatus waits until s serves and returns its status with the
// bundles.
func waitServingStatus(t *testing.T, s *server) *kmsv1.GetStatusResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := s.admin.GetStatus(ctx(t), &kmsv1.GetStatusRequest{IncludeBundle: true})
		if err == nil && st.GetState() == kmsv1.ServingState_SERVING_STATE_SERVING {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not serving after 10s: %v, %v", st, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
