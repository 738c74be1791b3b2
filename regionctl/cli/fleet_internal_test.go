package cli

import (
	"errors"
	"testing"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// TestFleetKnown: a server is Known to the Safety Condition only when it
// answered and is not about to load a persisted bundle; a server with no
// bundle at all is Known and serves nothing.
func TestFleetKnown(t *testing.T) {
	notReady := kmsv1.ServingState_SERVING_STATE_NOT_READY
	o := &observation{Regions: map[string][]serverObs{"us-east": {
		{Addr: "serving", Status: &kmsv1.GetStatusResponse{State: kmsv1.ServingState_SERVING_STATE_SERVING}},
		{Addr: "empty", Status: &kmsv1.GetStatusResponse{State: notReady}},
		{Addr: "loading", Status: &kmsv1.GetStatusResponse{State: notReady, PendingBundle: &bundlev1.BundleRef{Region: "us-east", Serial: 7}}},
		{Addr: "down", Err: errors.New("connection refused")},
	}}}
	want := map[string]bool{"serving": true, "empty": true, "loading": false, "down": false}
	for _, s := range o.fleet().Servers {
		if s.Known != want[s.Name] {
			t.Errorf("fleet(): server %s Known = %v, want %v", s.Name, s.Known, want[s.Name])
		}
	}
}

// TestSameServer: two addresses reaching one server are both failed, so the
// region counts as unknown instead of one server standing in for two.
func TestSameServer(t *testing.T) {
	ok := &kmsv1.GetStatusResponse{State: kmsv1.ServingState_SERVING_STATE_SERVING}
	servers := []serverObs{
		{Addr: "a:1", ID: "spiffe://cairn.test/kms/us-east/kms-1", Status: ok},
		{Addr: "lb:1", ID: "spiffe://cairn.test/kms/us-east/kms-1", Status: ok},
		{Addr: "b:1", ID: "spiffe://cairn.test/kms/us-east/kms-2", Status: ok},
		{Addr: "c:1", Err: errors.New("down")},
	}
	sameServer(servers)
	for i, wantErr := range []bool{true, true, false, true} {
		if got := servers[i].Err != nil; got != wantErr {
			t.Errorf("sameServer: %s failed = %v (%v), want %v", servers[i].Addr, got, servers[i].Err, wantErr)
		}
	}
}
