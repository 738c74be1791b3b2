package rootkms_test

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRestartedReplicaDoesNotDenyWhatExists: a voter restarted while its
// peers are down holds the root key but has applied nothing of its log yet
// (Raft applies the entries after the last snapshot only once a leader
// commits them). Asked for a region's key from its own state, it must not
// answer NotFound for a region the cluster has: it answers Unavailable,
// saying it is catching up, and serves the region once a leader is back
// and it has caught up. A region that does not exist is NotFound then.
func TestRestartedReplicaDoesNotDenyWhatExists(t *testing.T) {
	c := newChain(t)
	rs := c.cluster()
	createRegion(t, c.client(regionctlID, addrs(rs)...), "us-east")
	waitCaughtUp(t, rs)
	for _, r := range rs {
		r.stop()
	}

	r1 := c.restart(rs[0])
	if err := r1.srv.WaitReady(bg(t)); err != nil {
		t.Fatal(err)
	}
	_, err := c.unwrap(kmsEast, r1.api, "us-east")
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "still catching up with the cluster") {
		t.Fatalf("UnwrapRegionKey(us-east) from a voter restarted alone = %v, want Unavailable saying it is catching up (not NotFound: the region exists)", err)
	}

	c.restart(rs[1])
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := c.unwrap(kmsEast, r1.api, "us-east")
		if err == nil {
			if len(m.GetVersions()) == 0 {
				t.Fatalf("UnwrapRegionKey(us-east) after catching up gave no key version")
			}
			break
		}
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			t.Fatalf("UnwrapRegionKey(us-east) from the restarted voter with a peer back = %v, want the region's key once caught up", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := c.unwrap("spiffe://cairn.test/kms/eu-west/kms-1", r1.api, "eu-west"); status.Code(err) != codes.NotFound {
		t.Errorf("UnwrapRegionKey(eu-west, never created) once caught up = %v, want NotFound", err)
	}
}
