package kms_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/kms"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

const day = 24 * time.Hour

// refuse applies sb to s, wants a FailedPrecondition naming every part of
// want, and checks that what s serves and persists did not change.
func refuse(t *testing.T, s *server, sb *bundlev1.SignedBundle, want ...string) {
	t.Helper()
	before, beforeFile := s.status(t).GetBundle(), s.persisted(t)
	_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: sb})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("ApplyBundle = %v, want FailedPrecondition", err)
	}
	for _, w := range want {
		if msg := status.Convert(err).Message(); !strings.Contains(msg, w) {
			t.Errorf("ApplyBundle refusal = %q, want it to say %q", msg, w)
		}
	}
	if got := s.status(t).GetBundle(); !refEqual(got, before) || !bytes.Equal(s.persisted(t), beforeFile) {
		t.Errorf("after a refused bundle, serving %v; want %v unchanged (and the file)", got, before)
	}
}

// versionUsage returns the usage GetStatus reports for keyset's version id.
func versionUsage(t *testing.T, s *server, keyset string, id uint32) *kmsv1.KeyVersionUsage {
	t.Helper()
	for _, k := range s.status(t).GetKeysets() {
		for _, v := range k.GetVersions() {
			if k.GetKeyset() == keyset && v.GetKeyId() == id {
				return v
			}
		}
	}
	t.Fatalf("GetStatus has no version %d of %s", id, keyset)
	return nil
}

// TestTTLCutThenDropRefused: bundle N cuts the keyset's TTL from 90 days to
// 1s, bundle N+1 drops the keyset two seconds later. The ciphertexts made
// before the cut still live for 90 days, so the drop is refused until
// then, also after a restart (the TTL history is persisted).
func TestTTLCutThenDropRefused(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprintf("restart=%v", restart), func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			e.ks.TTL = 90 * day
			s := e.start(kms1ID, dir)
			e.apply(s, e.bundle(e.ks))
			encrypt(t, e.client(appID, s), ledger, []byte("dek"), nil) // at t0
			s.clock.Advance(time.Minute)
			e.ks.TTL = time.Second
			e.apply(s, e.bundle(e.ks)) // the cut
			if restart {
				s.Close()
				if data, err := os.ReadFile(filepath.Join(dir, kms.UsageFile)); err != nil || !bytes.Contains(data, []byte("t\t"+ledger+"\t7776000000000000\t")) {
					t.Fatalf("%s = %q, %v; want the 90-day period of the TTL history", kms.UsageFile, data, err)
				}
				s = e.start(kms1ID, dir)
				waitReady(t, s)
				s.clock.Advance(time.Minute)
			}
			s.clock.Advance(2 * time.Second)
			refuse(t, s, e.emptied(), // drops the keyset
				fmt.Sprintf(`keyset "payments/ledger" version %d cannot leave the decrypt set`, e.ks.Primary()),
				"encrypted with it at 2026-11-01T12:00:00Z (effective TTL 2160h0m0s",
				"earliest safe time 2027-01-30T12:00:01Z")
			// Once the old TTL has passed since the cut (and since the last
			// encryption), the drop is safe.
			s.clock.Advance(90 * day)
			e.apply(s, e.emptied())
		})
	}
}

// lifecycle returns a bundle lifecycle entry.
func lifecycle(id uint32, propagated, primarySince, superseded time.Time) *bundlev1.VersionLifecycle {
	l := &bundlev1.VersionLifecycle{KeyId: id}
	if !propagated.IsZero() {
		l.PropagatedEverywhere = timestamppb.New(propagated)
	}
	if !primarySince.IsZero() {
		l.PrimarySince = timestamppb.New(primarySince)
	}
	if !superseded.IsZero() {
		l.SupersededAt = timestamppb.New(superseded)
	}
	return l
}

// TestPromoteWithoutPropagationRefused: a bundle may make a version primary
// only if this server already served it decrypting and the record says it
// was propagated everywhere at least a propagation window ago.
func TestPromoteWithoutPropagationRefused(t *testing.T) {
	const window = 10 * time.Minute
	e := newEnv(t)
	s := e.start(kms1ID, "")
	first := e.ks.Primary()
	e.ks.Window = durationpb.New(window)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{lifecycle(first, t0.Add(-day), t0.Add(-day), time.Time{})}
	e.apply(s, e.bundle(e.ks))
	now := func() time.Time { return s.clock.Now() }

	// Added and made primary at once: refused, whatever the record says.
	second := e.ks.AddVersion(t)
	e.ks.SetPrimary(t, second)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{lifecycle(first, t0.Add(-day), t0.Add(-day), now()), lifecycle(second, now().Add(-day), now(), time.Time{})}
	refuse(t, s, e.bundle(e.ks), fmt.Sprintf(`keyset "payments/ledger" version %d cannot become primary`, second), "ship it decrypt-only first", "earliest safe time unknown")

	// Served decrypt-only first.
	e.ks.SetPrimary(t, first)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{lifecycle(first, t0.Add(-day), t0.Add(-day), time.Time{}), lifecycle(second, time.Time{}, time.Time{}, time.Time{})}
	e.apply(s, e.bundle(e.ks))

	tests := []struct {
		name       string
		propagated time.Duration // before now; 0: never
		want       []string      // nil: accepted
	}{
		{"not propagated", 0, []string{"has not served it decrypting on every server yet", "earliest safe time unknown"}},
		{"propagated within the window", time.Minute, []string{"region us-east has served it decrypting only since 2026-11-01T11:59:00Z (window 10m0s)", "earliest safe time 2026-11-01T12:09:00Z"}},
		{"propagated a window ago", window, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.ks.SetPrimary(t, second)
			var prop time.Time
			if tt.propagated > 0 {
				prop = now().Add(-tt.propagated)
			}
			e.ks.Lifecycle = []*bundlev1.VersionLifecycle{lifecycle(first, t0.Add(-day), t0.Add(-day), now()), lifecycle(second, prop, now(), time.Time{})}
			sb := e.bundle(e.ks)
			if tt.want == nil {
				e.apply(s, sb)
				if got := versionUsage(t, s, ledger, second).GetStatus().String(); got != "KEY_STATUS_PRIMARY" {
					t.Errorf("version %d status = %s, want primary", second, got)
				}
				return
			}
			refuse(t, s, sb, append([]string{fmt.Sprintf(`keyset "payments/ledger" version %d cannot become primary`, second)}, tt.want...)...)
		})
	}
}

// TestRetireRefusedWithinLastEncrypt: a version this server encrypted with
// may not leave the decrypt set until its last encryption + the effective
// TTL has passed; one the record says was superseded recently may not either.
func TestRetireRefusedWithinLastEncrypt(t *testing.T) {
	e := newEnv(t) // TTL 24h
	s := e.start(kms1ID, "")
	c := e.client(appID, s)
	first := e.ks.Primary()
	second := e.ks.AddVersion(t)
	e.apply(s, e.bundle(e.ks))
	encrypt(t, c, ledger, []byte("dek"), nil) // first, at t0
	s.clock.Advance(time.Hour)
	e.ks.SetPrimary(t, second)
	e.apply(s, e.bundle(e.ks)) // old format: no lifecycle, (a) holds
	encrypt(t, c, ledger, []byte("dek"), nil)

	s.clock.Advance(time.Hour)
	e.ks.Disable(t, first)
	refuse(t, s, e.bundle(e.ks), fmt.Sprintf(`keyset "payments/ledger" version %d cannot leave the decrypt set`, first),
		"encrypted with it at 2026-11-01T12:00:00Z (effective TTL 24h0m0s", "earliest safe time 2026-11-02T12:00:01Z")

	// The record's supersession counts too: past the last encryption, a
	// lifecycle saying the version was superseded an hour ago still holds
	// it for TTL + window.
	s.clock.Advance(day)
	sup := s.clock.Now().Add(-time.Hour)
	e.ks.Window = durationpb.New(10 * time.Minute)
	e.ks.Lifecycle = []*bundlev1.VersionLifecycle{lifecycle(first, t0.Add(-day), t0.Add(-day), sup), lifecycle(second, t0, sup, time.Time{})}
	refuse(t, s, e.bundle(e.ks), "it was superseded at 2026-11-02T13:00:00Z (effective TTL 24h0m0s, window 10m0s)", "earliest safe time 2026-11-03T13:10:00Z")
	s.clock.Advance(day + 10*time.Minute)
	e.apply(s, e.bundle(e.ks))
}

// TestStatusReportsLastEncryptAndHistoryLost: GetStatus tells the last
// encryption apart from the last use, and says which versions' usage is
// unknown because the server lost its history at boot.
func TestStatusReportsLastEncryptAndHistoryLost(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	c := e.client(appID, s)
	e.apply(s, e.bundle(e.ks))
	ct := encrypt(t, c, ledger, []byte("dek"), nil).GetCiphertext()
	s.clock.Advance(time.Minute)
	decrypt(t, c, ledger, ct, nil)
	v := versionUsage(t, s, ledger, e.ks.Primary())
	if got, want := v.GetLastEncrypt().AsTime(), t0; !got.Equal(want) || v.GetHistoryLost() {
		t.Errorf("last_encrypt, history_lost = %v, %v; want %v, false", got, v.GetHistoryLost(), want)
	}
	if got, want := v.GetLastUsed().AsTime(), t0.Add(time.Minute); !got.Equal(want) {
		t.Errorf("last_used = %v, want %v", got, want)
	}
	s.Close()

	// The history is gone: every decrypting version counts as just used,
	// and says so.
	if err := os.Remove(filepath.Join(dir, kms.UsageFile)); err != nil {
		t.Fatal(err)
	}
	s = e.start(kms1ID, dir)
	waitReady(t, s)
	v = versionUsage(t, s, ledger, e.ks.Primary())
	if !v.GetHistoryLost() || !v.GetLastEncrypt().AsTime().Equal(t0) {
		t.Errorf("after a lost history: %v; want history_lost and last_encrypt at boot (%v)", v, t0)
	}
	// It stays lost across a further restart (persisted).
	s.Close()
	s = e.start(kms1ID, dir)
	waitReady(t, s)
	if v = versionUsage(t, s, ledger, e.ks.Primary()); !v.GetHistoryLost() {
		t.Errorf("after another restart: %v; want history_lost", v)
	}
}

// TestUsageFileVersion1Boots: a server whose state dir holds a usage file of
// the version before last encryptions and TTL histories were kept boots with
// it, and its last use still guards retirement.
func TestUsageFileVersion1Boots(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	s := e.start(kms1ID, dir)
	e.apply(s, e.bundle(e.ks))
	s.Close()
	v1 := fmt.Sprintf("cairn-kms-usage 1\n%s\t%d\t1\t%d\t5\t6\t%d\n", ledger, e.ks.Primary(), int64(day), t0.UnixNano())
	if err := os.WriteFile(filepath.Join(dir, kms.UsageFile), []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	s = e.start(kms1ID, dir)
	waitReady(t, s)
	v := versionUsage(t, s, ledger, e.ks.Primary())
	if v.GetEncryptCount() != 5 || v.GetDecryptCount() != 6 || !v.GetLastUsed().AsTime().Equal(t0) || v.GetHistoryLost() {
		t.Errorf("usage from a version 1 file = %v, want 5 encrypts, 6 decrypts, last used %v, history kept", v, t0)
	}
	refuse(t, s, e.emptied(), "cannot leave the decrypt set", "earliest safe time 2026-11-02T12:00:01Z")
}
