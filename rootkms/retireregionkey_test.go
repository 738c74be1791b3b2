package rootkms_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// TestRetireRegionKeyNeedsRecentObservation: a region key version retires
// only on an observation of what the region's servers serve that was taken
// after the version stopped being primary and is no older than the
// observation max age. An observation from before (it could not see the
// bundles encrypted under the version) or a stale one (a bundle pushed since
// may need it, and a KMS restarting on that bundle could not unwrap it) is
// no evidence that nothing needs the version.
func TestRetireRegionKeyNeedsRecentObservation(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	admin := c.client(regionctlID, r1.api)
	createRegion(t, admin, "us-east")
	const name = "payments/ledger"
	if _, err := keysetCall(t, admin, func(ctx context.Context, cl rootkmsv1.RootKMSClient) (*rootkmsv1.Keyset, error) {
		return cl.CreateKeyset(ctx, &rootkmsv1.CreateKeysetRequest{Name: name, Regions: []string{"us-east"}, CiphertextTtl: durationpb.New(time.Hour)})
	}); err != nil {
		t.Fatal(err)
	}
	record := func(versions ...uint32) {
		t.Helper()
		if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RecordPropagation(ctx, &rootkmsv1.RecordPropagationRequest{Region: "us-east", RegionKeyVersions: versions})
			return err
		}); err != nil {
			t.Fatalf("RecordPropagation(%v) = %v", versions, err)
		}
	}
	rotate := func() {
		t.Helper()
		if err := admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.RotateRegionKey(ctx, &rootkmsv1.RotateRegionKeyRequest{Region: "us-east"})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if _, err := keysetCall(t, admin, step(name, statev1.KeysetStep_KEYSET_STEP_REWRAP, 0)); err != nil {
			t.Fatal(err)
		}
	}
	var region *rootkmsv1.Region
	retire := func(v uint32) error {
		return admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			var err error
			region, err = cl.RetireRegionKeyVersion(ctx, &rootkmsv1.RetireRegionKeyVersionRequest{Region: "us-east", Version: v})
			return err
		})
	}
	refused := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "run `regionctl observe` first") {
			t.Errorf("RetireRegionKeyVersion(2) %s = %v, want FailedPrecondition asking for `regionctl observe`", what, err)
		}
	}

	// Observed while the servers need version 1; then version 2 becomes
	// primary (its bundle rolled out, never observed) and is superseded by
	// version 3.
	record(1)
	rotate()
	rotate()
	refused("on an observation from before version 2 existed", retire(2))

	// Observed after, not needing version 2, but too long ago.
	record(3)
	c.Advance(testWindow + time.Second) // the observation max age defaults to the window
	refused("on an observation older than the max age", retire(2))

	// Observed again now: version 2 retires.
	record(3)
	if err := retire(2); err != nil {
		t.Fatalf("RetireRegionKeyVersion(2) on a recent observation not needing it = %v", err)
	}
	for _, v := range region.GetVersions() {
		if v.GetKeyId() == 2 && v.GetStatus() != cryptov1.KeyStatus_KEY_STATUS_DISABLED {
			t.Errorf("version 2 after its retirement is %v, want DISABLED", v.GetStatus())
		}
	}
}
