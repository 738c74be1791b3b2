package rootkms_test

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/audit"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// putRollout writes a rollout record through the cluster client.
func putRollout(t *testing.T, ctx context.Context, cl *rootkmsclient.Client, r *statev1.RolloutRecord, rev uint64) (*statev1.RolloutRecord, error) {
	t.Helper()
	var out *statev1.RolloutRecord
	err := cl.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		var err error
		out, err = c.PutRollout(ctx, &rootkmsv1.PutRolloutRequest{Rollout: r, ExpectedRevision: rev})
		return err
	})
	return out, err
}

// TestRollouts drives the rollout record through a real root KMS: create,
// a second rollout of the same region refused while the first is in
// flight, a stale revision and a stale epoch refused, a takeover, get and
// list, an idempotent retry, and a KMS identity refused.
func TestRollouts(t *testing.T) {
	c := newChain(t)
	r1 := c.startReplica("rootkms-1", true, false)
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	admin := c.client(regionctlID, r1.api)
	createRegion(t, admin, "us-east")
	createRegion(t, admin, "eu-west")
	const owner = regionctlID + "#ctl-1"
	body := []byte(`{"stage":"canary"}`)
	in := &statev1.RolloutRecord{Id: "bundle-42", Regions: []string{"us-east"}, InFlight: true, Epoch: 1, Owner: owner,
		Reason: "bundle 42", BodyFormat: "cairn.rollout.v1+json", Body: body, Revision: 7}

	// Create: the root KMS sets the revision and times; started_by is the
	// caller. A retry with the same request ID is answered, not applied.
	ctx := rootkmsclient.WithRequestID(bg(t), "put-bundle-42")
	got, err := putRollout(t, ctx, admin, in, 0)
	if err != nil {
		t.Fatalf("PutRollout(create) = %v", err)
	}
	if got.GetRevision() != 1 || got.GetCreatedAt() == nil || !proto.Equal(got.GetCreatedAt(), got.GetUpdatedAt()) ||
		got.GetStartedBy() != regionctlID || got.GetOwner() != owner || string(got.GetBody()) != string(body) {
		t.Fatalf("PutRollout(create) = %v, want revision 1, created = updated, started_by %s, owner %s", got, regionctlID, owner)
	}
	again, err := putRollout(t, ctx, admin, in, 0)
	if err != nil || !proto.Equal(again, got) {
		t.Errorf("PutRollout(create) retried with the same request ID = %v, %v; want the same record", again, err)
	}
	// Without it, a second create is a new write: AlreadyExists.
	if _, err := putRollout(t, bg(t), admin, in, 0); status.Code(err) != codes.AlreadyExists {
		t.Errorf("PutRollout(create existing) = %v, want AlreadyExists", err)
	}

	// A concurrent second start for the same region: refused, naming the
	// rollout in flight and the region.
	second := &statev1.RolloutRecord{Id: "bundle-43", Regions: []string{"eu-west", "us-east"}, InFlight: true, Epoch: 1,
		Owner: regionctlID + "#ctl-2", BodyFormat: "cairn.rollout.v1+json"}
	_, err = putRollout(t, bg(t), admin, second, 0)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "bundle-42") || !strings.Contains(err.Error(), "us-east") {
		t.Errorf("PutRollout(second of us-east) = %v, want FailedPrecondition naming bundle-42 and us-east", err)
	}

	// Update against the revision read: accepted; against a stale one, or
	// with a stale epoch: Aborted.
	upd := proto.CloneOf(got)
	upd.Body = []byte(`{"stage":"rest"}`)
	got, err = putRollout(t, bg(t), admin, upd, 1)
	if err != nil || got.GetRevision() != 2 || string(got.GetBody()) != `{"stage":"rest"}` {
		t.Fatalf("PutRollout(update at revision 1) = %v, %v; want revision 2 with the new body", got, err)
	}
	if _, err := putRollout(t, bg(t), admin, upd, 1); status.Code(err) != codes.Aborted {
		t.Errorf("PutRollout(update at stale revision 1) = %v, want Aborted", err)
	}
	takeover := proto.CloneOf(got)
	takeover.Epoch, takeover.Owner = 2, regionctlID+"#ctl-2"
	if got, err = putRollout(t, bg(t), admin, takeover, 2); err != nil || got.GetEpoch() != 2 || got.GetRevision() != 3 {
		t.Fatalf("PutRollout(takeover at epoch 2) = %v, %v", got, err)
	}
	stale := proto.CloneOf(got)
	stale.Epoch, stale.Owner = 1, owner
	if _, err := putRollout(t, bg(t), admin, stale, 3); status.Code(err) != codes.Aborted {
		t.Errorf("PutRollout(old owner at epoch 1) = %v, want Aborted", err)
	}
	bad := proto.CloneOf(in)
	bad.Id = "Not Valid"
	if _, err := putRollout(t, bg(t), admin, bad, 0); status.Code(err) != codes.InvalidArgument {
		t.Errorf("PutRollout(invalid ID) = %v, want InvalidArgument", err)
	}
	if _, err := putRollout(t, bg(t), admin, &statev1.RolloutRecord{Id: "x", Regions: []string{"nowhere"}, Epoch: 1, BodyFormat: "f"}, 0); status.Code(err) != codes.NotFound {
		t.Errorf("PutRollout(unknown region) = %v, want NotFound", err)
	}
	if _, err := putRollout(t, bg(t), admin, &statev1.RolloutRecord{Id: "nope", Regions: []string{"us-east"}, Epoch: 1, BodyFormat: "f"}, 1); status.Code(err) != codes.NotFound {
		t.Errorf("PutRollout(update of no rollout) = %v, want NotFound", err)
	}

	// A finished rollout frees its region.
	done := proto.CloneOf(got)
	done.InFlight = false
	if _, err := putRollout(t, bg(t), admin, done, 3); err != nil {
		t.Fatalf("PutRollout(finish) = %v", err)
	}
	if _, err := putRollout(t, bg(t), admin, second, 0); err != nil {
		t.Fatalf("PutRollout(second after the first finished) = %v", err)
	}

	// Get and list.
	err = admin.Do(bg(t), func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
		r, err := cl.GetRollout(ctx, &rootkmsv1.GetRolloutRequest{Id: "bundle-42"})
		if err != nil || r.GetRevision() != 4 || r.GetInFlight() {
			t.Errorf("GetRollout(bundle-42) = %v, %v; want revision 4, finished", r, err)
		}
		if _, err := cl.GetRollout(ctx, &rootkmsv1.GetRolloutRequest{Id: "missing"}); status.Code(err) != codes.NotFound {
			t.Errorf("GetRollout(missing) = %v, want NotFound", err)
		}
		all, err := cl.ListRollouts(ctx, &rootkmsv1.ListRolloutsRequest{})
		if err != nil || len(all.GetRollouts()) != 2 || all.GetRollouts()[0].GetId() != "bundle-42" || all.GetRollouts()[1].GetId() != "bundle-43" {
			t.Errorf("ListRollouts() = %v, %v; want bundle-42 and bundle-43", all, err)
		}
		live, err := cl.ListRollouts(ctx, &rootkmsv1.ListRolloutsRequest{InFlightOnly: true})
		if err != nil || len(live.GetRollouts()) != 1 || live.GetRollouts()[0].GetId() != "bundle-43" {
			t.Errorf("ListRollouts(in_flight_only) = %v, %v; want bundle-43", live, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A KMS identity may not read or write the record.
	kms := c.client(kmsEast, r1.api)
	for name, call := range map[string]func(context.Context, rootkmsv1.RootKMSClient) error{
		"PutRollout": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.PutRollout(ctx, &rootkmsv1.PutRolloutRequest{Rollout: &statev1.RolloutRecord{Id: "evil", Regions: []string{"us-east"}, InFlight: true, Epoch: 1, BodyFormat: "f"}})
			return err
		},
		"GetRollout": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.GetRollout(ctx, &rootkmsv1.GetRolloutRequest{Id: "bundle-42"})
			return err
		},
		"ListRollouts": func(ctx context.Context, cl rootkmsv1.RootKMSClient) error {
			_, err := cl.ListRollouts(ctx, &rootkmsv1.ListRolloutsRequest{})
			return err
		},
	} {
		if err := kms.Do(bg(t), call); status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s as a KMS = %v, want PermissionDenied", name, err)
		}
	}

	// Every PutRollout was audited before it ran (Mutating), and its
	// outcome after, refused ones too, with the rollout as its target.
	recs, err := audit.ReadFile(r1.auditLog)
	if err != nil {
		t.Fatal(err)
	}
	puts := map[audit.Outcome]int{}
	for _, r := range recs {
		if strings.HasSuffix(r.Operation, "/PutRollout") {
			puts[r.Outcome]++
			if r.Outcome == audit.OutcomeOK && !strings.HasPrefix(r.Target.Resource, "rollout/") {
				t.Errorf("PutRollout audit record target = %+v, want rollout/<id>", r.Target)
			}
		}
	}
	if puts[audit.OutcomeOK] < 6 || puts[audit.OutcomeError] < 5 || puts[audit.OutcomeDenied] < 1 ||
		puts[audit.OutcomeAttempt] < puts[audit.OutcomeOK]+puts[audit.OutcomeError] {
		t.Errorf("PutRollout audit outcomes = %v, want at least 6 ok, 5 error, 1 denied, and an attempt before each that ran", puts)
	}
}
