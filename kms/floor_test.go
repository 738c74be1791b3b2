package kms_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms"
	"github.com/cairnkms/cairn/kms/kmstest"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

// fakeFloor is a kms.SerialFloor answering floor, or err, and counting
// the calls.
type fakeFloor struct {
	mu    sync.Mutex
	floor uint64
	err   error
	calls int
}

func (f *fakeFloor) SerialFloor(_ context.Context, r string) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if r != region {
		return 0, errors.New("fake: asked for another region")
	}
	return f.floor, f.err
}

func (f *fakeFloor) called() int { f.mu.Lock(); defer f.mu.Unlock(); return f.calls }

func withFloor(f kms.SerialFloor) serverOpt { return func(c *kms.Config) { c.SerialFloor = f } }

// signedSerial signs e's bundle of serial holding e.ks (not advancing
// e.serial).
func (e *env) signedSerial(serial uint64) *bundlev1.SignedBundle {
	e.t.Helper()
	return e.signer.Sign(e.t, kmstest.Bundle(e.t, e.keys, region, serial, e.ks))
}

// TestRecordFloor: a server that has applied no bundle learns the region's
// serial floor from the record (once) and refuses a bundle below it, naming
// the floor; if it cannot ask, it refuses every bundle (fail closed) unless
// it has a bundle of its own to go on from.
func TestRecordFloor(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name     string
		floor    *fakeFloor
		serial   uint64
		wantCode codes.Code
		wantMsg  string
	}{
		{"below the floor", &fakeFloor{floor: 2}, 1, codes.FailedPrecondition, "serial 1 is below the region's bundle serial floor 2"},
		{"at the floor", &fakeFloor{floor: 2}, 2, codes.OK, ""},
		{"above the floor", &fakeFloor{floor: 2}, 3, codes.OK, ""},
		{"no floor recorded yet", &fakeFloor{}, 1, codes.OK, ""},
		{"the record unreachable", &fakeFloor{err: errors.New("connection refused")}, 5, codes.Unavailable, "bundle serial floor is unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := e.start(kms1ID, "", withFloor(tt.floor))
			_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.signedSerial(tt.serial)})
			if status.Code(err) != tt.wantCode || !strings.Contains(status.Convert(err).Message(), tt.wantMsg) {
				t.Fatalf("ApplyBundle(serial %d, record floor %d, err %v) = %v, want %v containing %q", tt.serial, tt.floor.floor, tt.floor.err, err, tt.wantCode, tt.wantMsg)
			}
			if err != nil && s.Ready() {
				t.Errorf("after a refused first bundle the server serves")
			}
			_, _ = s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.signedSerial(9)})
			if got, want := tt.floor.called(), 1; tt.floor.err == nil && got != want {
				t.Errorf("the record was asked %d times over two applies, want %d (once, then kept)", got, want)
			}
		})
	}

	t.Run("a server with its own bundle goes on without the record", func(t *testing.T) {
		dir := t.TempDir()
		s := e.start(kms1ID, dir, withFloor(&fakeFloor{}))
		e.apply(s, e.signedSerial(4))
		s.Close()
		down := &fakeFloor{err: errors.New("connection refused")}
		s2 := e.start(kms1ID, dir, withFloor(down))
		waitReady(t, s2)
		if _, err := s2.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.signedSerial(3)}); status.Code(err) != codes.FailedPrecondition {
			t.Errorf("ApplyBundle(serial 3 below its own 4, record down) = %v, want FailedPrecondition", err)
		}
		if _, err := s2.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: e.signedSerial(5)}); err != nil {
			t.Errorf("ApplyBundle(serial 5, record down, own floor 4) = %v, want applied", err)
		}
	})
}

// TestReplayOntoFreshServer, with a real root KMS: once regionctl recorded
// serial 2 as delivered to the region, a KMS server with a fresh state
// directory refuses the old signed serial 1, naming the floor, and accepts
// serial 2. Only regionctl may record a serial, and the floor never drops.
func TestReplayOntoFreshServer(t *testing.T) {
	pki := identitytest.New(t, identitytest.TrustDomain)
	chain := live.Start(t, pki)
	rc := rootkmsclient.New(pki.Source(adminID), []string{chain.Addr})
	defer rc.Close()
	if err := rc.Do(ctx(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		_, err := c.CreateRegion(ctx, &rootkmsv1.CreateRegionRequest{Region: region})
		return err
	}); err != nil {
		t.Fatalf("CreateRegion = %v", err)
	}
	record := func(rc *rootkmsclient.Client, serial uint64) (*rootkmsv1.Region, error) {
		var r *rootkmsv1.Region
		err := rc.Do(ctx(t), func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
			var err error
			r, err = c.RecordBundleSerial(ctx, &rootkmsv1.RecordBundleSerialRequest{Region: region, Serial: serial})
			return err
		})
		return r, err
	}

	e := &env{t: t, pki: pki, keys: kmstest.NewRegionKeys(), signer: kmstest.NewSigner(t)}
	e.keys.AddVersion(t, region)
	// Bundles without keysets: no region key is fetched to apply them, so
	// the region keys can be the test's while the floor is the root KMS's.
	serial1 := e.signer.Sign(t, kmstest.Bundle(t, e.keys, region, 1))
	serial2 := e.signer.Sign(t, kmstest.Bundle(t, e.keys, region, 2))
	withRoot := func(c *kms.Config) {
		rk := kms.NewRootKMSRegionKeys(c.Source, []string{chain.Addr})
		t.Cleanup(rk.Close)
		c.SerialFloor, c.FetchTimeout = rk, 5*time.Second
	}

	// Serial 1, then 2, rolled out to the first server and recorded.
	a := e.start(kms1ID, "", withRoot)
	e.apply(a, serial1)
	e.apply(a, serial2)
	if r, err := record(rc, 2); err != nil || r.GetBundleSerialFloor() != 2 {
		t.Fatalf("RecordBundleSerial(2) = %v, %v; want the region with floor 2", r, err)
	}
	if r, err := record(rc, 1); err != nil || r.GetBundleSerialFloor() != 2 {
		t.Errorf("RecordBundleSerial(1) after 2 = %v, %v; want the floor kept at 2", r, err)
	}
	kmsRC := rootkmsclient.New(pki.Source(kms1ID), []string{chain.Addr})
	defer kmsRC.Close()
	if _, err := record(kmsRC, 9); status.Code(err) != codes.PermissionDenied {
		t.Errorf("RecordBundleSerial as a KMS server = %v, want PermissionDenied (regionctl only)", err)
	}

	// The replay: a fresh server is offered the old serial 1.
	b := e.start(kms2ID, "", withRoot)
	_, err := b.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: serial1})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "below the region's bundle serial floor 2") {
		t.Fatalf("ApplyBundle(old serial 1) on a fresh server = %v, want FailedPrecondition naming the floor 2", err)
	}
	if b.Ready() || len(b.persisted(t)) != 0 {
		t.Errorf("the refused replay changed the server (ready %v, persisted %d bytes)", b.Ready(), len(b.persisted(t)))
	}
	e.apply(b, serial2)
	if st := b.status(t); st.GetBundle().GetSerial() != 2 {
		t.Errorf("fresh server serves serial %d, want 2", st.GetBundle().GetSerial())
	}
}

// TestExpiredBundle: a bundle past its not_after is refused (naming the
// not_after); one applied before it expired keeps being served past it,
// and GetStatus and cairn_kms_bundle_expired say it is expired.
func TestExpiredBundle(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	s := e.start(kms1ID, "", func(c *kms.Config) { c.Registry = reg })
	expiring := func(serial uint64, notAfter time.Time) *bundlev1.SignedBundle {
		b := kmstest.Bundle(t, e.keys, region, serial, e.ks)
		b.CreatedAt, b.NotAfter = timestamppb.New(notAfter.Add(-24*time.Hour)), timestamppb.New(notAfter)
		return e.signer.Sign(t, b)
	}
	notAfter := t0.Add(time.Hour)
	e.serial = 1
	e.apply(s, expiring(1, notAfter))
	st := s.status(t)
	if !st.GetBundleNotAfter().AsTime().Equal(notAfter) || st.GetBundleExpired() {
		t.Errorf("GetStatus before not_after = not_after %v, expired %v; want %v, false", st.GetBundleNotAfter().AsTime(), st.GetBundleExpired(), notAfter)
	}
	if got := gauge(t, reg, "cairn_kms_bundle_expired"); got != 0 {
		t.Errorf("cairn_kms_bundle_expired before not_after = %v, want 0", got)
	}
	if got := gauge(t, reg, "cairn_kms_bundle_not_after_timestamp_seconds"); got != float64(notAfter.Unix()) {
		t.Errorf("cairn_kms_bundle_not_after_timestamp_seconds = %v, want %v", got, notAfter.Unix())
	}

	s.clock.Advance(2 * time.Hour)
	// Still served.
	c := e.client(appID, s)
	enc := encrypt(t, c, ledger, []byte("dek"), nil)
	if got := decrypt(t, c, ledger, enc.GetCiphertext(), nil).GetPlaintext(); string(got) != "dek" {
		t.Errorf("Decrypt past not_after = %q, want dek", got)
	}
	if st := s.status(t); !st.GetBundleExpired() || st.GetBundle().GetSerial() != 1 {
		t.Errorf("GetStatus past not_after = expired %v serial %d, want true, 1", st.GetBundleExpired(), st.GetBundle().GetSerial())
	}
	if got := gauge(t, reg, "cairn_kms_bundle_expired"); got != 1 {
		t.Errorf("cairn_kms_bundle_expired past not_after = %v, want 1", got)
	}
	// An expired bundle is refused, dry run or not, and changes nothing.
	for _, dry := range []bool{true, false} {
		_, err := s.admin.ApplyBundle(ctx(t), &kmsv1.ApplyBundleRequest{Bundle: expiring(2, notAfter), DryRun: dry})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "not_after "+notAfter.Format(time.RFC3339)) {
			t.Errorf("ApplyBundle(expired serial 2, dry run %v) = %v, want FailedPrecondition naming not_after %s", dry, err, notAfter.Format(time.RFC3339))
		}
	}
	if st := s.status(t); st.GetBundle().GetSerial() != 1 {
		t.Errorf("after the refused expired bundle the server serves serial %d, want 1", st.GetBundle().GetSerial())
	}
	// A fresh one applies and clears the expiry.
	e.apply(s, expiring(3, s.clock.Now().Add(24*time.Hour)))
	if st := s.status(t); st.GetBundleExpired() || st.GetBundle().GetSerial() != 3 {
		t.Errorf("GetStatus after a fresh bundle = expired %v serial %d, want false, 3", st.GetBundleExpired(), st.GetBundle().GetSerial())
	}
	if got := gauge(t, reg, "cairn_kms_bundle_expired"); got != 0 {
		t.Errorf("cairn_kms_bundle_expired after a fresh bundle = %v, want 0", got)
	}

	// Restarted past the not_after of the bundle it persisted: it serves it.
	s.clock.Advance(48 * time.Hour)
	s.Close()
	s2 := e.start(kms1ID, s.dir, func(c *kms.Config) { c.Now = func() time.Time { return t0.Add(100 * time.Hour) } })
	waitReady(t, s2)
	if st := s2.status(t); !st.GetBundleExpired() || st.GetBundle().GetSerial() != 3 {
		t.Errorf("restarted past not_after: GetStatus = expired %v serial %d, want true, 3 (served)", st.GetBundleExpired(), st.GetBundle().GetSerial())
	}
}
